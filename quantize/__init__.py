"""The offline quantizer (`lowvram quantize`, `lowvram reshard`) and the loader of its output folders."""

from .formats import LinearPlan, NaiveInt8Linear, analyze_linear, choose_keep_bf16, set_act_step
from .loader import (
    QuantStream, QuantizedSource, layer_state, load_quantized, load_quantized_stage, read_manifest, verify_folder,
)
from .pipeline import QuantizeOptions, quantize_checkpoint
from .reshard import reshard

__all__ = [
    "LinearPlan", "NaiveInt8Linear", "QuantStream", "QuantizeOptions", "QuantizedSource", "analyze_linear",
    "choose_keep_bf16", "layer_state", "load_quantized", "load_quantized_stage", "quantize_checkpoint",
    "read_manifest", "reshard", "set_act_step", "verify_folder",
]
