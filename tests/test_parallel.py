"""The parallel engine on CPU with gloo: every tp x pp layout reproduces the single-process stream."""

import time

import pytest
import torch
from safetensors.torch import load_file

from fixtures import reference_dir, tiny_dit_config
from lowvram.model.dit import LiveAvatarDiT
from lowvram.model.sampler import ShiftDraws, Stream, StreamInputs, clip_noise
from lowvram.parallel.engine import StageRunner, Topology, wavefront_schedule
from lowvram.parallel.launch import RankFailed, spawn
from lowvram.parallel.stage import stage_layers
from lowvram.parallel.worker import WorkerSpec, run_worker

FIXTURE = reference_dir() / "tiny_dit"


def fixture_cfg():
    return tiny_dit_config(FIXTURE)


BLOCKS = fixture_cfg().blocks_per_clip + 1  # one more than a clip: the last block wraps the KV ring buffer


def fixture_inputs() -> StreamInputs:
    """The fixture's conditioning (case c) with seeded audio for BLOCKS blocks."""
    case = load_file(FIXTURE / "case_c.safetensors")
    cfg = fixture_cfg()
    g = torch.Generator().manual_seed(5)
    audio = torch.randn(1, cfg.audio_layers, cfg.audio_dim, 4 * cfg.frames_per_block * BLOCKS, generator=g)
    return StreamInputs(context=case["context"], ref_latents=case["ref_latents"],
                        motion_latents=case["motion_latents"], audio=audio, num_blocks=BLOCKS, seed=7,
                        latent_hw=tuple(case["initial_noise"].shape[-2:]))


@pytest.fixture(scope="module")
def stream_inputs(tmp_path_factory):
    inputs = fixture_inputs()
    path = tmp_path_factory.mktemp("run") / "inputs.pt"
    torch.save(inputs, path)
    return inputs, path


def sequential(inputs, ref_update: bool):
    """The sequential single-process sampler (the parity-tested path) with the engine's noise and draws."""
    cfg = fixture_cfg()
    model = LiveAvatarDiT(cfg)
    model.load_state_dict(load_file(FIXTURE / "weights.safetensors"))
    stream = Stream(model, StreamInputs(inputs.context, inputs.ref_latents, inputs.motion_latents), inputs.latent_hw,
                    draws=ShiftDraws(cfg, seed=inputs.seed), ref_update=ref_update)
    out = []
    f = cfg.frames_per_block
    for b in range(BLOCKS):
        clip, within = divmod(b, cfg.blocks_per_clip)
        noise = clip_noise(cfg, inputs, clip)[:, within * f:(within + 1) * f]
        pose = torch.zeros(1, cfg.cond_dim, f, *inputs.latent_hw)
        out.append(stream.sample_block(noise, inputs.block_audio(b, f), pose))
    return torch.stack(out)


@pytest.fixture(scope="module")
def reference_latents(stream_inputs):
    return sequential(stream_inputs[0], ref_update=False)


@pytest.fixture(scope="module")
def swapped_reference_latents(stream_inputs):
    """Upstream multi-GPU behaviour: after clip 0 the first generated frame is the new reference."""
    return sequential(stream_inputs[0], ref_update=True)


def test_reference_swap_changes_only_the_blocks_after_clip_0(reference_latents, swapped_reference_latents):
    clip = fixture_cfg().blocks_per_clip
    assert torch.equal(reference_latents[:clip], swapped_reference_latents[:clip])
    assert (reference_latents[clip:] - swapped_reference_latents[clip:]).abs().max() > 1e-3


def test_wavefront_schedule_respects_dependencies():
    for pp in (1, 2, 3, 4):
        order = wavefront_schedule(9, 4, pp, clip_blocks=4)
        pos = {item: i for i, item in enumerate(order)}
        assert len(order) == 36
        for (b, s), i in pos.items():
            clip_start = b // 4 * 4
            chunk_start = clip_start + (b - clip_start) // pp * pp
            chunk = min(pp, min(clip_start + 4, 9) - chunk_start)
            if s > 0:
                assert i - pos[(b, s - 1)] >= chunk  # the previous step has left the pipe
            if b > 0:
                assert pos[(b - 1, s)] < i  # the step cache already holds the previous block
            if b >= 4:  # clip 1 starts only after every item of clip 0 (the reference may change in between)
                assert all(pos[(c, t)] < i for c in range(clip_start) for t in range(4))


def test_single_rank_engine_equals_the_sequential_sampler(stream_inputs, reference_latents):
    inputs, _ = stream_inputs
    model = LiveAvatarDiT(fixture_cfg())
    model.load_state_dict(load_file(FIXTURE / "weights.safetensors"))
    got = {}
    StageRunner(model, Topology(), inputs, on_latent=lambda b, x: got.__setitem__(b, x)).run()
    assert torch.equal(torch.stack([got[b] for b in range(BLOCKS)]), reference_latents)


def run_layout(tp, pp, inputs_path, ref_update=True):
    cfg = fixture_cfg()
    spec = WorkerSpec(source=str(FIXTURE / "weights.safetensors"), cfg=cfg.to_dict(), tp=tp, pp=pp,
                      stages=stage_layers(cfg, pp), inputs_path=str(inputs_path), dtype="float32",
                      ref_update=ref_update)
    got = {}
    memory = {}

    def on_message(kind, rank, payload):
        if kind == "latent":
            got[payload[0]] = torch.from_numpy(payload[1])
        elif kind == "memory":
            memory[rank] = payload

    spawn(run_worker, (spec,), tp * pp, "gloo", on_message)
    assert sorted(memory) == list(range(tp * pp)) and all(m["host_bytes"] > 0 for m in memory.values())
    return torch.stack([got[b] for b in range(BLOCKS)])


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2), (1, 4)])
def test_layouts_match_the_single_process_reference(tp, pp, stream_inputs, swapped_reference_latents):
    """Every layout, with the reference swap after clip 0 (the runtime's default), equals the sequential stream."""
    cfg = fixture_cfg()
    if cfg.num_heads % tp or pp > cfg.num_layers:
        pytest.skip(f"the fixture's {cfg.num_heads} heads x {cfg.num_layers} layers do not split as tp {tp} x pp {pp}")
    latents = run_layout(tp, pp, stream_inputs[1])
    err = (latents - swapped_reference_latents).abs().max().item()
    assert err <= 1e-4, err


def test_layout_without_the_swap_matches_too(stream_inputs, reference_latents):
    err = (run_layout(1, 2, stream_inputs[1], ref_update=False) - reference_latents).abs().max().item()
    assert err <= 1e-4, err


def test_a_killed_rank_ends_the_run_cleanly(stream_inputs, monkeypatch):
    monkeypatch.setenv("LOWVRAM_TEST_KILL_RANK", "1:3")
    t0 = time.monotonic()
    with pytest.raises(RankFailed, match=r"rank 1 died \(killed by SIGKILL\)"):
        run_layout(1, 2, stream_inputs[1])
    assert time.monotonic() - t0 < 60
