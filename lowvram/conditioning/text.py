"""umT5-XXL text encoder: LiveAvatar's `models_t5_umt5-xxl-enc-bf16.pth` run through transformers' `UMT5EncoderModel`.

What the pipeline does with a prompt (tests/reference/tiny_t5/README.md §3-§4):

* clean it (ftfy, html-unescape twice, collapse whitespace), tokenize to exactly `text_len` = 512
  ids (EOS appended, right-padded with 0, truncated), run the encoder-only umT5 with the attention
  mask, and keep the first `L` rows of the output, `L` = number of real tokens (EOS included).
  The result `[L, 4096]` has the encoder's dtype (bfloat16 in the real run).

The checkpoint is a plain pickled state dict with upstream key names. It is opened with
`torch.load(weights_only=True, mmap=True)` (no arbitrary unpickling, tensors stay file-backed), renamed
to transformers' names and assigned into a skeleton built on the meta device, so the weights are
never held twice: peak host RAM ≈ the file (11.4 GB, page cache), peak GPU memory ≈ the weights
plus a small activation working set (see `t5_memory_bytes`).

Encoded prompts are cached on disk (`PromptCache`), keyed by the encoder file's fingerprint, the
token ids, dtype and quantization, so the encoder is only loaded when a prompt is new.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowvram.errors import CheckpointError, InputError
from lowvram.conditioning.prompt_cache import PromptCache, default_cache_dir
from lowvram.pth import read_state_dict

T5_CHECKPOINT_NAME = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_SUBDIR = "google/umt5-xxl"
PAD_ID = 0
EOS_ID = 1
QUANTIZATIONS = (None, "int8", "nf4")

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class T5Config:
    """Shape of the encoder-only umT5 (upstream `umt5_xxl(encoder_only=True)` naming)."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    text_len: int = 512

    @classmethod
    def xxl(cls) -> "T5Config":
        """The real umT5-XXL encoder LiveAvatar ships (5,680,910,336 params, 242 tensors)."""
        return cls()

    @classmethod
    def from_fixture(cls, cfg: dict | str | Path) -> "T5Config":
        """From a tiny_t5 fixture's `config.json` (its `model` block and `text_len`)."""
        if not isinstance(cfg, dict):
            cfg = json.loads(Path(cfg).read_text())
        m = cfg["model"]
        return cls(
            vocab_size=m["vocab_size"],
            dim=m["dim"],
            dim_attn=m["dim_attn"],
            dim_ffn=m["dim_ffn"],
            num_heads=m["num_heads"],
            num_layers=m["encoder_layers"],
            num_buckets=m.get("num_buckets", 32),
            max_distance=m.get("relative_attention_max_distance", 128),
            eps=m.get("layernorm_eps", 1e-6),
            text_len=cfg.get("text_len", 512),
        )

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], text_len: int = 512) -> "T5Config":
        """Infer the shape from an upstream-named state dict (raises KeyError/IndexError if it is not one)."""
        vocab, dim = sd["token_embedding.weight"].shape
        layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
        return cls(
            vocab_size=int(vocab),
            dim=int(dim),
            dim_attn=int(sd["blocks.0.attn.q.weight"].shape[0]),
            dim_ffn=int(sd["blocks.0.ffn.fc1.weight"].shape[0]),
            num_heads=int(heads),
            num_layers=layers,
            num_buckets=int(buckets),
            text_len=text_len,
        )

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    def upstream_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every key of the upstream state dict with its shape (242 keys for XXL)."""
        d, a, f = self.dim, self.dim_attn, self.dim_ffn
        shapes = {"token_embedding.weight": (self.vocab_size, d), "norm.weight": (d,)}
        for i in range(self.num_layers):
            p = f"blocks.{i}."
            shapes.update({
                p + "norm1.weight": (d,),
                p + "attn.q.weight": (a, d),
                p + "attn.k.weight": (a, d),
                p + "attn.v.weight": (a, d),
                p + "attn.o.weight": (d, a),
                p + "pos_embedding.embedding.weight": (self.num_buckets, self.num_heads),
                p + "norm2.weight": (d,),
                p + "ffn.gate.0.weight": (f, d),
                p + "ffn.fc1.weight": (f, d),
                p + "ffn.fc2.weight": (d, f),
            })
        return shapes

    @property
    def num_params(self) -> int:
        n = 0
        for shape in self.upstream_shapes().values():
            k = 1
            for s in shape:
                k *= s
            n += k
        return n

    def hf_config(self):
        """The transformers `UMT5Config` that reproduces this encoder (tiny_t5/README.md §5)."""
        from transformers import UMT5Config

        cfg = UMT5Config(
            vocab_size=self.vocab_size,
            d_model=self.dim,
            d_kv=self.head_dim,
            d_ff=self.dim_ffn,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            relative_attention_num_buckets=self.num_buckets,
            relative_attention_max_distance=self.max_distance,
            layer_norm_epsilon=self.eps,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            is_encoder_decoder=False,
            use_cache=False,
        )
        cfg._attn_implementation = "eager"  # bit-exact with upstream; "sdpa" is off by ~2e-6 (fp32)
        return cfg


# ---------------------------------------------------------------------------------------------
# Key map upstream -> transformers
# ---------------------------------------------------------------------------------------------

_BLOCK_MAP = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def hf_keys(upstream_key: str) -> list[str]:
    """transformers `UMT5EncoderModel` key(s) for one upstream key (the embedding is tied: two keys)."""
    if upstream_key == "token_embedding.weight":
        return ["shared.weight", "encoder.embed_tokens.weight"]
    if upstream_key == "norm.weight":
        return ["encoder.final_layer_norm.weight"]
    m = _BLOCK_KEY.match(upstream_key)
    if m and m.group(2) in _BLOCK_MAP:
        return [f"encoder.block.{m.group(1)}.{_BLOCK_MAP[m.group(2)]}"]
    raise KeyError(upstream_key)


def convert_t5_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an upstream umT5 encoder state dict to transformers' names. No copies, no transposes."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        for new in hf_keys(key):
            out[new] = tensor
    return out


# ---------------------------------------------------------------------------------------------
# State-dict checks (shared with the VAE loader; reading is lowvram.pth.read_state_dict)
# ---------------------------------------------------------------------------------------------


def check_keys(path: Path, sd: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str, fix: str):
    """CheckpointError unless `sd` has exactly the expected keys and shapes."""
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected keys (e.g. {extra[0]})")
        raise CheckpointError(f"{path}: not {what}: {', '.join(parts)}; {fix}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != tuple(shape):
            raise CheckpointError(
                f"{path}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(shape)} ({what} of another size); {fix}"
            )


def file_fingerprint(path: str | Path, chunk: int = 1 << 20) -> str:
    """Cheap identity of a large file: size, mtime and a hash of its first and last MiB."""
    path = Path(path)
    st = path.stat()
    h = hashlib.sha256()
    h.update(f"{st.st_size}:{st.st_mtime_ns}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if st.st_size > chunk:
            f.seek(max(chunk, st.st_size - chunk))
            h.update(f.read(chunk))
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# Prompt cleaning and tokenization
# ---------------------------------------------------------------------------------------------


def clean_prompt(text: str) -> str:
    """LiveAvatar's `clean='whitespace'`: ftfy.fix_text, html.unescape twice, collapse whitespace, strip."""
    if not isinstance(text, str):
        raise InputError(f"prompt must be text, got {type(text).__name__}; pass the prompt as a string")
    try:
        import ftfy
    except ImportError:
        raise InputError("prompt cleaning needs ftfy, which is not installed; run `pip install ftfy==6.3.1`") from None
    try:  # `regex` is what upstream uses (Unicode White_Space); it ships with transformers
        import regex as _re
    except ImportError:  # pragma: no cover
        _re = re
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _re.sub(r"\s+", " ", text).strip()


def load_tokenizer(folder: str | Path):
    """`AutoTokenizer` from a local folder (`<ckpt>/google/umt5-xxl`); never touches the network."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder}: tokenizer folder not found; put the umT5 tokenizer files (tokenizer.json, "
            f"tokenizer_config.json, spiece.model) there (it ships as {TOKENIZER_SUBDIR}/ in the checkpoint folder)"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        detail = " ".join(str(e).split())[:160]
        raise CheckpointError(
            f"{folder}: cannot load the tokenizer ({type(e).__name__}: {detail}); re-download {TOKENIZER_SUBDIR}/"
        ) from None


def tokenize(tokenizer, prompt: str, text_len: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and tokenize one prompt exactly as the pipeline does: ids and mask, int64 [1, text_len]."""
    enc = tokenizer(
        [clean_prompt(prompt)],
        padding="max_length",
        truncation=True,
        max_length=text_len,
        add_special_tokens=True,
        return_tensors="pt",
    )
    return enc["input_ids"].long(), enc["attention_mask"].long()


# ---------------------------------------------------------------------------------------------
# Model construction
# ---------------------------------------------------------------------------------------------


class _Quantized(torch.nn.Module):
    """Holds a bitsandbytes linear. Exposes no tensor `weight`, so UMT5's "cast to wo.weight.dtype"
    step (meant for fp32 `wo`) is skipped instead of casting activations to uint8 for 4-bit."""

    weight = None

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise InputError(
            "int8/nf4 text-encoder quantization needs bitsandbytes, which is not installed; "
            "run `pip install bitsandbytes` or use --t5-dtype bf16"
        ) from None
    return bnb


def _quantize_linears(model: torch.nn.Module, mode: str, device: torch.device, compute_dtype: torch.dtype):
    """Replace every Linear of the encoder blocks by a bitsandbytes one, moving layer by layer to `device`
    (the bf16 copy of a layer is freed before the next is quantized, so GPU peak ≈ quantized size)."""
    bnb = _bnb()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, torch.nn.Linear):
                continue
            w = child.weight.data
            if mode == "int8":  # LLM.int8: int8 rows + fp32 row scales, fp16 outlier columns above 6.0
                q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=False,
                                        has_fp16_weights=False, threshold=6.0, device="meta")
                q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
            else:  # NF4, blocks of 64, double-quantized absmax, bf16 compute
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=compute_dtype,
                                      quant_type="nf4", compress_statistics=True, device="meta")
                q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                             module=q)
            q = q.to(device)  # quantizes on the move
            setattr(module, child_name, _Quantized(q))
    return model


def build_umt5(hf_sd: dict[str, torch.Tensor], config: T5Config, dtype: torch.dtype = torch.bfloat16,
               device: str | torch.device = "cpu", quantization: str | None = None,
               embed_device: str | torch.device | None = None):
    """Assign a transformers-named state dict into a `UMT5EncoderModel` skeleton built on the meta device.

    Tensors already in `dtype` are used as they are (memory-mapped file pages stay shared), others are
    converted once. Returns the model in eval mode on `device` (the token embedding on `embed_device`
    when given: it is only a lookup, 2.1 GB of the 11.4 GB).
    """
    from transformers import UMT5EncoderModel

    if quantization not in QUANTIZATIONS:
        raise InputError(f"unknown text-encoder quantization {quantization!r}; use one of: none, int8, nf4")
    device = torch.device(device)
    if quantization is not None:
        _bnb()
        if device.type != "cuda":
            raise InputError(f"{quantization} text-encoder quantization runs on a CUDA GPU only; use --t5-device cuda "
                             "or drop the quantization")
    with torch.device("meta"):
        model = UMT5EncoderModel(config.hf_config())
    converted: dict[int, torch.Tensor] = {}  # the tied embedding appears twice: convert it once
    sd = {}
    for k, v in hf_sd.items():
        if id(v) not in converted:
            converted[id(v)] = v if v.dtype == dtype else v.to(dtype)
        sd[k] = converted[id(v)]
    del converted
    model.load_state_dict(sd, strict=True, assign=True)
    # Tie the embedding as one Parameter, so moving the model copies it once.
    model.encoder.embed_tokens.weight = model.shared.weight
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:  # pragma: no cover - guards a transformers layout change
        raise CheckpointError(f"text encoder: {len(leftovers)} tensors were not loaded (e.g. {leftovers[0]}); "
                              "this transformers version lays UMT5 out differently — install transformers==5.24.0")
    model.eval().requires_grad_(False)
    if quantization is not None:
        _quantize_linears(model.encoder, quantization, device, dtype)
    if embed_device is None:
        return model.to(device)
    model.shared.to(embed_device)  # the same Parameter as encoder.embed_tokens
    model.encoder.block.to(device)
    model.encoder.final_layer_norm.to(device)
    return model


def load_t5_encoder(path: str | Path, config: T5Config | None = None, *, dtype: torch.dtype = torch.bfloat16,
                    device: str | torch.device = "cpu", quantization: str | None = None,
                    embed_device: str | torch.device | None = None):
    """Load `models_t5_umt5-xxl-enc-bf16.pth` (or any upstream-named umT5 encoder .pth / .safetensors).

    `config=None` infers the size from the file; a given config must match it.
    """
    path = Path(path)
    fix = f"download {T5_CHECKPOINT_NAME} again (it is the encoder-only umT5-XXL of Wan2.x)"
    sd = read_state_dict(path, "the umT5 text encoder", fix)
    if config is None:
        try:
            config = T5Config.from_state_dict(sd)
        except (KeyError, IndexError, ValueError, AttributeError):
            raise CheckpointError(f"{path}: not an umT5 text-encoder state dict (no token_embedding/blocks.0 keys); "
                                  f"{fix}") from None
    check_keys(path, sd, config.upstream_shapes(), "an umT5 text-encoder state dict", fix)
    return build_umt5(convert_t5_state_dict(sd), config, dtype=dtype, device=device, quantization=quantization,
                      embed_device=embed_device)


def encoder_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    embed_device: torch.device | None = None) -> torch.Tensor:
    """`last_hidden_state` [B, T, dim] of `model` for the given ids/mask (on the model's device)."""
    dev = model.encoder.final_layer_norm.weight.device
    with torch.no_grad():  # not inference_mode: callers may update the results in place
        if embed_device is not None:
            emb = model.shared(input_ids.to(embed_device)).to(dev)
            out = model(inputs_embeds=emb, attention_mask=attention_mask.to(dev))
        else:
            out = model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev))
    return out.last_hidden_state


# ---------------------------------------------------------------------------------------------
# The encoder as the pipeline uses it
# ---------------------------------------------------------------------------------------------

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
           "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise InputError(f"unknown text-encoder dtype {dtype!r}; use bf16 or fp32")
    return _DTYPES[dtype]


class TextEncoder:
    """Prompt -> `context` [L, dim] as LiveAvatar's `encode_prompt`, with a disk cache and a lazily loaded model.

    checkpoint: `models_t5_umt5-xxl-enc-bf16.pth` (or a tiny upstream-named .pth/.safetensors).
    tokenizer: folder for `AutoTokenizer` (default `<checkpoint dir>/google/umt5-xxl`) or a tokenizer object.
    device/dtype/quantization: where and how the encoder runs (quantization: None, "int8", "nf4"; CUDA only).
    cache_dir: prompt cache folder; None -> `default_cache_dir()`, False -> no cache.
    embed_device: keep the 2.1 GB token embedding there (e.g. "cpu") while the blocks run on `device`.
    """

    def __init__(self, checkpoint: str | Path, tokenizer: Any = None, *, config: T5Config | None = None,
                 device: str | torch.device = "cpu", dtype: str | torch.dtype = torch.bfloat16,
                 quantization: str | None = None, cache_dir: str | Path | None | bool = None,
                 embed_device: str | torch.device | None = None):
        self.checkpoint = Path(checkpoint)
        self.config = config
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype)
        self.quantization = None if quantization in (None, "none", "bf16") else quantization
        if self.quantization not in QUANTIZATIONS:
            raise InputError(f"unknown text-encoder quantization {quantization!r}; use one of: none, int8, nf4")
        self.embed_device = torch.device(embed_device) if embed_device is not None else None
        self.text_len = config.text_len if config is not None else 512
        if tokenizer is None:
            tokenizer = self.checkpoint.parent / TOKENIZER_SUBDIR
        self._tokenizer = tokenizer
        if cache_dir is False:
            self.cache = None
        else:
            self.cache = PromptCache(default_cache_dir() if cache_dir in (None, True) else cache_dir)
        self._model = None
        self._fingerprint: str | None = None
        self.loads = 0

    # -- pieces ---------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if isinstance(self._tokenizer, (str, Path)):
            self._tokenizer = load_tokenizer(self._tokenizer)
        return self._tokenizer

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            if not self.checkpoint.is_file():
                raise CheckpointError(f"{self.checkpoint}: file not found (the umT5 text encoder); download "
                                      f"{T5_CHECKPOINT_NAME} into the checkpoint folder")
            self._fingerprint = file_fingerprint(self.checkpoint)
        return self._fingerprint

    @property
    def model(self):
        if self._model is None:
            self._model = load_t5_encoder(self.checkpoint, self.config, dtype=self.dtype, device=self.device,
                                          quantization=self.quantization, embed_device=self.embed_device)
            self.loads += 1
        return self._model

    def unload(self):
        """Drop the encoder (the cache keeps working without it)."""
        self._model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def settings(self) -> str:
        return f"umt5|{self.dtype}|{self.quantization}|text_len={self.text_len}"

    # -- encoding -------------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        return tokenize(self.tokenizer, prompt, self.text_len)

    def encode(self, prompt: str) -> torch.Tensor:
        """The pipeline's `context[0]`: [L, dim] in the encoder dtype, on the CPU."""
        ids, mask = self.tokenize(prompt)
        return self.encode_ids(ids, mask, prompt=prompt)

    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   prompt: str | None = None) -> torch.Tensor:
        """Encode given token ids/mask ([1, text_len] or [text_len]) and trim to the L masked-in rows."""
        ids = torch.as_tensor(input_ids).reshape(1, -1).long()
        mask = torch.as_tensor(attention_mask).reshape(1, -1).long()
        if ids.shape != mask.shape:
            raise InputError(f"input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} differ in shape")
        length = int(mask.gt(0).sum())
        key = None
        if self.cache is not None:
            key = PromptCache.key(self.fingerprint, self.settings(), ids, length)
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        full = encoder_forward(self.model, ids, mask, self.embed_device)
        context = full[0, :length].to("cpu")
        if key is not None:
            meta = {"prompt": prompt or "", "length": str(length), "settings": self.settings(),
                    "checkpoint": str(self.checkpoint), "fingerprint": self.fingerprint}
            self.cache.put(key, context, meta)
        return context

    def encode_full(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Untrimmed `last_hidden_state` [1, text_len, dim] (pad rows included; debugging), never cached."""
        return encoder_forward(self.model, torch.as_tensor(input_ids).reshape(1, -1).long(),
                               torch.as_tensor(attention_mask).reshape(1, -1).long(), self.embed_device)


def pad_context(context: torch.Tensor, text_len: int = 512) -> torch.Tensor:
    """Zero-pad a trimmed [L, dim] context back to [text_len, dim], as the DiT does before `text_embedding`."""
    out = context.new_zeros(text_len, context.shape[-1])
    out[: context.shape[0]] = context[:text_len]
    return out


__all__ = [
    "T5Config", "TextEncoder", "clean_prompt", "tokenize", "load_tokenizer", "load_t5_encoder",
    "build_umt5", "convert_t5_state_dict", "hf_keys", "check_keys", "file_fingerprint",
    "encoder_forward", "pad_context", "parse_dtype",
]
