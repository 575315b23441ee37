"""Host-offloaded KV caches (one 24 GB card): same latents as the resident caches, layer-wise prefetch order."""

import torch
from safetensors.torch import load_file

from fixtures import reference_dir, tiny_dit_config, tiny_dit_latent_hw
from lowvram.model.dit import LiveAvatarDiT
from lowvram.model.sampler import StreamInputs, ShiftDraws, Stream

FIXTURE = reference_dir() / "tiny_dit"


def block_audio(cfg, generator=None):
    """Random audio features of one block: [1, stacked layers, width, 4 video frames per latent frame]."""
    return torch.randn(1, cfg.audio_layers, cfg.audio_dim, 4 * cfg.frames_per_block, generator=generator)


def sample(kv_offload: bool, blocks: int | None = None, device: str = "cpu", prepare=None):
    """`blocks` blocks (default: one more than a clip, so the last one wraps the KV ring buffer)."""
    cfg = tiny_dit_config(FIXTURE)
    h, w = tiny_dit_latent_hw(FIXTURE)
    model = LiveAvatarDiT(cfg)
    model.load_state_dict(load_file(FIXTURE / "weights.safetensors"))
    model.to(device)
    if prepare is not None:
        prepare(model)
    case = load_file(FIXTURE / "case_c.safetensors")
    stream = Stream(model, StreamInputs(case["context"], case["ref_latents"], case["motion_latents"]), (h, w),
                    draws=ShiftDraws(cfg, seed=3), kv_offload=kv_offload)
    g = torch.Generator().manual_seed(0)
    out = []
    f = cfg.frames_per_block
    for _ in range(cfg.blocks_per_clip + 1 if blocks is None else blocks):
        noise = torch.randn(cfg.in_dim, f, h, w, generator=g)
        out.append(stream.sample_block(noise, block_audio(cfg, g), torch.zeros(1, cfg.cond_dim, f, h, w)))
    return torch.stack(out).cpu(), stream


def test_offloaded_cache_gives_identical_latents():
    resident, _ = sample(False)
    offloaded, stream = sample(True)
    assert torch.equal(resident, offloaded)
    # every step's host copy holds what the resident cache would
    _, ref_stream = sample(False)
    for s in range(stream.cfg.num_steps):
        for i in stream.model.layer_ids:
            assert torch.equal(stream.kv[s].k[i], ref_stream.kv[s].k[i])


def test_prefetch_runs_one_layer_ahead():
    _, stream = sample(True, blocks=1)
    events = stream.kv[0].events
    layers = stream.model.layer_ids
    for a, b in zip(layers, layers[1:]):  # layer b is fetched before layer a's new rows are even written back
        assert events.index(f"prefetch {b}") > events.index(f"prefetch {a}")
        assert events.index(f"prefetch {b}") < events.index(f"write-back {b}")
    assert events[0] == f"prefetch {layers[0]}"


def test_stream_encodes_a_blocks_audio_once_and_time_once_per_step():
    _, stream = sample(False, blocks=1)
    calls = []
    encode, modulate = stream.model.encode_audio, stream.model.time_modulation
    stream.model.encode_audio = lambda a: calls.append("audio") or encode(a)
    stream.model.time_modulation = lambda t: calls.append("time") or modulate(t)
    audio = block_audio(stream.cfg)
    start = stream.block_tokens
    f = stream.cfg.frames_per_block
    for step in range(stream.cfg.num_steps):  # one block: every step, the same audio tensor
        stream.block_inputs(f, step, audio, start)
    assert calls.count("audio") == 1 and calls.count("time") == 0  # steps' time embedding cached by block 0
    other = audio.clone()
    inp, _ = stream.block_inputs(f, 0, other, start)  # another tensor: encoded again
    assert calls.count("audio") == 2
    stream.block_inputs(f, 0, other, 2 * start)  # the next block (a reused buffer): encoded again
    assert calls.count("audio") == 3
    torch.testing.assert_close(inp.audio_global, stream.model.casual_audio_encoder(other)[0])
