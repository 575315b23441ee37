"""`lowvram plan`: the memory/traffic model on a sparse full-size checkpoint (headers only)."""

import json
import subprocess
import sys
import time

import pytest

from lowvram.model.config import s2v_14b
from lowvram.plan import GiB, RunShape, plan_layouts, plan_report
from lowvram.synthetic import write_sparse_checkpoint


@pytest.fixture(scope="module")
def sparse_14b(tmp_path_factory):
    d = tmp_path_factory.mktemp("s2v14b")
    write_sparse_checkpoint(d, s2v_14b())
    return d


@pytest.mark.parametrize("gpus,kv,fmt,chosen", [
    ("4x24", "bf16", "int8", "tp1xpp4"),  # pipeline over layers: int8 weights + bf16 KV fit 24 GB
    ("2x24", "fp8", "fp8", "tp1xpp2"),
    ("1x24", "fp8", "int4", "tp1xpp1-offload"),  # one card: int4 + the current step's cache resident
    ("1x80", "bf16", "fp8", "tp1xpp1"),
])
def test_plan_answers_fast_and_picks_a_fitting_layout(sparse_14b, gpus, kv, fmt, chosen):
    t0 = time.perf_counter()
    report = plan_report(sparse_14b, gpus, "704*384", kv, "pcie", fmt, "rtx4090")
    assert time.perf_counter() - t0 < 2.0
    assert report["chosen"] == chosen
    best = next(r for r in report["layouts"] if r["name"] == chosen)
    assert best["fits"] and best["peak_GiB"] <= float(gpus.split("x")[1])


def test_pipeline_moves_far_less_than_tensor_parallel():
    layouts = {l.name: l for l in plan_layouts(s2v_14b(), "4x24", RunShape(704, 384, 2), "int8")}
    # spec §8.5: ~390 MB per block for a 4-stage pipeline over layers, ~25.7 GB per GPU for TP=4
    assert 350e6 < layouts["tp1xpp4"].comm_bytes_per_block < 420e6
    assert layouts["tp4xpp1"].comm_bytes_per_block > 50 * layouts["tp1xpp4"].comm_bytes_per_block


def test_kv_dominates_and_matches_the_spec():
    """One step's KV at 704x384 for all 40 layers is 10.38 GB in bf16 (spec §2.4)."""
    lay = next(l for l in plan_layouts(s2v_14b(), "1x80", RunShape(704, 384, 2), "fp8") if l.mode == "resident")
    assert abs(lay.per_gpu_bytes[0]["kv_cache"] / 4 / 1e9 - 10.38) < 0.02


def test_one_card_streams_the_caches_from_host_ram():
    """1x24: int4 weights + every step's fp8 cache in host RAM (21.9 GB incl. cond in the spec: 20.8 GB noisy)."""
    lay = next(l for l in plan_layouts(s2v_14b(), "1x24", RunShape(704, 384, 1), "int4") if l.mode == "offload")
    assert lay.fits and lay.peak_bytes < 16 * GiB
    assert abs(lay.host_bytes / 1e9 - 4 * 5.19) < 0.05
    assert lay.comm_bytes_per_block > lay.host_bytes  # every cache read once per block, plus the new rows


def test_vae_and_umt5_budgets_are_the_loaders_figures():
    """The decoder budget is vae_memory_bytes at the size in the dtype `lowvram run` loads it in on a GPU (bf16:
    3.0 GiB at 704x384, measured 3.1); GPU 0 first hosts umT5 (10.8 GiB) where the card has room, else the VAE
    encode; a launcher process (multi-GPU layouts) adds its CUDA context next to the decoder."""
    import torch

    from lowvram.conditioning.t5_memory import t5_memory_bytes
    from lowvram.conditioning.vae import runtime_dtype, vae_memory_bytes
    from lowvram.plan import CUDA_CONTEXT, FRAGMENTATION, conditioning_memory

    assert runtime_dtype("cuda") == torch.bfloat16 and runtime_dtype("cpu") == torch.float32
    vae = vae_memory_bytes(704, 384, dtype=torch.bfloat16)
    assert 2.8 * GiB < vae["decode_peak"] < 3.2 * GiB
    layouts = {l.name: l for l in plan_layouts(s2v_14b(), "4x24", RunShape(704, 384, 2), "int8")}
    gpus = layouts["tp1xpp4"].per_gpu_bytes
    with_vae = [m for m in gpus if "vae_decode" in m]
    assert len(with_vae) == 1 and with_vae[0]["vae_decode"] == vae["decode_peak"]
    assert with_vae[0]["launcher_context"] == CUDA_CONTEXT
    one = next(l for l in plan_layouts(s2v_14b(), "1x80", RunShape(704, 384, 2), "fp8") if l.mode == "resident")
    assert "launcher_context" not in one.per_gpu_bytes[0]  # one process: the VAE shares the rank's context
    t5 = t5_memory_bytes()["peak"]
    assert gpus[0]["conditioning"] == int((t5 + CUDA_CONTEXT) * FRAGMENTATION)
    assert conditioning_memory(RunShape(704, 384), 24 * GiB)["t5_device"] == "cuda"
    small = conditioning_memory(RunShape(704, 384), 8 * GiB)
    assert small["t5_device"] == "cpu" and small["peak"] == int((vae["encode_peak"] + CUDA_CONTEXT) * FRAGMENTATION)


def test_plan_cli_exit_3_names_the_fix(sparse_14b):
    # int8 + fp8 KV streamed from host RAM needs 22.5 GiB; int4 weights bring it to 15.2 (with the 3 GiB VAE)
    r = subprocess.run([sys.executable, "-m", "lowvram.cli", "plan", str(sparse_14b), "--gpus", "1x16",
                        "--format", "int8", "--kv", "fp8"], capture_output=True, text=True)
    assert r.returncode == 3
    last = r.stderr.strip().splitlines()
    assert len(last) == 1 and "--format int4" in last[0] and "Traceback" not in r.stderr


def test_plan_cli_json(sparse_14b):
    r = subprocess.run([sys.executable, "-m", "lowvram.cli", "plan", str(sparse_14b), "--gpus", "4x24", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["chosen"] == "tp1xpp4" and report["model"] == "s2v-14b"


def test_bad_gpus_spec_is_one_line(sparse_14b):
    r = subprocess.run([sys.executable, "-m", "lowvram.cli", "plan", str(sparse_14b), "--gpus", "four"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "COUNTxGiB" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("command", ["run", "plan", "inspect", "quantize"])
def test_a_missing_argument_is_a_usage_error_not_a_traceback(command):
    r = subprocess.run([sys.executable, "-m", "lowvram.cli", command], capture_output=True, text=True)
    assert r.returncode == 2 and "Missing" in r.stderr and "Traceback" not in r.stderr, r.stderr[-500:]


# ----- plan reads headers only, but checks them as `lowvram inspect` does -------------------------------------


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """A tiny sharded bf16 checkpoint and the int4 folder `lowvram quantize` writes from it."""
    import torch

    from lowvram.calibration import synthetic_samples
    from lowvram.model.config import tiny
    from lowvram.quantize import QuantizeOptions, quantize_checkpoint
    from lowvram.synthetic import write_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    write_checkpoint(root / "ckpt", tiny(), seed=0, shards=2, lora=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    quantize_checkpoint(QuantizeOptions(ckpt=root / "ckpt", out=root / "q",
                                        samples=synthetic_samples(tiny(), 1, blocks=1), fmt="int4", no_lora=True,
                                        device="cpu", evaluate=False, progress=False))
    torch.set_num_threads(threads)
    return root / "ckpt", root / "q"


def damaged_copy(src, dst, pick, how):
    import shutil

    shutil.copytree(src, dst)
    victim = sorted(p for p in dst.glob("*.safetensors") if pick(p.name))[0]
    if how == "truncate":
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size - 64)
    else:
        victim.unlink()
    return victim


def cli(*args):
    return subprocess.run([sys.executable, "-m", "lowvram.cli", *map(str, args)], capture_output=True, text=True)


def test_intact_folders_plan(tiny_folders):
    for folder in tiny_folders:
        assert plan_report(folder, "1x24", "128*128", "bf16", "pcie", "int8", "rtx4090")["chosen"] is not None


def test_plan_refuses_a_truncated_shard_as_inspect_does(tiny_folders, tmp_path):
    victim = damaged_copy(tiny_folders[0], tmp_path / "ckpt", lambda n: n.endswith("-00002-of-00002.safetensors"),
                          "truncate")
    plan, inspect = cli("plan", tmp_path / "ckpt", "--gpus", "1x24"), cli("inspect", tmp_path / "ckpt")
    assert plan.returncode == 2 and plan.stdout == "" and "Traceback" not in plan.stderr
    lines = plan.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {victim}: truncated") and "re-download" in lines[0]
    assert inspect.returncode == 2 and inspect.stderr.strip().splitlines()[-1] == lines[0]  # the same check


@pytest.mark.parametrize("how,needle", [("truncate", "(truncated or changed)"),
                                        ("delete", "missing from the quantized folder")])
def test_plan_refuses_a_damaged_quantized_folder(tiny_folders, tmp_path, how, needle):
    victim = damaged_copy(tiny_folders[1], tmp_path / "q", lambda n: n.startswith("block_"), how)
    r = cli("plan", tmp_path / "q", "--gpus", "1x24")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and r.stdout == "" and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith(f"error: {victim}:") and needle in lines[0] and "lowvram quantize" in lines[0]
