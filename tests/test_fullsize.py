"""The full-size random checkpoint: its specs against the real manifests (no 47 GB written), the lay-out-then-fill
writers, a tiny real write every loader accepts, and the GPU cap that emulates a smaller card."""

import json
import math
import types

import pytest
import torch
from fixtures import reference_dir, run_cli

from lowvram import runtime
from lowvram import synthetic as S
from lowvram import synthetic_models as SM
from lowvram.conditioning.text import T5Config
from lowvram.conditioning.vae import VAEConfig
from lowvram.errors import InputError
from lowvram.model.config import s2v_14b
from lowvram.tensor_writer import write_pth, write_safetensors


def manifest(name: str) -> dict:
    return json.loads((reference_dir() / name).read_text())


def nbytes(specs) -> int:
    return sum(math.prod(s) * d.itemsize for _, s, d in specs)


def test_full_size_specs_match_the_reference_manifests():
    sizes = SM.full_sizes()
    dit = manifest("dit_keys_s2v_14b.json")
    specs = S.dit_specs(sizes.dit)
    assert [(k, list(s)) for k, s, _ in specs] == [(k, v["shape"]) for k, v in dit["keys"].items()]
    assert {d for _, _, d in specs} == {torch.bfloat16} and len(specs) == dit["num_tensors"] == 1260
    assert nbytes(specs) == dit["bytes_bf16"]
    shards = S.shard_layout(specs, sizes.shards, S.DIFFUSERS_MAX_SHARD_BYTES)
    assert [name for name, _ in shards] == [S.shard_name(i, 4) for i in range(4)]
    assert sum(len(group) for _, group in shards) == 1260

    lora = S.lora_specs(sizes.dit, sizes.lora_rank)
    assert len(lora) == 896 and sum(math.prod(s) for _, s, _ in lora) == 676_331_520
    by_key = {k: s for k, s, _ in lora}
    assert by_key["base_model.model.blocks.17.cross_attn.v.lora_A.default.weight"] == (128, 5120)
    assert by_key["base_model.model.blocks.3.ffn.0.lora_B.default.weight"] == (13824, 128)
    assert by_key["base_model.model.blocks.3.ffn.2.lora_A.default.weight"] == (128, 13824)
    assert by_key["base_model.model.audio_injector.injector.11.o.lora_B.default.weight"] == (5120, 128)

    t5 = manifest("t5_keys_umt5xxl.json")
    specs = SM.t5_specs(sizes.t5, sizes.t5_dtype)
    assert [(k, list(s)) for k, s, _ in specs] == [(k, v["shape"]) for k, v in t5["keys"].items()]
    assert nbytes(specs) == t5["bytes_bf16"] and len(specs) == 242

    vae = manifest("vae_keys_wan21.json")
    specs = SM.vae_specs(sizes.vae)
    assert [(k, list(s)) for k, s, _ in specs] == [(k, v["shape"]) for k, v in vae["keys"].items()]
    assert nbytes(specs) == vae["bytes_fp32"] and len(specs) == 194

    w2v = SM.wav2vec_config(sizes.wav2vec)
    assert (w2v.hidden_size, w2v.num_hidden_layers + 1) == (sizes.dit.audio_dim, sizes.dit.audio_layers) == (1024, 25)
    assert w2v.do_stable_layer_norm and w2v.conv_bias and w2v.feat_extract_norm == "layer"
    planned = SM.planned_bytes(sizes)
    assert planned["dit"] == dit["bytes_bf16"] + 1_352_663_040
    assert 13.0e9 < planned["rest"] < 13.3e9  # umT5 11.36 + VAE 0.51 + wav2vec2-large 1.26 GB
    assert sizes.dit == s2v_14b()


def test_files_are_laid_out_then_filled_one_tensor_at_a_time(tmp_path):
    specs = [("w", (3, 5), torch.bfloat16), ("b", (7,), torch.float32), ("e", (2, 2, 2), torch.bfloat16)]
    drawn = {k: torch.randn(s) for k, s, _ in specs}
    made = []

    def make(key):
        made.append(key)
        return drawn[key]

    write_pth(tmp_path / "x.pth", specs, make)
    write_safetensors(tmp_path / "x.safetensors", specs, make)
    assert made == ["w", "b", "e"] * 2
    from safetensors.torch import load_file

    for loaded in (torch.load(tmp_path / "x.pth", map_location="cpu", weights_only=True, mmap=True),
                   load_file(tmp_path / "x.safetensors")):
        assert list(loaded) == ["w", "b", "e"] or sorted(loaded) == ["b", "e", "w"]
        for k, _, dtype in specs:
            assert loaded[k].dtype == dtype and torch.equal(loaded[k], drawn[k].to(dtype))
    with pytest.raises(ValueError, match="layout has"):
        write_safetensors(tmp_path / "bad.safetensors", specs, lambda k: torch.zeros(1))


def test_tiny_model_folder_loads_everywhere(tmp_path):
    from lowvram.conditioning.audio import Wav2Vec2Encoder
    from lowvram.conditioning.text import TextEncoder
    from lowvram.conditioning.vae import WanVAE

    sizes = SM.tiny_sizes()
    report = SM.write_model_folder(tmp_path / "rest", sizes, dit_dir=tmp_path / "dit")
    assert [p["part"] for p in report["parts"]] == ["DiT + LoRA", "umT5 encoder + tokenizer", "Wan2.1 VAE", "wav2vec2"]
    dit = tmp_path / "dit"
    code, out, err = run_cli("inspect", str(dit), "--lora", str(dit / "liveavatar.safetensors"), "--json")
    assert code == 0, err
    assert json.loads(out)["complete"] and json.loads(out)["lora"]["rank"] == sizes.lora_rank
    encoder = TextEncoder(dit / runtime.T5_FILE, cache_dir=False, dtype="float32")  # tokenizer beside it (a link)
    assert len(encoder.tokenizer) == sizes.t5.vocab_size
    context = encoder.encode("a baker talks in a warm bakery")
    assert context.shape[1] == sizes.dit.text_dim and torch.isfinite(context).all()
    assert WanVAE.load(dit / runtime.VAE_FILE).config.dim == sizes.vae.dim
    assert Wav2Vec2Encoder(dit / runtime.WAV2VEC_DIR).num_states == sizes.dit.audio_layers


def test_the_quantizer_gpu_cap_makes_a_smaller_card(monkeypatch):
    from lowvram.quantize import pipeline

    total = 139 * 1024**3
    calls = []
    fake = types.SimpleNamespace(
        is_available=lambda: True, get_device_properties=lambda d: types.SimpleNamespace(total_memory=total),
        set_per_process_memory_fraction=lambda fraction, d: calls.append((round(fraction * total), str(d))))
    monkeypatch.setattr(pipeline.torch, "cuda", fake)
    monkeypatch.setattr("lowvram.parallel.launch.torch.cuda", fake)
    monkeypatch.delenv(pipeline.GPU_CAP_ENV, raising=False)
    pipeline._apply_gpu_cap(runtime.torch.device("cuda", 0))
    assert calls == []
    monkeypatch.setenv(pipeline.GPU_CAP_ENV, "24")
    pipeline._apply_gpu_cap(runtime.torch.device("cuda", 0))
    pipeline._apply_gpu_cap(runtime.torch.device("cpu"))
    assert calls == [(24 * 1024**3, "cuda:0")]
    monkeypatch.setenv(pipeline.GPU_CAP_ENV, "lots")
    with pytest.raises(InputError, match="GiB"):
        pipeline._apply_gpu_cap(runtime.torch.device("cuda", 0))

