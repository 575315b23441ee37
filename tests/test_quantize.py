"""The quantizer end to end on a tiny real-layout checkpoint with a LoRA and 2 calibration samples.

Measured on this model (1 calibration + 1 held-out sample, 1 block x 4 steps; relative L2 error of the 4-step
denoised latents of the held-out sample vs the bf16 model, both run through `Stream`):
fp8 dynamic 0.019, fp8 static (per layer and step) 0.018, int8 SmoothQuant 0.006, int4 0.059. Bounds below are
2.5x or more of those. With 2 outlier channels, int8 SmoothQuant 0.009 vs naive per-tensor int8 0.043.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fixtures import run_cli as cli
from lowvram.calibration import save_samples, synthetic_samples
from lowvram.checkpoint import build_meta_model, load_state_dict_streaming
from lowvram.errors import CheckpointError
from lowvram.kernels import linear as K
from lowvram.model.config import tiny
from lowvram.model.sampler import StreamInputs, ShiftDraws, Stream
from lowvram.quantize import NaiveInt8Linear, QuantStream, load_quantized, read_manifest, reshard
from lowvram.quantize.calibrate import CheckpointSource, run_trajectory
from lowvram.quantize.io import write_safetensors
from lowvram.synthetic import write_checkpoint, write_lora

BOUNDS = {"fp8": 0.05, "fp8-static": 0.05, "int8": 0.02, "int4": 0.15}
EXIT_ENV = "LOWVRAM_QUANTIZE_EXIT_AFTER_BLOCK"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops: thread fan-out only costs time (and the CPUs are shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cfg():
    return tiny()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, cfg):
    root = tmp_path_factory.mktemp("ckpt")
    write_checkpoint(root, cfg, seed=0, shards=2, lora=True)
    return root


@pytest.fixture(scope="module")
def samples(cfg):
    return synthetic_samples(cfg, 2, seed=0, blocks=1)


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory, samples):
    d = tmp_path_factory.mktemp("calib")
    save_samples(d, samples)
    return d


@pytest.fixture(scope="module")
def bf16_model(ckpt, cfg):
    return load_state_dict_streaming(ckpt, build_meta_model(cfg), lora=ckpt / "liveavatar.safetensors").eval()


def sample_stream(model, sample, stream_cls=Stream):
    s = stream_cls(model, StreamInputs(sample.context, sample.ref_latents, sample.motion_latents), sample.latent_hw,
                   draws=ShiftDraws(model.cfg, seed=sample.shift_seed))
    return torch.cat([s.sample_block(*blk) for blk in sample.blocks], dim=1)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def reference(bf16_model, samples):
    return sample_stream(bf16_model, samples[1])  # the held-out sample


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, ckpt, calib_dir):
    """One folder per format, written through the CLI (in-process)."""
    out = {}
    root = tmp_path_factory.mktemp("q")
    for name, extra in (("fp8", []), ("fp8-static", ["--act", "static"]), ("int8", []), ("int4", [])):
        fmt = name.split("-")[0]
        code, _, err = cli("quantize", str(ckpt), "--calib", str(calib_dir), "--format", fmt, "--out",
                        str(root / name), "--device", "cpu", *extra)
        assert code == 0, err
        out[name] = root / name
    return out


# ----------------------------------------------------------------------------------------------------------


def test_streaming_trajectory_is_the_real_sampler(ckpt, cfg, bf16_model, tmp_path):
    """Layer-streamed lock-step calibration == Stream.sample_block, bit for bit (2 blocks: the KV caches matter);
    the bytes read are counted: passes x (layers + LoRA) + the nonblock weights once."""
    from lowvram.checkpoint import checkpoint_index, read_lora

    two = synthetic_samples(cfg, 2, seed=3, blocks=2)
    index = checkpoint_index(ckpt)
    lora = read_lora(ckpt / "liveavatar.safetensors", cfg)
    src = CheckpointSource(index, cfg, lora)
    res = run_trajectory(src, two)
    for i, s in enumerate(two):
        assert torch.equal(res.finals[i], sample_stream(bf16_model, s)), i
    assert res.passes == 2 * cfg.num_steps and res.layer_loads == res.passes * cfg.num_layers
    block_keys = [k for k in index if k.startswith(("blocks.", "audio_injector."))]
    nonblock = sum(e.nbytes for k, e in index.items() if k not in block_keys)
    per_pass = sum(index[k].nbytes for k in block_keys) + lora.nbytes
    assert res.bytes_read == nonblock + res.passes * per_pass
    on_disk = run_trajectory(CheckpointSource(index, cfg, lora), two, kv_scratch=tmp_path / "kv")
    assert all(torch.equal(a, b) for a, b in zip(on_disk.finals, res.finals))  # memory-mapped KV: same result
    assert list((tmp_path / "kv").iterdir()) == []  # scratch removed


@pytest.mark.parametrize("name", ["fp8", "fp8-static", "int8", "int4"])
def test_format_reloads_and_stays_close_to_bf16(name, quantized, samples, reference):
    folder = quantized[name]
    manifest = read_manifest(folder)
    model = load_quantized(folder)
    fmt = name.split("-")[0]
    q = model.blocks["1"].ffn[2]
    assert isinstance(q, K.MODULES[fmt])
    assert isinstance(model.head.head, nn.Linear) and isinstance(model.text_embedding[0], nn.Linear)  # KEEP_BF16
    out = sample_stream(model, samples[1], QuantStream)
    err = rel(out, reference)
    report = json.loads((folder / "quant_report.json").read_text())
    e2e = report["end_to_end"]["final_rel_err_mean"]
    print(f"{name}: end-to-end rel err {err:.4f} (report {e2e:.4f}), per-layer mean "
          f"{report['per_layer']['mean_err']:.4f}")
    assert 0 < err < BOUNDS[name], err
    assert abs(e2e - err) < 1e-3 * max(1.0, err) + 1e-6  # the report measures the same thing
    assert manifest["format"] == fmt and (folder / "quant_report.md").read_text().startswith("# Quantization report")
    if name == "fp8-static":
        assert q.act_scales.shape == (5,) and bool((q.act_scales > 0).all())
    if name == "int8":
        alphas = {d["alpha"] for n, d in manifest["layers"].items() if d["format"] == "int8"}
        assert len(alphas) > 1  # chosen per layer
        assert not (folder / "progress.json").exists() and not (folder / ".work").exists()


@pytest.fixture(scope="module")
def outlier_ckpt(tmp_path_factory, cfg):
    """The same tiny model whose pre-attention / pre-FFN modulation scales blow up 2 channels (x40): outlier
    activation channels like real DiTs have, feeding q/k/v and ffn.0."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("outlier")
    written = write_checkpoint(root, cfg, seed=1, shards=1, lora=True)
    path = written.shards[0]
    sd = load_file(str(path))
    for i in range(cfg.num_layers):
        mod = sd[f"blocks.{i}.modulation"].float()
        mod[0, 1, [5, 77]] = 40.0
        mod[0, 4, [5, 77]] = 40.0
        sd[f"blocks.{i}.modulation"] = mod.to(torch.bfloat16)
    save_file(sd, str(path), metadata={"format": "pt"})
    return root


def test_smoothquant_int8_beats_naive_per_tensor_int8(outlier_ckpt, cfg, samples, tmp_path):
    from lowvram.quantize import QuantizeOptions, quantize_checkpoint

    report = quantize_checkpoint(QuantizeOptions(ckpt=outlier_ckpt, out=tmp_path / "q", samples=samples, fmt="int8",
                                                 device="cpu", progress=False))
    bf16 = load_state_dict_streaming(outlier_ckpt, build_meta_model(cfg), lora=outlier_ckpt / "liveavatar.safetensors")
    ref = sample_stream(bf16, samples[1])
    calibrated = rel(sample_stream(load_quantized(tmp_path / "q"), samples[1], QuantStream), ref)
    for name, mod in list(bf16.named_modules()):
        if isinstance(mod, nn.Linear) and name.startswith(("blocks.", "audio_injector.")):
            K.set_submodule(bf16, name, NaiveInt8Linear(mod))
    naive = rel(sample_stream(bf16, samples[1]), ref)
    pl = report["per_layer"]
    print(f"int8 with outliers: SmoothQuant {calibrated:.4f} vs naive per-tensor {naive:.4f}; per layer "
          f"{pl['mean_err']:.4f} vs {pl['int8_naive_per_tensor_mean_err']:.4f}")
    assert calibrated < 0.5 * naive
    assert pl["mean_err"] < pl["int8_naive_per_tensor_mean_err"]
    qkv = [d for n, d in pl["layers"].items() if n.endswith("self_attn.q")]
    assert all(d["outlier_ratio"] > 10 and d["alpha"] is not None for d in qkv)  # migration chosen on outliers


def test_keep_bf16_auto_and_names(ckpt, calib_dir, quantized, tmp_path):
    code, _, err = cli("quantize", str(ckpt), "--calib", str(calib_dir), "--format", "int4", "--keep-bf16", "auto",
                    "--bf16-budget-mb", "0.1", "--out", str(tmp_path / "auto"), "--device", "cpu", "--no-eval")
    assert code == 0, err
    m = read_manifest(tmp_path / "auto")
    kept = m["keep_bf16"]["layers"]
    assert kept and m["keep_bf16"]["extra_bytes"] <= 100_000
    errs = {n: d["err"] for n, d in json.loads((quantized["int4"] / "quant_report.json").read_text())
            ["per_layer"]["layers"].items()}
    worst = max(errs, key=errs.get)
    assert worst in kept  # the most sensitive layer is the first kept
    model = load_quantized(tmp_path / "auto")
    assert all(type(model.get_submodule(n)) is nn.Linear for n in kept)
    code, _, err = cli("quantize", str(ckpt), "--calib", str(calib_dir), "--format", "int8", "--keep-bf16",
                    "ffn.2,blocks.0.self_attn.*", "--out", str(tmp_path / "names"), "--device", "cpu", "--no-eval")
    assert code == 0, err
    kept = read_manifest(tmp_path / "names")["keep_bf16"]["layers"]
    assert sorted(kept) == sorted([f"blocks.{i}.ffn.2" for i in range(4)] +
                                  [f"blocks.0.self_attn.{x}" for x in "qkvo"])


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.suffix == ".safetensors" or p.name == "manifest.json"}


def test_resume_after_kill_gives_identical_bytes(ckpt, calib_dir, quantized, tmp_path):
    out = tmp_path / "q"
    args = ["quantize", str(ckpt), "--calib", str(calib_dir), "--format", "int8", "--out", str(out), "--device",
            "cpu"]
    env = {**os.environ, EXIT_ENV: "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", "from lowvram.cli import main; main()", *args], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 75, proc.stderr  # killed right after layer 1's file
    names = sorted(p.name for p in out.iterdir())
    assert "manifest.json" not in names and "progress.json" in names
    assert "block_000.safetensors" in names and "block_001.safetensors" in names
    assert "block_002.safetensors" not in names and not any(".tmp-" in n for n in names)
    with pytest.raises(CheckpointError, match="resume"):
        load_quantized(out)  # an unfinished folder is never taken for a finished one
    code, _, err = cli(*args)  # the same command resumes
    assert code == 0, err
    assert files_of(out) == files_of(quantized["int8"])  # byte-identical to the uninterrupted run
    code, _, err = cli(*args)  # finished: verified against the manifest, nothing rewritten
    assert code == 0 and "already quantized" in err, err
    code, _, err = cli(*args[:-2], "--device", "cpu", "--format", "fp8")
    assert code != 0 and "--force" in err  # other settings never silently mix into a folder
    code, _, err = cli(*args, "--force")  # --force restarts from scratch: same bytes again
    assert code == 0, err
    assert files_of(out) == files_of(quantized["int8"])


def test_interrupted_write_leaves_no_finished_looking_file(tmp_path, monkeypatch):
    import lowvram.quantize.io as qio

    def boom(t):
        raise KeyboardInterrupt

    monkeypatch.setattr(qio, "tensor_bytes", boom)
    with pytest.raises(KeyboardInterrupt):
        write_safetensors(tmp_path / "block_000.safetensors", {"a": torch.zeros(3)})
    assert list(tmp_path.iterdir()) == []


def test_wrong_lora_fails_with_one_line(ckpt, calib_dir, tmp_path):
    other = write_lora(tmp_path / "other.safetensors", tiny(dim=256, num_heads=4))
    code, _, err = cli("quantize", str(ckpt), "--calib", str(calib_dir), "--lora", str(other), "--out",
                    str(tmp_path / "q"), "--device", "cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "does not fit this model" in err


def test_reshard_round_trip(quantized, tmp_path, cfg):
    src = quantized["int8"]
    two = tmp_path / "tp2"
    code, _, err = cli("reshard", str(src), "--tp", "2", "--out", str(two))
    assert code == 0, err
    m = read_manifest(two)
    assert m["tp"]["size"] == 2 and "block_003.tp1of2.safetensors" in m["files"]
    r0 = load_quantized(two, layers=[1], tp_rank=0, tp_size=2)
    r1 = load_quantized(two, layers=[1], tp_rank=1, tp_size=2)
    full = load_quantized(src, layers=[1])
    fq, f0, f1 = (x.blocks["1"].self_attn for x in (full, r0, r1))
    assert torch.equal(torch.cat([f0.q.weight, f1.q.weight]), fq.q.weight)  # column-parallel: output rows
    assert torch.equal(torch.cat([f0.o.weight, f1.o.weight], 1), fq.o.weight)  # row-parallel: input columns
    assert torch.equal(f0.o.bias, fq.o.bias) and not f1.o.bias.any()  # row bias once
    assert torch.equal(torch.cat([f0.norm_q.weight, f1.norm_q.weight]), fq.norm_q.weight)
    with pytest.raises(CheckpointError, match="reshard"):
        load_quantized(two, layers=[1])  # tp 1 asked of a tp-2 folder
    code, _, err = cli("reshard", str(two), "--tp", "1")  # in place, back to one rank
    assert code == 0, err
    assert sorted(p.name for p in two.glob("block_*")) == [f"block_00{i}.safetensors" for i in range(4)]
    assert files_of(two) == files_of(src)


def test_tampered_file_fails_to_load(quantized, tmp_path):
    import shutil

    folder = tmp_path / "q"
    shutil.copytree(quantized["fp8"], folder)
    path = folder / "block_002.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    load_quantized(folder, layers=[0, 1])  # files it does not read are not its concern
    with pytest.raises(CheckpointError, match=r"block_002\.safetensors.*sha256.*re-run `lowvram quantize`"):
        load_quantized(folder)


def test_tp2_folder_runs_in_the_parallel_engine(quantized, tmp_path, cfg, samples):
    """The TP split of the files is the one the parallel runtime expects: a tp=2 run (two gloo ranks, each
    reading only its own files) gives the tp=1 quantized latents up to the per-rank activation quantization."""
    engine = pytest.importorskip("lowvram.parallel.engine")
    from lowvram.parallel.launch import spawn
    from lowvram.parallel.worker import WorkerSpec, run_worker

    two = tmp_path / "tp2"
    reshard(quantized["int8"], 2, two)
    s = samples[1]
    inputs = engine.StreamInputs(context=s.context, ref_latents=s.ref_latents, motion_latents=s.motion_latents,
                                 audio=s.blocks[0][1], num_blocks=1, seed=7, latent_hw=s.latent_hw)
    torch.save(inputs, tmp_path / "inputs.pt")
    got = {}
    engine.StageRunner(load_quantized(quantized["int8"]), engine.Topology(), inputs,
                       on_latent=lambda b, x: got.__setitem__(b, x)).run()
    spec = WorkerSpec(source=str(two), cfg=cfg.to_dict(), tp=2, pp=1, stages=[list(range(cfg.num_layers))],
                      inputs_path=str(tmp_path / "inputs.pt"), quantized=True)
    tp2 = {}
    spawn(run_worker, (spec,), 2, "gloo",
          lambda kind, rank, p: tp2.__setitem__(p[0], torch.from_numpy(p[1])) if kind == "latent" else None)
    err = rel(tp2[0], got[0])
    print(f"int8 tp2 vs tp1: {err:.4f}")
    assert err < 0.02
