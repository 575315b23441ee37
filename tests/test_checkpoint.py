"""lowvram.checkpoint and lowvram.synthetic: headers, identification, streaming loads, the LoRA merge, peak RSS."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lowvram import checkpoint as C
from lowvram import synthetic as S
from lowvram.errors import CheckpointError
from lowvram.model.config import s2v_14b, tiny
from lowvram.model.dit import LiveAvatarDiT

REPO = Path(__file__).resolve().parents[1]
MANIFEST = Path(__file__).parent / "reference" / "dit_keys_s2v_14b.json"
S2V_PARAMS = 16_295_755_609
RANK = 8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random-weight checkpoint in the real layout: 3 shards + index + config.json + LoRA."""
    return S.write_checkpoint(tmp_path_factory.mktemp("tiny"), tiny(), seed=3, shards=3, lora=True, lora_rank=RANK)


def file_tensors(written):
    out = {}
    for shard in written.shards:
        out.update(load_file(str(shard)))
    return out


def lora_pairs(path):
    """module -> (A, B) from a LoRA file, by direct reading (independent of read_lora)."""
    raw = load_file(str(path))
    pairs = {}
    for key, t in raw.items():
        name = key.removeprefix(C.LORA_PREFIX)
        module, ab = name.split(".lora_")
        pairs.setdefault(module, {})[ab[0]] = t
    return {m: (p["A"], p["B"]) for m, p in pairs.items()}


def merged(w, a, b, alpha, rank):
    """The upstream arithmetic, written out: W = to_dtype(float32(W) + (float32(B) @ float32(A)) * (alpha / r))."""
    return (w.float() + (b.float() @ a.float()) * (alpha / rank)).to(w.dtype)


# ---------------------------------------------------------------------------------------------------------
# The model's key set


def test_meta_model_reproduces_the_reference_manifest():
    manifest = json.loads(MANIFEST.read_text())["keys"]
    with torch.device("meta"):
        model = LiveAvatarDiT(s2v_14b())
    sd = model.state_dict()
    assert set(sd) == set(manifest)
    assert {k: list(v.shape) for k, v in sd.items()} == {k: v["shape"] for k, v in manifest.items()}
    assert len(sd) == 1260
    assert sum(v.numel() for v in sd.values()) == S2V_PARAMS
    # the fast builder (initialisation skipped) and expected_shapes give the same layout
    assert C.expected_shapes(s2v_14b()) == {k: tuple(v["shape"]) for k, v in manifest.items()}
    fast = C.build_meta_model(s2v_14b())
    assert all(p.is_meta for p in fast.parameters())
    assert len(C.lora_target_modules(s2v_14b())) == 448
    linear = C.linear_weight_keys(s2v_14b())
    assert linear == {k for k, v in manifest.items() if v["owner_torch_base"] == "Linear" and k.endswith(".weight")}


def test_format_sizes_are_what_the_quantized_modules_allocate():
    from lowvram.inspection import format_bytes
    from lowvram.kernels import linear as K

    sizes = format_bytes(s2v_14b())
    assert sizes["bf16"] == 32_591_511_218
    assert round(sizes["fp8"] / 1e9, 2) == 16.66  # liveavatar-model.md §0: upstream's fp8 DiT is 16.65 GB
    assert sizes["fp8"] < sizes["int8"] < sizes["fp8"] + 0.02e9  # int8 adds its SmoothQuant factors
    assert round(sizes["int4"] / 1e9, 2) == 9.18
    # on the tiny model: exactly the bytes of every parameter and buffer once the Linears are swapped
    for fmt, expected in format_bytes(tiny()).items():
        model = C.build_meta_model(tiny()).to(torch.bfloat16)
        K.empty_quantized_(model, K.default_recipe(model, fmt))
        assert sum(t.numel() * t.element_size() for t in model.state_dict().values()) == expected, fmt


# ---------------------------------------------------------------------------------------------------------
# Headers and the index


def test_index_of_the_real_layout(ckpt):
    assert ckpt.index is not None and len(ckpt.shards) == 3
    index = C.checkpoint_index(ckpt.path)
    assert set(index) == set(C.expected_shapes(tiny()))
    assert {e.file for e in index.values()} == set(ckpt.shards)
    weight_map = json.loads(ckpt.index.read_text())["weight_map"]
    assert {k: e.file.name for k, e in index.items()} == weight_map
    for shard in ckpt.shards:
        header = C.read_header(shard)
        with safe_open(str(shard), framework="pt") as f:
            assert sorted(header.tensors) == sorted(f.keys())
            for key in f.keys():
                entry = header.tensors[key]
                ref = f.get_tensor(key)
                assert entry.shape == tuple(ref.shape) and entry.dtype == ref.dtype
                assert torch.equal(C.read_tensor(entry), ref)
    assert C.checkpoint_index(ckpt.index).keys() == index.keys()  # the index json itself works as the path


def test_identify_and_check_keys(ckpt):
    index = C.checkpoint_index(ckpt.path)
    cfg = C.identify(index)
    assert cfg.name == "tiny" and cfg == tiny()
    report = C.check_keys(index, cfg)
    assert report == ([], [], []) and report.complete
    # without config.json the sizes still come from the shapes
    shapes = {k: e.shape for k, e in index.items()}
    derived = C.identify(shapes, config=None)
    assert derived.dim == 128 and derived.num_layers == 4 and len(derived.audio_inject_layers) == 2
    # a wrong shape and a missing key are reported
    shapes["blocks.0.ffn.0.weight"] = (7, 128)
    del shapes["head.head.weight"]
    shapes["extra.weight"] = (1,)
    missing, unexpected, mismatched = C.check_keys(shapes, tiny())
    assert missing == ["head.head.weight"] and unexpected == ["extra.weight"]
    assert mismatched == [("blocks.0.ffn.0.weight", (256, 128), (7, 128))]


def test_identify_full_size_and_sparse_files_are_valid(tmp_path):
    written = S.write_sparse_checkpoint(tmp_path, lora=True)
    assert [p.name for p in written.shards] == [S.shard_name(i, 4) for i in range(4)]
    used = sum(p.stat().st_blocks * 512 for p in tmp_path.iterdir())
    assert used < 20e6, f"sparse checkpoint uses {used} bytes of disk"
    index = C.checkpoint_index(tmp_path)
    assert C.identify(index).name == "s2v-14b"
    assert sum(e.numel for e in index.values()) == S2V_PARAMS
    with safe_open(str(written.shards[-1]), framework="pt") as f:  # safetensors accepts our headers
        key = next(iter(f.keys()))
        assert tuple(f.get_slice(key).get_shape()) == index[key].shape
    lora = C.read_lora(written.lora, s2v_14b())
    assert (lora.rank, lora.alpha, lora.scale, len(lora.targets), lora.params) == (128, 64.0, 0.5, 448, 676_331_520)


def test_single_file_layout(tmp_path):
    written = S.write_checkpoint(tmp_path, tiny(), seed=1, shards=1, lora=False)
    assert written.index is None and [p.name for p in written.shards] == [C.SINGLE_NAME]
    assert set(C.checkpoint_index(tmp_path)) == set(C.checkpoint_index(written.shards[0]))
    state = C.load_state_dict_streaming(written.shards[0], None, dtype=None)
    assert all(torch.equal(state[k], v) for k, v in load_file(str(written.shards[0])).items())


def test_weights_are_scaled_like_trained_ones(ckpt):
    state = file_tensors(ckpt)
    q = state["blocks.0.self_attn.q.weight"].float()
    assert abs(q.std().item() - 1 / math.sqrt(128)) < 0.01
    assert abs(state["blocks.0.norm3.weight"].float().mean().item() - 1) < 0.05
    assert state["blocks.0.modulation"].float().abs().max() < 0.2
    assert state["blocks.0.ffn.0.bias"].float().abs().max() < 0.2


# ---------------------------------------------------------------------------------------------------------
# Streaming load + LoRA merge


def test_streaming_load_equals_files_with_lora_merged_exactly(ckpt):
    files = file_tensors(ckpt)
    pairs = lora_pairs(ckpt.lora)
    assert len(pairs) == 48
    model = C.build_meta_model(tiny())
    out = C.load_state_dict_streaming(ckpt.path, model, dtype=torch.bfloat16, lora=ckpt.lora)
    assert out is model
    sd = model.state_dict()
    assert set(sd) == set(files)
    changed = 0
    for key, value in sd.items():
        assert not value.is_meta and value.dtype == torch.bfloat16
        assert value.data_ptr() % 16 == 0  # own aligned memory, not a view at a file offset
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and module in pairs:
            a, b = pairs[module]
            expected = merged(files[key], a, b, 64.0, RANK)
            changed += not torch.equal(expected, files[key])
        else:
            expected = files[key]
        assert torch.equal(value, expected), key
    assert changed == 48  # every targeted weight was really changed by the merge
    # peft's in-place merge of a bf16 weight (W += delta, delta float32) gives the same bits
    key = "blocks.2.cross_attn.v.weight"
    a, b = pairs["blocks.2.cross_attn.v"]
    w = files[key].clone()
    w += (b.float() @ a.float()) * (64.0 / RANK)
    assert torch.equal(sd[key], w)


def test_streaming_load_fp32_keys_filter_and_alpha(ckpt):
    files = file_tensors(ckpt)
    pairs = lora_pairs(ckpt.lora)
    state = C.load_state_dict_streaming(ckpt.path, None, dtype=torch.float32, lora=ckpt.lora,
                                        key_filter="blocks.1.", lora_alpha=32.0)
    assert set(state) == {k for k in files if k.startswith("blocks.1.")}
    for key, value in state.items():
        assert value.dtype == torch.float32
        module = key.removesuffix(".weight")
        w = files[key]  # merged at the file's bf16 (upstream's model), then cast
        expected = (merged(w, *pairs[module], 32.0, RANK) if module in pairs else w).float()
        assert torch.equal(value, expected), key
    # a pipeline stage: only its layers, loaded by their real names; nothing left on meta
    stage = C.build_meta_model(tiny(), layers=range(2, 4), embeddings=False, head=False)
    C.load_state_dict_streaming(ckpt.path, stage, dtype=torch.bfloat16)
    assert all(not p.is_meta for p in stage.parameters())
    assert torch.equal(stage.blocks["3"].ffn[2].weight, files["blocks.3.ffn.2.weight"])
    # explicit keys
    some = C.load_state_dict_streaming(ckpt.path, ["head.head.weight"], dtype=None)
    assert list(some) == ["head.head.weight"] and torch.equal(some["head.head.weight"], files["head.head.weight"])


def test_load_errors(ckpt, tmp_path):
    model = C.build_meta_model(tiny(num_layers=5, audio_inject_layers=(0, 2)))
    with pytest.raises(CheckpointError, match="missing .*blocks.4"):
        C.load_state_dict_streaming(ckpt.path, model)
    wrong = C.build_meta_model(tiny(ffn_dim=512))
    with pytest.raises(CheckpointError, match="shape"):
        C.load_state_dict_streaming(ckpt.path, wrong)


# ---------------------------------------------------------------------------------------------------------
# LoRA files


def test_lora_header_and_prefix_rule(ckpt, tmp_path):
    lora = C.read_lora(ckpt.lora, tiny())
    assert (lora.rank, lora.alpha, lora.scale, len(lora.targets), lora.num_tensors) == (RANK, 64.0, 8.0, 48, 96)
    assert C.read_lora(ckpt.lora, tiny(), alpha=16).scale == 2.0
    # merge() on its own: not in place unless asked, the upstream formula either way
    key, files, pairs = "blocks.1.ffn.0.weight", file_tensors(ckpt), lora_pairs(ckpt.lora)
    w = files[key].clone()
    expected = merged(files[key], *pairs["blocks.1.ffn.0"], 64.0, RANK)
    assert torch.equal(lora.merge(key, w), expected) and torch.equal(w, files[key])
    assert lora.merge(key, w, inplace=True) is w and torch.equal(w, expected)
    assert lora.merge("blocks.1.ffn.0.bias", files["blocks.1.ffn.0.bias"]) is files["blocks.1.ffn.0.bias"]
    # unprefixed names: the prefix is prepended to every key
    raw = load_file(str(ckpt.lora))
    bare = {k.removeprefix(C.LORA_PREFIX): v for k, v in raw.items()}
    save_file(bare, str(tmp_path / "bare.safetensors"))
    assert C.read_lora(tmp_path / "bare.safetensors", tiny()).targets.keys() == lora.targets.keys()
    # a mix: the first key is prefixed, so an unprefixed key matches nothing (upstream ignores it, then merges
    # its partner with a randomly initialised lora_A) -> refused
    mixed = dict(raw)
    mixed["blocks.0.self_attn.q.lora_A.default.weight"] = mixed.pop(
        "base_model.model.blocks.0.self_attn.q.lora_A.default.weight")
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(CheckpointError, match="no lora_A partner"):
        C.read_lora(tmp_path / "mixed.safetensors", tiny())
    # non-LoRA tensors that name a model parameter overwrite it before the merge (upstream strict=False)
    override = dict(raw)
    override["base_model.model.blocks.0.norm3.weight"] = torch.full((128,), 2.0, dtype=torch.bfloat16)
    save_file(override, str(tmp_path / "override.safetensors"))
    state = C.load_state_dict_streaming(ckpt.path, None, lora=tmp_path / "override.safetensors",
                                        key_filter="blocks.0.norm3.")
    assert torch.equal(state["blocks.0.norm3.weight"], torch.full((128,), 2.0, dtype=torch.bfloat16))


def test_lora_rejections(ckpt, tmp_path):
    raw = load_file(str(ckpt.lora))
    # peft save_pretrained names (no adapter name) are not loaded upstream -> refused here
    plain = {k.replace(".default.weight", ".weight"): v for k, v in raw.items()}
    save_file(plain, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a LiveAvatar LoRA"):
        C.read_lora(tmp_path / "plain.safetensors", tiny())
    # a LoRA for another model size: the first bad key and the expected shape are named
    other = S.write_lora(tmp_path / "other.safetensors", tiny(dim=64, ffn_dim=128), rank=RANK)
    first_bad = r"audio_injector.injector.0.k.lora_A.default.weight.*expected \[8, 128\]"
    with pytest.raises(CheckpointError, match=first_bad):
        C.read_lora(other, tiny())


# ---------------------------------------------------------------------------------------------------------
# Pickles


def test_pickle_refused_unless_allowed(ckpt, tmp_path):
    files = file_tensors(ckpt)
    path = tmp_path / "diffusion_pytorch_model.pth"
    torch.save(files, path)
    with pytest.raises(C.PickleRefusedError, match="pickle.*convert it"):  # only inspect's CLI adds --allow-pickle
        C.checkpoint_index(path)
    with pytest.raises(CheckpointError, match="pickle"):
        C.checkpoint_index(tmp_path)
    index = C.checkpoint_index(path, allow_pickle=True)
    assert C.identify(index, config=S.config_json(tiny())).name == "tiny"
    state = C.load_state_dict_streaming(path, None, dtype=None, allow_pickle=True, key_filter="blocks.0.ffn")
    assert state and all(torch.equal(v, files[k]) for k, v in state.items())


# ---------------------------------------------------------------------------------------------------------
# Peak RSS (the >= 1 GB measurement is scripts/measure_load_rss.py, not run here)


def test_peak_rss_of_a_150mb_load_stays_near_the_result():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "measure_load_rss.py"), "--sizes", "medium",
                          "--json"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)
    assert 100e6 < row["result_bytes"] < 200e6
    assert row["growth"] < 1.5 * row["result_bytes"], row
