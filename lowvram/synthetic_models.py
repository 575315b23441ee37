"""Random-weight conditioning models in the real layout (umT5 encoder + tokenizer, Wan2.1 VAE, wav2vec2) and
`write_model_folder`: every component of the download (with the DiT and LoRA of `synthetic.py`) at a `ModelSizes`,
the demo's tiny sizes or the real ones (`full_sizes()`, ~47 GB; `scripts/make_fullsize_checkpoint.py`)."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from lowvram.model.config import DiTConfig, s2v_14b
from lowvram.synthetic import (
    DIFFUSERS_MAX_SHARD_BYTES, WrittenCheckpoint, dit_specs, lora_specs, random_tensor, trained_kind, write_checkpoint,
)
from lowvram.tensor_writer import TensorSpec, write_pth


T5_BLOCK_ORDER = ("norm1.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight", "norm2.weight",
                  "ffn.gate.0.weight", "ffn.fc1.weight", "ffn.fc2.weight", "pos_embedding.embedding.weight")


def t5_specs(cfg, dtype: torch.dtype) -> list[TensorSpec]:
    """The umT5 encoder's tensors in upstream state-dict order (embedding, blocks, final norm)."""
    shapes = cfg.upstream_shapes()
    order = ["token_embedding.weight", *(f"blocks.{i}.{k}" for i in range(cfg.num_layers) for k in T5_BLOCK_ORDER),
             "norm.weight"]
    return [(k, tuple(shapes[k]), dtype) for k in order]


def t5_tensor(key: str, shape: Sequence[int], seed: int, device: str | torch.device = "cpu") -> torch.Tensor:
    t = random_tensor(key, shape, trained_kind(key, shape), seed, device)
    return t.mul_(8.0) if key == "token_embedding.weight" else t  # embeddings are not fan-in scaled


def write_text_encoder(root: Path, cfg, dtype: torch.dtype, seed: int = 1, device: str | torch.device = "cpu"
                       ) -> list[Path]:
    """`models_t5_umt5-xxl-enc-bf16.pth` (upstream key names) and the `google/umt5-xxl` tokenizer folder."""
    from lowvram.runtime import T5_FILE, TOKENIZER_DIR

    specs = t5_specs(cfg, dtype)
    shapes = {k: s for k, s, _ in specs}
    write_pth(root / T5_FILE, specs, lambda k: t5_tensor(k, shapes[k], seed, device))
    write_tokenizer(root / TOKENIZER_DIR, cfg.vocab_size)
    return [root / T5_FILE, root / TOKENIZER_DIR]


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A local fast Unigram tokenizer that `AutoTokenizer` loads: pieces learnt from a few scene sentences, padded
    with pieces that never match up to `vocab_size` (the encoder's embedding rows), pad 0, EOS 1 appended, unk 2."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    corpus = ["a person talking to the camera in a kitchen", "a baker with flour on his apron speaks warmly",
              "the blacksmith explains how steel is folded", "a fashion blogger reviews a new jacket",
              "grandmother shares a recipe while smiling", "music producer describes the drum pattern"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=min(200, vocab_size), special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>")
    tok.train_from_iterator(corpus * 20, trainer)
    pieces = [tuple(p) for p in json.loads(tok.to_str())["model"]["vocab"]]
    pieces += [(f"<unused_{i}>", -100.0) for i in range(vocab_size - len(pieces))]
    tok.model = models.Unigram(pieces, unk_id=2, byte_fallback=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast._tokenizer.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast.save_pretrained(str(folder))


def vae_specs(cfg) -> list[TensorSpec]:
    """`Wan2.1_VAE.pth`'s tensors in upstream state-dict order (encoder, conv1, conv2, decoder); float32, as the
    real file."""
    rank = {"encoder": 0, "conv1": 1, "conv2": 1, "decoder": 2}
    shapes = cfg.upstream_shapes()
    return [(k, tuple(shapes[k]), torch.float32) for k in sorted(shapes, key=lambda k: rank[k.split(".")[0]])]


def write_vae(root: Path, cfg, seed: int = 2, device: str | torch.device = "cpu") -> list[Path]:
    from lowvram.runtime import VAE_FILE

    specs = vae_specs(cfg)
    shapes = {k: s for k, s, _ in specs}
    write_pth(root / VAE_FILE, specs, lambda k: random_tensor(k, shapes[k], trained_kind(k, shapes[k]), seed, device))
    return [root / VAE_FILE]


WAV2VEC_LARGE = dict(  # wav2vec2-large-xlsr-53-english (Wav2Vec2ForCTC, ~0.3 B params)
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, conv_dim=(512,) * 7,
    num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, vocab_size=33)
WAV2VEC_TINY = dict(hidden_size=32, num_hidden_layers=24, num_attention_heads=2, intermediate_size=64,
                    conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, vocab_size=33)


def wav2vec_config(size: dict):
    """The Hugging Face config: the real model's structure flags (stable layer norm, layer-normed conv stack with
    bias, kernels 10,3,3,3,3,2,2 / strides 5,2,2,2,2,2,2, GELU) at the given widths."""
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(**size, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                          conv_bias=True, do_stable_layer_norm=True, feat_extract_norm="layer",
                          feat_extract_activation="gelu", hidden_act="gelu", architectures=["Wav2Vec2ForCTC"])


def write_wav2vec(root: Path, size: dict, seed: int = 3) -> list[Path]:
    """The wav2vec2 folder (config, safetensors weights with Hugging Face's own init, preprocessor config)."""
    from transformers import Wav2Vec2ForCTC

    from lowvram.runtime import WAV2VEC_DIR

    folder = root / WAV2VEC_DIR
    torch.manual_seed(seed)
    Wav2Vec2ForCTC(wav2vec_config(size)).save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "feature_size": 1, "sampling_rate": 16000, "padding_value": 0.0,
         "feature_extractor_type": "Wav2Vec2FeatureExtractor", "return_attention_mask": True}))
    return [folder]


# ----------------------------------------------------------------------------------------------------------
# The whole download at one size


@dataclasses.dataclass(frozen=True)
class ModelSizes:
    name: str
    dit: DiTConfig
    lora_rank: int
    t5: object  # lowvram.conditioning.text.T5Config
    t5_dtype: torch.dtype
    vae: object  # lowvram.conditioning.vae.VAEConfig
    wav2vec: dict
    shards: int | None  # balanced shard count; None: diffusers' 10 GB rule (4 shards at 14B)


def tiny_sizes() -> ModelSizes:
    """The demo's model: every component with the real key names, small enough for a CPU test."""
    from lowvram.conditioning.text import T5Config
    from lowvram.conditioning.vae import VAEConfig
    from lowvram.model.config import tiny

    text_dim = 64
    return ModelSizes("tiny", tiny(text_dim=text_dim, audio_dim=WAV2VEC_TINY["hidden_size"], text_len=32), 8,
                      T5Config(vocab_size=256, dim=text_dim, dim_attn=text_dim, dim_ffn=128, num_heads=4, num_layers=2),
                      torch.float32, VAEConfig(dim=8), WAV2VEC_TINY, 2)


def full_sizes() -> ModelSizes:
    """The real sizes: DiT 16.3B bf16 in 4 shards, LoRA rank 128, umT5-XXL bf16, Wan2.1 VAE fp32, wav2vec2-large."""
    from lowvram.conditioning.text import T5Config
    from lowvram.conditioning.vae import VAEConfig

    return ModelSizes("full", s2v_14b(), 128, T5Config.xxl(), torch.bfloat16, VAEConfig.wan21(), WAV2VEC_LARGE, None)


def planned_bytes(sizes: ModelSizes) -> dict[str, int]:
    """Bytes each part of `write_model_folder` will write: 'dit' (shards + LoRA) and 'rest' (the other models)."""
    def nbytes(specs):
        return sum(math.prod(s) * d.itemsize for _, s, d in specs)

    from transformers import Wav2Vec2ForCTC

    with torch.device("meta"):
        w2v = sum(p.numel() * 4 for p in Wav2Vec2ForCTC(wav2vec_config(sizes.wav2vec)).parameters())
    return {"dit": nbytes(dit_specs(sizes.dit)) + nbytes(lora_specs(sizes.dit, sizes.lora_rank)),
            "rest": nbytes(t5_specs(sizes.t5, sizes.t5_dtype)) + nbytes(vae_specs(sizes.vae)) + w2v}


def _disk_bytes(paths: Iterable[Path]) -> int:
    total = 0
    for p in paths:
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        total += sum(f.stat().st_size for f in files)
    return total


def write_model_folder(root: str | Path, sizes: ModelSizes, *, dit_dir: str | Path | None = None, seed: int = 0,
                       device: str | torch.device = "cpu", log: Callable[[str], None] = lambda _: None) -> dict:
    """Every file of the Wan2.2-S2V-14B download + the LiveAvatar LoRA, with random weights, at `sizes`.

    The DiT (shards, index, config.json) and `liveavatar.safetensors` go to `dit_dir` (default `root`; e.g. a
    RAM disk), the umT5 encoder + tokenizer, VAE and wav2vec2 to `root`; when they differ, `dit_dir` gets symbolic
    links to the others, so either folder looks like the download. Returns bytes and seconds per component."""
    root = Path(root)
    dit_dir = Path(dit_dir) if dit_dir is not None else root
    root.mkdir(parents=True, exist_ok=True)
    dit_dir.mkdir(parents=True, exist_ok=True)
    parts = [
        ("DiT + LoRA", lambda: _dit_files(write_checkpoint(dit_dir, sizes.dit, seed, shards=sizes.shards,
                                                           max_shard_bytes=None if sizes.shards else
                                                           DIFFUSERS_MAX_SHARD_BYTES, lora_rank=sizes.lora_rank,
                                                           device=device))),
        ("umT5 encoder + tokenizer", lambda: write_text_encoder(root, sizes.t5, sizes.t5_dtype, seed + 1, device)),
        ("Wan2.1 VAE", lambda: write_vae(root, sizes.vae, seed + 2, device)),
        ("wav2vec2", lambda: write_wav2vec(root, sizes.wav2vec, seed + 3)),
    ]
    report = {"sizes": sizes.name, "device": str(device), "root": str(root), "dit_dir": str(dit_dir), "parts": []}
    t_all = time.perf_counter()
    for name, write in parts:
        t0 = time.perf_counter()
        paths = write()
        seconds = time.perf_counter() - t0
        nbytes = _disk_bytes(paths)
        report["parts"].append({"part": name, "bytes": nbytes, "seconds": round(seconds, 2),
                                "files": [str(p) for p in paths]})
        log(f"{name}: {nbytes / 1e9:.2f} GB in {seconds:.1f} s ({nbytes / 1e9 / max(seconds, 1e-9):.2f} GB/s) "
            f"-> {paths[0].parent if len(paths) > 1 else paths[0]}")
        if paths[0].parent == root and dit_dir.resolve() != root.resolve():
            for p in paths:
                link = dit_dir / p.relative_to(root)
                link.parent.mkdir(parents=True, exist_ok=True)
                if link.is_symlink() or link.exists():
                    link.unlink()
                link.symlink_to(p.resolve(), target_is_directory=p.is_dir())
    report["bytes"] = sum(p["bytes"] for p in report["parts"])
    report["seconds"] = round(time.perf_counter() - t_all, 2)
    log(f"total: {report['bytes'] / 1e9:.2f} GB in {report['seconds']:.1f} s")
    return report


def _dit_files(written: WrittenCheckpoint) -> list[Path]:
    return [*written.shards, *([written.index] if written.index else []), written.config,
            *([written.lora] if written.lora else [])]
