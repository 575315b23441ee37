"""Write a second fixture set in the reference layout, with another tiny DiT config and seed, to check that the
parity tests take every size from the set they read:

    .venv/bin/python scripts/make_alt_reference.py /tmp/altref
    LOWVRAM_REFERENCE_DIR=/tmp/altref .venv/bin/python -m pytest -q -p no:cacheprovider \
        tests/test_dit_parity.py tests/test_offload.py tests/test_parallel.py

tiny_dit/ is rewritten (widths, heads, layers, latent size, audio width, frames per block, blocks per clip,
steps, seed). Upstream's outputs cannot be regenerated here, so its cases come from OUR model: against this set
the parity test checks sizes and bookkeeping, not the math. The other folders hold upstream outputs and are
copied unchanged.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from lowvram.model.dit import LiveAvatarDiT
from lowvram.model.sampler import StreamInputs, ShiftDraws, Stream, flow_schedule, reference_shift
from lowvram.synthetic import random_state_dict

TESTS = Path(__file__).resolve().parent.parent / "tests"
SHARED = TESTS / "reference"
sys.path.insert(0, str(TESTS))
from fixtures import tiny_dit_config  # noqa: E402  (the tests' reading of a set's config.json)

SEED = 4321
MODEL = dict(dim=96, ffn_dim=160, num_heads=2, num_layers=5, text_dim=48, text_len=12, audio_dim=24,
             audio_inject_layers=[1, 3, 4])
PIPELINE = dict(num_frames_per_block=2, num_blocks=3, latent_hw=[8, 24], context_tokens=5, sampling_steps=3)


def alt_config(shared: dict) -> dict:
    fx = {**shared, "name": "tiny_dit (alternate set, our model's outputs)", "seed": SEED}
    fx["model"] = {**shared["model"], **MODEL}
    fx["pipeline"] = {**shared["pipeline"], **PIPELINE}
    for key in ("relative_dist_script", "relative_dist_script_clip1", "derived", "consistency", "verification"):
        fx.pop(key, None)
    return fx


def stacked(cache_rows, layer_ids, rows: int) -> torch.Tensor:
    return torch.stack([cache_rows[i][:rows] for i in layer_ids]).clone()


def single_forward_case(stream: Stream, clip: dict, block: int, rd: int) -> dict:
    """One forward at step 0 of `block` (cases a and b), with the caches before and after it."""
    cfg, f = stream.cfg, stream.cfg.frames_per_block
    start = block * stream.block_tokens
    ids = stream.model.layer_ids
    case = {"x": clip["initial_noise"][:, f * block: f * (block + 1)].clone(),
            "t": stream.timesteps[:1].repeat(f)[None].clone(),
            "audio_input": clip["audio_input"][..., 4 * f * block: 4 * f * (block + 1)].clone(),
            "cond_states": clip["cond_states"][:, :, f * block: f * (block + 1)].clone(),
            "relative_dist": torch.tensor([rd]), "current_start": torch.tensor([start]),
            "ref_rope_frame_shift": torch.tensor([reference_shift(cfg, start // stream.fsl, rd)])}
    if start:
        case["kv_k_before"] = stacked(stream.step_kv(0).k, ids, start)
        case["kv_v_before"] = stacked(stream.step_kv(0).v, ids, start)
    case["out"] = stream.forward(case["x"], 0, case["audio_input"], case["cond_states"], start, rd)
    case["prefill_cond_k"] = torch.stack([stream.cond.layers[i].cond_k for i in ids]).clone()
    case["prefill_cond_v"] = torch.stack([stream.cond.layers[i].cond_v for i in ids]).clone()
    case["kv_k_after"] = stacked(stream.step_kv(0).k, ids, start + stream.block_tokens)
    case["kv_v_after"] = stacked(stream.step_kv(0).v, ids, start + stream.block_tokens)
    return case


def sampling_case(stream: Stream, clip: dict, script: list[list[int]], with_caches: bool) -> dict:
    """Every block of one clip, every step (cases c and d), continuing the stream's caches."""
    cfg, f = stream.cfg, stream.cfg.frames_per_block
    first = stream.next_start // stream.block_tokens
    stream.draws = ShiftDraws(cfg, script={(first + b, s): rd for b, row in enumerate(script) for s, rd in enumerate(row)})
    preds, after, finals, starts = [], [], [], []
    for b in range(len(script)):
        start = stream.next_start
        starts.append([start] * cfg.num_steps)
        pb, ab = [], []
        finals.append(stream.sample_block(clip["initial_noise"][:, f * b: f * (b + 1)],
                                          clip["audio_input"][..., 4 * f * b: 4 * f * (b + 1)],
                                          clip["cond_states"][:, :, f * b: f * (b + 1)],
                                          on_step=lambda i, v, x: (pb.append(v), ab.append(x))))
        preds.append(torch.stack(pb))
        after.append(torch.stack(ab))
    shifts = [[reference_shift(cfg, start // stream.fsl, rd) for start, rd in zip(srow, row)]
              for srow, row in zip(starts, script)]
    case = {**clip, "timesteps": stream.timesteps.clone(), "sigmas": stream.sigmas.clone(),
            "relative_dist": torch.tensor(script), "current_start": torch.tensor(starts),
            "ref_rope_frame_shift": torch.tensor(shifts), "noise_pred": torch.stack(preds),
            "latents_after_step": torch.stack(after), "final_latents": torch.cat(finals, dim=1)}
    if with_caches:
        rows = stream.next_start
        case["kv_k_final"] = torch.stack([stacked(stream.kv[s].k, stream.model.layer_ids, rows)
                                          for s in range(cfg.num_steps)])
        case["kv_v_final"] = torch.stack([stacked(stream.kv[s].v, stream.model.layer_ids, rows)
                                          for s in range(cfg.num_steps)])
    return case


@torch.no_grad()
def write_tiny_dit(folder: Path) -> None:
    fx = alt_config(json.loads((SHARED / "tiny_dit" / "config.json").read_text()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(fx, indent=1))
    cfg = tiny_dit_config(folder)
    (h, w), f, blocks = fx["pipeline"]["latent_hw"], cfg.frames_per_block, cfg.blocks_per_clip
    weights = random_state_dict(cfg, seed=SEED, dtype=torch.float32)
    model = LiveAvatarDiT(cfg)
    model.load_state_dict(weights)
    model.eval()
    g = torch.Generator().manual_seed(SEED)

    def clip_inputs() -> dict:
        return {"initial_noise": torch.randn(cfg.in_dim, f * blocks, h, w, generator=g),
                "audio_input": torch.randn(1, cfg.audio_layers, cfg.audio_dim, 4 * f * blocks, generator=g),
                "cond_states": torch.randn(1, cfg.cond_dim, f * blocks, h, w, generator=g)}

    def script() -> list[list[int]]:
        lo, hi = cfg.ref_shift_range
        return torch.randint(lo, hi + 1, (blocks, cfg.num_steps), generator=g).tolist()

    cond = StreamInputs(torch.randn(fx["pipeline"]["context_tokens"], cfg.text_dim, generator=g),
                        torch.randn(1, cfg.in_dim, 1, h, w, generator=g),
                        torch.randn(1, cfg.in_dim, cfg.motion_latent_frames, h, w, generator=g))
    clip0, clip1, script0, script1 = clip_inputs(), clip_inputs(), script(), script()
    stream = Stream(model, cond, (h, w))
    cases = {"case_a": single_forward_case(stream, clip0, 0, script0[0][0])}
    cases["case_b"] = single_forward_case(stream, clip0, 1, script0[1][0])
    for case in cases.values():
        case.update(context=cond.context, ref_latents=cond.ref_latents, motion_latents=cond.motion_latents)
    stream = Stream(model, cond, (h, w))
    cases["case_c"] = {"context": cond.context, "ref_latents": cond.ref_latents, "motion_latents": cond.motion_latents,
                       **sampling_case(stream, clip0, script0, with_caches=True)}
    cases["case_d"] = sampling_case(stream, clip1, script1, with_caches=False)

    for old in folder.glob("*.safetensors"):
        old.unlink()
    files = {"weights.safetensors": weights, **{f"{name}.safetensors": t for name, t in cases.items()}}
    for name, tensors in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name))
    steps, sigmas = flow_schedule(cfg.num_steps, cfg.scheduler_shift)
    fx["derived"] = {"timesteps_float32": steps.tolist(), "sigmas_float32": sigmas.tolist()}
    fx["relative_dist_script"], fx["relative_dist_script_clip1"] = script0, script1
    fx["files"] = {name: {k: list(v.shape) for k, v in tensors.items()} for name, tensors in files.items()}
    (folder / "config.json").write_text(json.dumps(fx, indent=1))
    (folder / "README.md").write_text(
        f"# tiny_dit (alternate set)\n\nWritten by scripts/make_alt_reference.py: config {MODEL}, pipeline "
        f"{PIPELINE}, seed {SEED}. Same tensor names and layout as the shared set (its README describes the math), "
        f"but the outputs are lowvram's own, not upstream's: it checks sizes, not parity.\n")


def main(out: Path) -> None:
    if out.resolve() == SHARED.resolve():
        sys.exit("refusing to overwrite the shared fixture set")
    shutil.copytree(SHARED, out, dirs_exist_ok=True)
    write_tiny_dit(out / "tiny_dit")
    print(f"wrote {out} (tiny_dit: {MODEL}, {PIPELINE}, seed {SEED})")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/altref"))
