"""Per-Linear quantization decisions on calibration data, and the tensors each format stores.

Formats (the math is `lowvram.kernels.linear`'s, so what is measured here is what runs):
* fp8  — e4m3 weights, per-output-channel scales; activations per-token dynamic, or (`act="static"`) one
         scale per (layer, step) from the calibrated per-step amax (`act_scales` [steps + 1], last = prefill);
* int8 — W8A8: per-channel int8 weights, per-token int8 activations, after SmoothQuant migration
         s_j = amax(X_j)^a / amax(W_j)^(1-a). `a` is chosen per layer from a grid (plus "no smoothing") to
         minimise the output error on the calibration rows;
* int4 — weight-only, group-wise (128) asymmetric; activations stay bf16.
Error of a Linear = ||x Wq^T - x W^T|| / ||x W^T|| over the recorded input rows (bias excluded), measured
on held-out rows when there are any.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lowvram.kernels import linear as K

from .stats import GroupStats

DEFAULT_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
QUANT_FORMATS = ("fp8", "int8", "int4")


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((y.double() - ref).norm() / ref.norm().clamp(min=1e-30))


@dataclass
class LinearPlan:
    """What calibration decided for one Linear (before mixed precision), with its measured errors."""

    name: str
    fmt: str  # the quantized format ('bf16' only when the layer cannot be quantized in fmt)
    in_features: int
    out_features: int
    act: str = "dynamic"
    alpha: float | None = None  # SmoothQuant strength (int8), None = no smoothing
    smooth: torch.Tensor | None = None  # [in] float32 (int8)
    act_scales: torch.Tensor | None = None  # [steps + 1] float32 (fp8 static)
    err: float = 0.0  # on the evaluation rows (held-out when available)
    err_train: float = 0.0
    alpha_errs: dict = field(default_factory=dict)  # str(alpha) -> train error (int8)
    naive_err: float | None = None  # per-tensor W and A int8, for comparison (int8)
    eval_rows: int = 0
    eval_on: str = "heldout"
    outlier_ratio: float = 0.0  # max / median of the per-channel input amax
    note: str = ""

    @property
    def bytes_q(self) -> int:
        return K.weight_bytes(self.out_features, self.in_features, self.fmt)

    @property
    def bytes_bf16(self) -> int:
        return K.weight_bytes(self.out_features, self.in_features, "bf16")

    def to_json(self) -> dict:
        return {"format": self.fmt, "act": self.act if self.fmt == "fp8" else None, "alpha": self.alpha,
                "err": self.err, "err_train": self.err_train, "alpha_errs": self.alpha_errs,
                "naive_err": self.naive_err, "eval_rows": self.eval_rows, "eval_on": self.eval_on,
                "outlier_ratio": self.outlier_ratio, "in_features": self.in_features,
                "out_features": self.out_features, "note": self.note}


# ----------------------------------------------------------------------------------------------------------
# Modules


class NaiveInt8Linear(K.QuantLinear):
    """Per-tensor int8 weights and per-tensor dynamic int8 activations (one scale for the whole input, as
    upstream's fp8 path does): the baseline calibrated int8 is compared with."""

    fmt = "int8-naive"

    def __init__(self, linear: nn.Linear):
        w = linear.weight.detach()
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None, w.device, w.dtype)
        self.w_scale = (w.float().abs().max() / 127.0).clamp(min=1e-12)
        self.register_buffer("weight", torch.round(w.float() / self.w_scale).clamp(-127, 127).to(torch.int8))
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def matmul(self, x2):
        sx = (x2.float().abs().max() / 127.0).clamp(min=1e-12)
        x8 = torch.round(x2.float() / sx).clamp(-127, 127)
        return (x8.double() @ self.weight.double().t()).float() * (sx * self.w_scale)


def smooth_factors(chan_amax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    a = chan_amax.float().clamp(min=1e-5)
    w = weight.float().abs().amax(0).clamp(min=1e-5)
    s = a.pow(alpha) / w.pow(1 - alpha)
    return s.clamp(min=1e-5).to(torch.float32)


def build_module(linear: nn.Linear, plan: LinearPlan) -> nn.Module:
    """The quantized module for `linear` under `plan` (bf16: the Linear itself)."""
    if plan.fmt == "bf16":
        return linear
    mod = K.quantized_linear(linear, plan.fmt, smooth=plan.smooth if plan.fmt == "int8" else None)
    if plan.fmt == "int8" and plan.smooth is None:
        mod.smooth = torch.ones(linear.in_features, dtype=torch.float32, device=linear.weight.device)
    if plan.fmt == "fp8" and plan.act_scales is not None:
        mod.register_buffer("act_scales", plan.act_scales.float().to(linear.weight.device).clone())
        mod.act_scale = mod.act_scales.max()
    return mod


def _quant_out(mod: nn.Module, x: torch.Tensor, steps: torch.Tensor | None = None) -> torch.Tensor:
    """Output (no bias) of a quantized module on rows x; static fp8 uses each row's step scale."""
    if isinstance(mod, K.Fp8Linear) and getattr(mod, "act_scales", None) is not None and steps is not None:
        out = torch.empty(x.shape[0], mod.out_features, dtype=torch.float32, device=x.device)
        for s in torch.unique(steps).tolist():
            idx = (steps == s).nonzero().squeeze(1).to(x.device)
            mod.act_scale = mod.act_scales[int(s)]
            out[idx] = mod.matmul(x.index_select(0, idx)).float()
        mod.act_scale = mod.act_scales.max()
        return out
    if isinstance(mod, (K.Int4Linear,)):
        return mod.matmul(x.to(mod.weight_scale.dtype)).float()
    return mod.matmul(x).float()


def _naive_out(mod: NaiveInt8Linear, x: torch.Tensor, steps: torch.Tensor | None) -> torch.Tensor:
    """Per-tensor activation scale per step (each step is one forward call at run time)."""
    if steps is None:
        return mod.matmul(x)
    out = torch.empty(x.shape[0], mod.out_features, dtype=torch.float32, device=x.device)
    for s in torch.unique(steps).tolist():
        idx = (steps == s).nonzero().squeeze(1).to(x.device)
        out[idx] = mod.matmul(x.index_select(0, idx))
    return out


@torch.no_grad()
def analyze_linear(name: str, linear: nn.Linear, stats: GroupStats, fmt: str, act: str = "dynamic",
                   alphas=DEFAULT_ALPHAS, smoothquant: bool = True) -> LinearPlan:
    """Choose the per-layer parameters of `fmt` for one Linear and measure its output error."""
    plan = LinearPlan(name, fmt, linear.in_features, linear.out_features, act=act if fmt == "fp8" else "dynamic")
    dev = linear.weight.device
    amax = stats.chan_amax.float()
    med = float(amax.median()) if amax.numel() else 0.0
    plan.outlier_ratio = float(amax.max() / med) if med > 0 else 0.0
    tr, ho = stats.train, stats.heldout
    if tr.rows is None:
        plan.note = "no calibration rows reached this layer"
        return plan
    x_tr, st_tr = tr.rows.to(dev), tr.steps
    if ho.rows is not None and ho.rows.shape[0] > 0:
        x_ev, st_ev, plan.eval_on = ho.rows.to(dev), ho.steps, "heldout"
    else:
        x_ev, st_ev, plan.eval_on = x_tr, st_tr, "calibration"
    plan.eval_rows = int(x_ev.shape[0])
    w = linear.weight.float()
    ref_tr, ref_ev = x_tr.float() @ w.t(), x_ev.float() @ w.t()

    if fmt == "int4" and linear.in_features % K.INT4_GROUP:
        plan.fmt, plan.note = "bf16", f"in_features {linear.in_features} is not a multiple of {K.INT4_GROUP}"
        return plan
    if fmt == "fp8" and act == "static":
        seen = stats.step_seen
        fallback = float(stats.step_amax[seen].max()) if bool(seen.any()) else 1.0
        amax_steps = torch.where(seen, stats.step_amax, torch.full_like(stats.step_amax, fallback))
        plan.act_scales = (amax_steps / K.FP8_MAX).clamp(min=1e-12).float()
    if fmt == "int8":
        candidates: list[float | None] = [None] + (list(alphas) if smoothquant else [])
        best = None
        for alpha in candidates:
            plan.alpha = alpha
            plan.smooth = None if alpha is None else smooth_factors(amax.to(dev), linear.weight, alpha)
            e = rel_err(_quant_out(build_module(linear, plan), x_tr), ref_tr)
            plan.alpha_errs["none" if alpha is None else f"{alpha:g}"] = e
            if best is None or e < best[0] - 1e-12:
                best = (e, alpha, plan.smooth)
        _, plan.alpha, plan.smooth = best
        plan.smooth = None if plan.smooth is None else plan.smooth.cpu()
        naive = NaiveInt8Linear(linear)
        plan.naive_err = rel_err(_naive_out(naive, x_ev, st_ev), ref_ev)
    mod = build_module(linear, plan)
    plan.err_train = rel_err(_quant_out(mod, x_tr, st_tr), ref_tr)
    plan.err = plan.err_train if x_ev is x_tr else rel_err(_quant_out(mod, x_ev, st_ev), ref_ev)
    if plan.act_scales is not None:
        plan.act_scales = plan.act_scales.cpu()
    return plan


def choose_keep_bf16(plans: dict[str, LinearPlan], mode: str, budget_bytes: int | None = None,
                     budget_fraction: float = 0.05) -> tuple[list[str], dict]:
    """Linears to keep in bf16 beyond kernels.KEEP_BF16.

    `mode` 'none'; 'auto' — the most sensitive (largest measured error) first, each taken if its extra bytes
    still fit the budget (default: `budget_fraction` of the quantized Linear bytes); otherwise a comma list of
    names or substrings ('blocks.0.', 'ffn.2') or fnmatch patterns."""
    import fnmatch

    quant = {n: p for n, p in plans.items() if p.fmt != "bf16"}
    total_q = sum(p.bytes_q for p in quant.values())
    info = {"mode": mode, "quantized_bytes": total_q}
    if mode in ("none", "", None):
        return [], info | {"budget_bytes": 0, "extra_bytes": 0}
    if mode == "auto":
        budget = int(budget_bytes if budget_bytes is not None else math.floor(budget_fraction * total_q))
        keep, extra = [], 0
        for name, p in sorted(quant.items(), key=lambda kv: (-kv[1].err, kv[0])):
            cost = p.bytes_bf16 - p.bytes_q
            if extra + cost <= budget:
                keep.append(name)
                extra += cost
        return sorted(keep), info | {"budget_bytes": budget, "extra_bytes": extra}
    pats = [s.strip() for s in mode.split(",") if s.strip()]
    keep = sorted(n for n in quant if any((fnmatch.fnmatchcase(n, s) if any(c in s for c in "*?[") else s in n)
                                          for s in pats))
    return keep, info | {"patterns": pats, "extra_bytes": sum(quant[n].bytes_bf16 - quant[n].bytes_q for n in keep)}
