"""umT5 text encoder (lowvram.conditioning.text) against the tiny_t5 fixture, plus loading, errors and the cache.

Cases are the case_*.safetensors files listed in tiny_t5/config.json. The weights are written to a
real-layout .pth (upstream key names, torch.save) and loaded through the same path as the real file.
"""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

from fixtures import reference_dir
from lowvram.conditioning.text import (
    EOS_ID, PAD_ID, T5Config, TextEncoder, clean_prompt, convert_t5_state_dict, encoder_forward, hf_keys,
    load_t5_encoder, pad_context,
)
from lowvram.conditioning.t5_memory import t5_memory_bytes
from lowvram.errors import CheckpointError, InputError

TOL = 1e-5  # tiny_t5/README.md: suggested acceptance max-abs <= 1e-5 on `context`
FIXTURE = reference_dir() / "tiny_t5"


def fixture_config():
    return json.loads((FIXTURE / "config.json").read_text())


def case_names():
    if not (FIXTURE / "config.json").exists():
        return []
    return sorted(n[: -len(".safetensors")] for n in fixture_config()["files"] if n.startswith("case_"))


def block_cases():
    """Cases whose file lists per-block residual outputs (block{i}_out_full)."""
    if not (FIXTURE / "config.json").exists():
        return []
    files = fixture_config()["files"]
    return [c for c in case_names() if any(k.startswith("block") for k in files[f"{c}.safetensors"])]


def max_err(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.detach().float().cpu() - b.detach().float().cpu()).abs().max().item()


@pytest.fixture(scope="module")
def cfg():
    return T5Config.from_fixture(fixture_config())


@pytest.fixture(scope="module")
def tiny_pth(tmp_path_factory):
    """The fixture weights saved the way the real checkpoint is: a plain state dict, upstream names."""
    path = tmp_path_factory.mktemp("t5") / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(load_file(FIXTURE / "weights.safetensors"), path)
    return path


@pytest.fixture(scope="module")
def model(tiny_pth, cfg):
    return load_t5_encoder(tiny_pth, cfg, dtype=torch.float32)


def make_tokenizer(folder):
    """A small umT5-layout tokenizer (pad 0, EOS 1 appended) saved as a local folder for AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = 'a man woman talking to the camera . he she smiles "quoted" & café'.split()
    vocab = {"<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS_ID)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(folder))
    return folder


# --------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", case_names())
def test_context_matches_fixture(case, model, cfg, tiny_pth, tmp_path):
    d = load_file(FIXTURE / f"{case}.safetensors")
    full = encoder_forward(model, d["input_ids"], d["attention_mask"])
    assert max_err(full, d["encoder_out_full"]) <= TOL
    # The pipeline's path: TextEncoder.encode_ids trims to the L masked-in rows.
    enc = TextEncoder(tiny_pth, tokenizer=None, config=cfg, dtype="fp32", cache_dir=False)
    enc._model = model
    context = enc.encode_ids(d["input_ids"], d["attention_mask"])
    assert context.shape == d["context"].shape
    assert context.shape[0] == fixture_config()["cases"][case]["valid_tokens"]
    assert max_err(context, d["context"]) <= TOL
    assert pad_context(context, cfg.text_len).shape == (cfg.text_len, cfg.dim)


@pytest.mark.parametrize("case", block_cases())
def test_block_outputs(case, model):
    d = load_file(FIXTURE / f"{case}.safetensors")
    keys = sorted(k for k in d if k.startswith("block") and k.endswith("_out_full"))
    seen = {}
    hooks = [blk.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o[0] if isinstance(o, tuple) else o))
             for n, blk in enumerate(model.encoder.block)]
    try:
        encoder_forward(model, d["input_ids"], d["attention_mask"])
    finally:
        for h in hooks:
            h.remove()
    for k in keys:
        assert max_err(seen[int(k[len("block"):].split("_")[0])], d[k]) <= TOL, k


def test_embedding_on_another_device(tiny_pth, cfg, model):
    # The 2.1 GB token embedding can stay on the CPU while the blocks run elsewhere (same result).
    split = load_t5_encoder(tiny_pth, cfg, dtype=torch.float32, device="cpu", embed_device="cpu")
    d = load_file(FIXTURE / f"{case_names()[0]}.safetensors")
    a = encoder_forward(split, d["input_ids"], d["attention_mask"], embed_device=torch.device("cpu"))
    assert torch.equal(a, encoder_forward(model, d["input_ids"], d["attention_mask"]))


def test_relative_position_buckets(model):
    b = load_file(FIXTURE / "buckets.safetensors")
    attn = model.encoder.block[0].layer[0].SelfAttention
    assert torch.equal(attn._relative_position_bucket(b["relative_position"]), b["bucket"])


def test_bf16_close_to_fp32_fixture(tiny_pth, cfg):
    # README §5: the bf16 encoder differs from the float32 fixture by ~0.045 max-abs (values up to ~6).
    m16 = load_t5_encoder(tiny_pth, cfg, dtype=torch.bfloat16)
    assert m16.shared.weight.dtype == torch.bfloat16
    assert m16.encoder.embed_tokens.weight is m16.shared.weight  # tied, stored once
    case = case_names()[0]
    d = load_file(FIXTURE / f"{case}.safetensors")
    out = encoder_forward(m16, d["input_ids"], d["attention_mask"])
    assert out.dtype == torch.bfloat16
    assert max_err(out, d["encoder_out_full"]) < 0.1


# --------------------------------------------------------------------------------------------- cleaning, keys


def test_clean_examples():
    ex = json.loads((FIXTURE / "clean_examples.json").read_text())["examples"]
    assert ex
    for e in ex:
        assert clean_prompt(e["raw"]) == e["cleaned"], e["raw"]


def test_key_map_matches_fixture():
    for up, hf in fixture_config()["hf_key_map"]:
        got = hf_keys(up.replace("{i}", "0"))
        want = [k.strip() for k in hf.split("(")[0].replace(" AND ", ",").split(",")]
        assert got == [w.replace("{i}", "0") for w in want], up


def test_xxl_config_matches_real_manifest():
    man = json.loads((reference_dir() / "t5_keys_umt5xxl.json").read_text())
    cfg = T5Config.xxl()
    shapes = cfg.upstream_shapes()
    assert len(shapes) == man["num_tensors"] == 242
    assert {k: list(v) for k, v in shapes.items()} == {k: v["shape"] for k, v in man["keys"].items()}
    assert cfg.num_params == man["num_params"]
    # every real key has a transformers name, and the renamed set is exactly UMT5EncoderModel's
    from transformers import UMT5EncoderModel

    with torch.device("meta"):
        hf = UMT5EncoderModel(cfg.hf_config())
    fake = {k: torch.empty(0) for k in shapes}
    assert sorted(convert_t5_state_dict(fake)) == sorted(hf.state_dict())


def test_memory_figures():
    xxl = T5Config.xxl()
    bf16 = t5_memory_bytes(xxl)
    assert bf16["weights"] == 5_680_910_336 * 2
    int8, nf4 = t5_memory_bytes(xxl, "int8"), t5_memory_bytes(xxl, "nf4")
    assert 6.5e9 < int8["weights"] < 6.9e9  # spec §8.1: ~6.7 GB (int8 layers + bf16 embedding)
    assert 4.2e9 < nf4["weights"] < 4.6e9  # spec §8.1: ~4.4 GB
    assert bf16["peak"] > bf16["weights"] > int8["weights"] > nf4["weights"]


# --------------------------------------------------------------------------------------------- loading & errors


def test_real_layout_pth_config_inferred(tiny_pth, cfg, model):
    inferred = load_t5_encoder(tiny_pth, None, dtype=torch.float32)
    assert inferred.config.d_model == cfg.dim and inferred.config.num_layers == cfg.num_layers
    for (k, a), b in zip(model.state_dict().items(), inferred.state_dict().values()):
        assert torch.equal(a, b), k


def test_truncated_pth_is_checkpoint_error(tiny_pth, tmp_path):
    bad = tmp_path / "truncated.pth"
    data = tiny_pth.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_t5_encoder(bad)
    msg = str(e.value)
    assert str(bad) in msg and "\n" not in msg and "download" in msg


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["missing", "garbage", "empty", "pickle", "wrong_keys", "wrong_shape"])
def test_bad_checkpoints(kind, tmp_path, tiny_pth, cfg):
    p = tmp_path / "t5.pth"
    if kind == "garbage":
        p.write_bytes(b"\x00not a checkpoint" * 100)
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "pickle":  # an arbitrary pickled object must be refused (weights_only), never executed
        p.write_bytes(pickle.dumps({"token_embedding.weight": object()}))
    elif kind == "wrong_keys":
        torch.save({"encoder.conv1.weight": torch.zeros(2)}, p)
    elif kind == "wrong_shape":
        sd = load_file(FIXTURE / "weights.safetensors")
        sd["blocks.0.attn.q.weight"] = torch.zeros(3, 3)
        torch.save(sd, p)
    with pytest.raises(CheckpointError) as e:
        load_t5_encoder(p, cfg if kind == "wrong_shape" else None)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_quantization_needs_bitsandbytes(tiny_pth, cfg):
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    with pytest.raises(InputError, match="pip install bitsandbytes"):
        load_t5_encoder(tiny_pth, cfg, quantization="int8")


def test_bad_options(tiny_pth, cfg):
    with pytest.raises(InputError):
        TextEncoder(tiny_pth, config=cfg, quantization="int3")
    with pytest.raises(InputError):
        TextEncoder(tiny_pth, config=cfg, dtype="fp8")
    with pytest.raises(InputError):
        clean_prompt(123)


# --------------------------------------------------------------------------------------------- tokenizer + cache


def test_prompt_tokenize_encode_and_cache(tiny_pth, cfg, model, tmp_path):
    tok = make_tokenizer(tmp_path / "google" / "umt5-xxl")
    cache = tmp_path / "cache"
    prompt = "A man  talking\tto the camera.\n\nHe smiles."
    enc = TextEncoder(tiny_pth, tokenizer=tok, config=cfg, dtype="fp32", cache_dir=cache)
    ids, mask = enc.tokenize(prompt)
    assert ids.shape == mask.shape == (1, cfg.text_len)
    L = int(mask.sum())
    assert ids[0, L - 1] == EOS_ID and (ids[0, L:] == PAD_ID).all() and (mask[0, :L] == 1).all()
    first = enc.encode(prompt)
    assert enc.loads == 1 and enc.cache.misses == 1 and enc.cache.hits == 0
    assert first.shape == (L, cfg.dim)
    ref = encoder_forward(model, ids, mask)[0, :L]
    assert max_err(first, ref) == 0.0

    # Second call, fresh encoder object (as in a new run): served from disk, model never loaded.
    again = TextEncoder(tiny_pth, tokenizer=tok, config=cfg, dtype="fp32", cache_dir=cache)
    second = again.encode(prompt)
    assert again.cache.hits == 1 and again.loads == 0 and again._model is None
    assert torch.equal(first, second)
    # The same prompt in the same object: a hit too; another prompt: a miss.
    enc.encode(prompt)
    assert enc.cache.hits == 1
    enc.encode("a woman smiles")
    assert enc.cache.misses == 2
    # Another dtype is another cache entry.
    bf = TextEncoder(tiny_pth, tokenizer=tok, config=cfg, dtype="bf16", cache_dir=cache)
    assert bf.encode(prompt).dtype == torch.bfloat16 and bf.cache.misses == 1


def test_missing_tokenizer_folder(tiny_pth, cfg, tmp_path):
    enc = TextEncoder(tiny_pth, tokenizer=tmp_path / "nope", config=cfg, cache_dir=False)
    with pytest.raises(CheckpointError, match="tokenizer"):
        enc.encode("hello")


def test_missing_checkpoint_with_cache(tmp_path, cfg):
    enc = TextEncoder(tmp_path / "absent.pth", tokenizer=None, config=cfg, cache_dir=tmp_path / "c")
    with pytest.raises(CheckpointError, match="absent.pth"):
        enc.encode_ids(torch.ones(1, cfg.text_len, dtype=torch.long), torch.ones(1, cfg.text_len, dtype=torch.long))
