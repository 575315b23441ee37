"""Quantized Linear layers: fp8 (e4m3, per-channel weights), int8 W8A8 (per-channel weights, per-token
activations, SmoothQuant factors) and int4 weight-only (group-wise, asymmetric).

The on-disk format is plain tensors + scales (any kernel can consume it). Each layer picks its GEMM:
  fp8   CUDA sm_89+: torch._scaled_mm with row-wise scales; elsewhere an exact dequantized matmul
  int8  torch._int_mm (int8 x int8 -> int32, CUDA and CPU) and a per-token x per-channel rescale
  int4  dequantize to the activation dtype, then F.linear (weight-only; the win is memory, not speed)
`quantize_(model, fmt)` swaps nn.Linear modules in place, the one-call way torchao does it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT4_GROUP = 128
FORMATS = ("bf16", "fp8", "int8", "int4")

# Layers the quantizer leaves in bf16 by default (as upstream's fp8 path does): tiny or precision-critical.
KEEP_BF16 = ("text_embedding", "time_embedding", "time_projection", "head.head", "casual_audio_encoder.encoder.final_linear")


# ----- quantization math (shared by the offline quantizer and the tests) -------------------------------------

def quantize_fp8_per_channel(w: torch.Tensor):
    """w [out, in] -> (e4m3 weights, float32 scale [out]) with w ~= w8 * scale[:, None]."""
    amax = w.float().abs().amax(dim=1).clamp(min=1e-12)
    scale = amax / FP8_MAX
    w8 = (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return w8, scale


def quantize_int8_per_channel(w: torch.Tensor):
    """w [out, in] -> (int8 weights, float32 scale [out]), symmetric, round to nearest."""
    amax = w.float().abs().amax(dim=1).clamp(min=1e-12)
    scale = amax / 127.0
    w8 = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return w8, scale


def quantize_int4_groupwise(w: torch.Tensor, group: int = INT4_GROUP):
    """w [out, in] -> (packed uint8 [out, in/2], scale [out, in/group], offset [out, in/group]) asymmetric 4-bit.

    Dequantized: w ~= q * scale + offset with q in 0..15; two values per byte, low nibble first.
    """
    out_f, in_f = w.shape
    if in_f % group:
        raise ValueError(f"in_features {in_f} is not a multiple of the int4 group size {group}")
    g = w.float().reshape(out_f, in_f // group, group)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).reshape(out_f, in_f)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed, scale.to(torch.bfloat16), lo.to(torch.bfloat16)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    q = torch.stack((packed & 0xF, packed >> 4), dim=-1)
    return q.reshape(packed.shape[0], -1)


def dequantize_int4(packed, scale, offset, dtype=torch.bfloat16):
    q = unpack_int4(packed).to(dtype)
    out_f, in_f = q.shape
    group = in_f // scale.shape[1]
    w = q.reshape(out_f, -1, group) * scale.to(dtype)[..., None] + offset.to(dtype)[..., None]
    return w.reshape(out_f, in_f)


def per_token_fp8(x2: torch.Tensor):
    scale = (x2.float().abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (x2.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def per_token_int8(x2: torch.Tensor):
    scale = (x2.float().abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
    return torch.round(x2.float() / scale).clamp(-127, 127).to(torch.int8), scale


def fast_fp8_supported(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


# ----- modules ----------------------------------------------------------------------------------------

class QuantLinear(nn.Module):
    fmt = "base"

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.out_dtype = dtype
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def extra_repr(self):
        return f"{self.in_features} -> {self.out_features}, {self.fmt}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        out = self.matmul(x2)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class Fp8Linear(QuantLinear):
    """e4m3 weights with per-output-channel scales; activations per-token dynamic, or a static per-tensor scale."""

    fmt = "fp8"

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=torch.bfloat16):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.register_buffer("weight", torch.empty(out_features, in_features, device=device, dtype=FP8))
        self.register_buffer("weight_scale", torch.empty(out_features, device=device, dtype=torch.float32))
        # Static activation scale (calibrated); None = per-token dynamic. A non-persistent buffer, so compiled
        # graphs take it as an input instead of specialising (and recompiling) on each layer's value.
        self.register_buffer("act_scale", None, persistent=False)

    def quantize_input(self, x2):
        if self.act_scale is None:
            return per_token_fp8(x2)
        scale = self.act_scale.to(x2.device).float().reshape(1, 1).expand(x2.shape[0], 1)
        return (x2.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale

    def matmul(self, x2):
        x8, sa = self.quantize_input(x2)
        if fast_fp8_supported(x2.device):
            return torch._scaled_mm(x8, self.weight.t(), scale_a=sa.contiguous(), scale_b=self.weight_scale[None, :].contiguous(),
                                    out_dtype=torch.bfloat16, use_fast_accum=True)
        return (x8.float() * sa) @ (self.weight.float() * self.weight_scale[:, None]).t()


class Int8Linear(QuantLinear):
    """W8A8: int8 weights per output channel, int8 activations per token, after dividing by SmoothQuant factors."""

    fmt = "int8"

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=torch.bfloat16):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.register_buffer("weight", torch.empty(out_features, in_features, device=device, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(out_features, device=device, dtype=torch.float32))
        self.register_buffer("smooth", torch.ones(in_features, device=device, dtype=torch.float32))

    def matmul(self, x2):
        x8, sa = per_token_int8(x2.float() / self.smooth)
        rows = x8.shape[0]
        if x8.is_cuda and rows <= 16:  # cuBLAS int8 GEMM needs M > 16
            x8 = F.pad(x8, (0, 0, 0, 17 - rows))
        acc = torch._int_mm(x8, self.weight.t())[:rows]
        return acc.float() * sa * self.weight_scale[None, :]


class Int4Linear(QuantLinear):
    """Weight-only 4-bit, group-wise asymmetric; activations stay in bf16 (float32 in CPU tests)."""

    fmt = "int4"

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=torch.bfloat16, group=INT4_GROUP):
        super().__init__(in_features, out_features, bias, device, dtype)
        groups = in_features // group
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, device=device, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.empty(out_features, groups, device=device, dtype=torch.bfloat16))
        self.register_buffer("weight_offset", torch.empty(out_features, groups, device=device, dtype=torch.bfloat16))

    def matmul(self, x2):
        dtype = x2.dtype if x2.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16
        w = dequantize_int4(self.weight, self.weight_scale, self.weight_offset, dtype)
        return F.linear(x2.to(dtype), w)


MODULES = {"fp8": Fp8Linear, "int8": Int8Linear, "int4": Int4Linear}
WEIGHT_DTYPES = {"fp8": FP8, "int8": torch.int8, "int4": torch.uint8}  # how each module stores its weight


def quantized_linear(linear: nn.Linear, fmt: str, smooth: torch.Tensor | None = None) -> QuantLinear:
    """Quantize one nn.Linear (already LoRA-merged) into the given format."""
    w = linear.weight.detach()
    dtype = w.dtype if w.dtype != torch.float32 else torch.float32
    if smooth is not None and fmt != "int8":
        raise ValueError("SmoothQuant factors apply to int8 only")
    mod = MODULES[fmt](linear.in_features, linear.out_features, linear.bias is not None, device=w.device, dtype=dtype)
    if fmt == "fp8":
        mod.weight, mod.weight_scale = quantize_fp8_per_channel(w)
    elif fmt == "int8":
        if smooth is not None:
            mod.smooth = smooth.float().to(w.device)
            w = w.float() * mod.smooth[None, :]
        mod.weight, mod.weight_scale = quantize_int8_per_channel(w)
    else:
        mod.weight, mod.weight_scale, mod.weight_offset = quantize_int4_groupwise(w)
    if linear.bias is not None:
        mod.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return mod


def default_recipe(model: nn.Module, fmt: str, keep: tuple[str, ...] = KEEP_BF16) -> dict[str, str]:
    """Layer name -> format for every nn.Linear; the `keep` substrings stay bf16."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    recipe = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            recipe[name] = "bf16" if fmt == "bf16" or any(k in name for k in keep) else fmt
    return recipe


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def quantize_(model: nn.Module, fmt: str | dict[str, str], smooth: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Swap nn.Linear layers for quantized ones in place; `fmt` is one format or a per-layer recipe."""
    recipe = default_recipe(model, fmt) if isinstance(fmt, str) else fmt
    for name, layer_fmt in recipe.items():
        if layer_fmt == "bf16":
            continue
        linear = model.get_submodule(name)
        if isinstance(linear, nn.Linear):
            set_submodule(model, name, quantized_linear(linear, layer_fmt, (smooth or {}).get(name)))
    return model


def empty_quantized_(model: nn.Module, recipe: dict[str, str]) -> nn.Module:
    """Swap nn.Linear layers for quantized ones with uninitialised buffers (on the model's device, meta works),
    ready for `load_state_dict(..., assign=True)` from a quantized folder."""
    for name, layer_fmt in recipe.items():
        if layer_fmt == "bf16":
            continue
        linear = model.get_submodule(name)
        dev = linear.weight.device
        dtype = linear.weight.dtype
        set_submodule(model, name, MODULES[layer_fmt](linear.in_features, linear.out_features, linear.bias is not None,
                                                      device=dev, dtype=dtype))
    return model


def set_act_step(model: nn.Module, step: int | None) -> None:
    """Select the static fp8 activation scale of denoising step `step` (num_steps = the prefill; None = the
    max over steps) in every Linear that has per-step scales. Dynamic layers are untouched."""
    for mod in model.modules():
        scales = getattr(mod, "act_scales", None)
        if isinstance(mod, Fp8Linear) and scales is not None:
            mod.act_scale = scales.max() if step is None else scales[step]


def weight_bytes(out_f: int, in_f: int, fmt: str) -> int:
    """Bytes of one Linear weight (+ its scales) in a format; biases not included."""
    if fmt == "bf16":
        return 2 * out_f * in_f
    if fmt in ("fp8", "int8"):
        return out_f * in_f + 4 * out_f + (4 * in_f if fmt == "int8" else 0)
    return out_f * in_f // 2 + 2 * 2 * out_f * (in_f // INT4_GROUP)


def concat_linears(layers: list[nn.Module]) -> nn.Module | None:
    """One layer computing the outputs of `layers` (same input) side by side, or None if they can't be fused."""
    kinds = {type(l) for l in layers}
    if len(kinds) != 1:
        return None
    first = layers[0]
    bias = None if first.bias is None else torch.cat([l.bias.detach() for l in layers])
    if isinstance(first, nn.Linear):
        fused = nn.Linear(first.in_features, sum(l.out_features for l in layers), bias=bias is not None,
                          device="meta")
        fused.weight = nn.Parameter(torch.cat([l.weight.detach() for l in layers]), requires_grad=False)
    else:
        if isinstance(first, Int8Linear) and not all(torch.equal(l.smooth, first.smooth) for l in layers):
            return None
        fused = type(first)(first.in_features, sum(l.out_features for l in layers), bias is not None,
                            device="meta", dtype=first.out_dtype)
        for name, _ in first.named_buffers(recurse=False):
            if name == "smooth":
                fused.smooth = first.smooth
            elif name in ("act_scale", "act_scales"):  # per input, not per output: the same input, one scale
                fused.register_buffer(name, torch.stack([getattr(l, name) for l in layers]).amax(0),
                                      persistent=name not in first._non_persistent_buffers_set)
            else:
                setattr(fused, name, torch.cat([getattr(l, name) for l in layers]))
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused
