"""The sampler's one input type through its three schedules: the same StreamInputs (here a calibration sample:
given noise, zero pose latents, seeded reference-shift draws) gives bit-identical latents one block after another
(Stream), through the pipeline engine (StageRunner) and through layer-streamed calibration (run_trajectory)."""

import torch
from safetensors.torch import load_file

from fixtures import reference_dir, tiny_dit_config, tiny_dit_latent_hw
from lowvram.calibration import synthetic_samples
from lowvram.model.dit import LiveAvatarDiT
from lowvram.model.sampler import Stream, StreamInputs
from lowvram.parallel.engine import StageRunner, Topology
from lowvram.quantize.calibrate import ModuleSource, run_trajectory

FIXTURE = reference_dir() / "tiny_dit"


def test_one_input_type_gives_the_same_latents_in_every_schedule():
    assert StreamInputs is StreamInputs and StreamInputs is StreamInputs
    cfg = tiny_dit_config(FIXTURE)
    model = LiveAvatarDiT(cfg)
    model.load_state_dict(load_file(FIXTURE / "weights.safetensors"))
    blocks = min(2, cfg.blocks_per_clip)  # calibration stays inside one clip
    sample = synthetic_samples(cfg, 1, seed=2, latent_hw=tiny_dit_latent_hw(FIXTURE), blocks=blocks)[0]

    stream = Stream(model, sample, sample.latent_hw, draws=sample.draws(cfg))
    sequential = torch.cat([stream.sample_block(*block) for block in sample.blocks], dim=1)
    got = {}
    StageRunner(model, Topology(), sample, on_latent=lambda b, x: got.__setitem__(b, x)).run()
    pipelined = torch.cat([got[b] for b in range(blocks)], dim=1)
    calibration = run_trajectory(ModuleSource(model), [sample]).finals[0]
    assert torch.equal(pipelined, sequential) and torch.equal(calibration, sequential)
    assert sequential.shape == (cfg.in_dim, blocks * cfg.frames_per_block, *sample.latent_hw)
