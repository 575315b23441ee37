"""One loader for every path: the run's stages, the quantizer's reads and the quantized folder's byte model agree;
the run path never imports the quantizer."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowvram.demo import demo_config
from lowvram.index import checkpoint_index
from lowvram.loader import load_state_dict_streaming
from lowvram.lora import LORA_PREFIX, read_lora
from lowvram.parallel.engine import Topology
from lowvram.parallel.stage import build_stage_from_checkpoint
from lowvram.parallel.tensor import tp_slice

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("lowvram.quantize", "lowvram.calibration")


def forbidden(module: str) -> bool:
    """The offline quantizer or calibration (lowvram.quantized, the runtime's loader, is not)."""
    return module.split(".")[0] in ("quantize", "calibration") or any(
        module == f or module.startswith(f + ".") for f in FORBIDDEN)

# Non-LoRA tensors of a LoRA file, which upstream's load_state_dict(strict=False) copies over the model: a plain
# parameter, the base weight of a targeted layer (merged afterwards; column-split under TP) and the bias of a
# row-parallel layer (rank 0 only under TP).
OVERRIDES = {"blocks.0.norm3.weight": "plain", "blocks.1.ffn.0.base_layer.weight": "base",
             "blocks.2.self_attn.o.base_layer.bias": "base"}


@pytest.fixture(scope="module")
def override_lora(tiny_ckpt, tmp_path_factory):
    root, lora = tiny_ckpt
    raw = load_file(str(lora))
    base = {k: e.shape for k, e in checkpoint_index(root).items()}
    g = torch.Generator().manual_seed(3)
    for key in OVERRIDES:
        shape = base[key.replace(".base_layer.", ".")]
        raw[LORA_PREFIX + key] = (torch.randn(shape, generator=g) * 0.1 + 1.0).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("lora") / "override.safetensors"
    save_file(raw, str(path))
    return path


def quantizer_weights(root, lora_path):
    """What `lowvram quantize` reads from the bf16 checkpoint: every layer and the nonblock part, LoRA merged."""
    from lowvram.quantize.calibrate import CheckpointSource

    cfg = demo_config()
    source = CheckpointSource(checkpoint_index(root), cfg, read_lora(lora_path, cfg))
    full = dict(source.nonblock().state_dict())
    for layer in range(cfg.num_layers):
        full.update(source.layer(layer).state_dict())
    return full


@pytest.mark.parametrize("tp", [1, 2])
def test_run_stages_and_the_quantizer_build_the_same_model(tiny_ckpt, override_lora, tp):
    root, _ = tiny_ckpt
    cfg = demo_config()
    full = quantizer_weights(root, override_lora)
    plain = load_state_dict_streaming(root, ["blocks.0.norm3.weight"])
    assert not torch.equal(full["blocks.0.norm3.weight"], plain["blocks.0.norm3.weight"])  # the override applies
    stages = [[0, 1], [2, 3]]
    for rank in range(tp * len(stages)):
        topo = Topology(rank=rank, world=tp * len(stages), tp=tp, pp=len(stages))
        stage = build_stage_from_checkpoint(root, cfg, topo, stages[topo.stage], dtype=torch.bfloat16,
                                            lora=override_lora)
        for key, value in stage.state_dict().items():
            assert torch.equal(value, tp_slice(key, full[key], topo.tp_rank, tp)), (rank, key)


def lowvram(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "lowvram.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def run_args(model, root, out, *extra):
    return ("run", model, "--ckpt-dir", root, "--image", root / "face.png", "--audio", root / "speech.wav",
            "--prompt", "a baker talks", "--size", "128*128", "--device", "cpu", "--seconds", "1", "-o", out,
            "--latents", out.with_suffix(".safetensors"), "--json", *extra)


def test_run_with_a_lora_equals_the_run_of_the_merged_checkpoint(tiny_ckpt, override_lora, tmp_path):
    root, _ = tiny_ckpt
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text((root / "config.json").read_text())
    save_file(load_state_dict_streaming(root, None, dtype=None, lora=override_lora),
              str(merged / "diffusion_pytorch_model.safetensors"))
    r = lowvram(*run_args(root, root, tmp_path / "lora.mp4", "--lora", override_lora))
    assert r.returncode == 0, r.stderr
    r = lowvram(*run_args(merged, root, tmp_path / "merged.mp4"))
    assert r.returncode == 0, r.stderr
    a, b = load_file(tmp_path / "lora.safetensors"), load_file(tmp_path / "merged.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def fp8_static_folder(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint quantized to fp8 with static per-step activation scales (the run selects them)."""
    from lowvram.calibration import synthetic_samples
    from lowvram.quantize import QuantizeOptions, quantize_checkpoint

    root, lora = tiny_ckpt
    out = tmp_path_factory.mktemp("q") / "fp8"
    quantize_checkpoint(QuantizeOptions(ckpt=root, out=out, samples=synthetic_samples(demo_config(), 1, blocks=1),
                                        fmt="fp8", act="static", lora=lora, device="cpu", evaluate=False,
                                        progress=False))
    return out


IMPORT_LOG_HOOK = '''import os, sys

def _log_lowvram_imports(event, args):
    if event == "import" and args[0].startswith("lowvram"):
        with open(os.environ["LOWVRAM_TEST_IMPORT_LOG"] + f".{os.getpid()}", "a") as f:
            f.write(args[0] + "\\n")

sys.addaudithook(_log_lowvram_imports)
'''


def test_the_run_path_imports_nothing_from_the_quantizer(tiny_ckpt, fp8_static_folder, tmp_path):
    """`lowvram run` on a quantized folder, in one process (it loads and runs the stage itself, as each --pp
    worker does), logs the lowvram modules it loads through an audit hook: none is the quantizer or the
    calibration."""
    root, _ = tiny_ckpt
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(IMPORT_LOG_HOOK)
    log = tmp_path / "imports"
    env = {**os.environ, "LOWVRAM_TEST_IMPORT_LOG": str(log),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "hook"), os.environ.get("PYTHONPATH")]))}
    r = lowvram(*run_args(fp8_static_folder, root, tmp_path / "q.mp4", "--pp", "1"), env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["layout"] == "tp1xpp1"
    (log_file,) = tmp_path.glob("imports.*")  # the hook ran, in the one process
    loaded = set(log_file.read_text().split())
    assert {"lowvram.runtime", "lowvram.quantized", "lowvram.parallel.engine", "lowvram.kernels.linear"} <= loaded
    assert sorted(m for m in loaded if forbidden(m)) == []


RUNTIME_SIDE = ["lowvram/model", "lowvram/parallel", "lowvram/kernels", "lowvram/runtime.py", "lowvram/manifest.py",
                "lowvram/quantized.py", "lowvram/loader.py", "lowvram/plan.py", "lowvram/placement.py", "lowvram/sink.py",
                "lowvram/memo.py", "lowvram/verified.py", "lowvram/session.py"]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            names |= {module} | {f"{module}.{a.name}" for a in node.names}
    return names


def test_no_runtime_module_imports_the_quantizer():
    files = [f for p in RUNTIME_SIDE for f in ((REPO / p).rglob("*.py") if (REPO / p).is_dir() else [REPO / p])]
    assert len(files) > 15
    found = {str(f.relative_to(REPO)): m for f in files for m in imported_modules(f)
             if forbidden(m)}
    assert found == {}


def test_planned_weight_bytes_are_the_quantized_files(fp8_static_folder):
    """The byte model `plan` uses (kernels.linear.weight_bytes for quantized Linears, bf16 for the rest) is the
    size of the tensors the folder stores, layer by layer."""
    from lowvram.headers import read_header
    from lowvram.manifest import NONBLOCK, block_file, read_manifest
    from lowvram.model.config import DiTConfig
    from lowvram.plan import layer_param_bytes

    manifest = read_manifest(fp8_static_folder)
    cfg = DiTConfig.from_dict(manifest["config"])
    per_layer, groups = layer_param_bytes(cfg, manifest["recipe"], manifest["format"])

    def stored(name):  # the per-step activation scales (num_steps + 1 floats a layer) are not weights
        tensors = read_header(fp8_static_folder / name).tensors
        assert any(k.endswith(".act_scales") for k in tensors) or name == NONBLOCK
        return sum(e.nbytes for k, e in tensors.items() if not k.endswith(".act_scales"))

    assert {i: stored(block_file(i)) for i in range(cfg.num_layers)} == per_layer
    assert stored(NONBLOCK) == sum(groups.values())
