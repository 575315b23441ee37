"""The offline quantizer (`lowvram quantize`, `lowvram reshard`); it writes the folders that `lowvram.quantized`
(the runtime side, re-exported here) loads."""

from lowvram.kernels.linear import set_act_step
from lowvram.manifest import read_manifest, verify_folder
from lowvram.quantized import load_quantized, load_quantized_stage

from .formats import LinearPlan, NaiveInt8Linear, analyze_linear, choose_keep_bf16
from .loader import QuantStream, QuantizedSource, layer_state
from .pipeline import QuantizeOptions, quantize_checkpoint
from .reshard import reshard

__all__ = [
    "LinearPlan", "NaiveInt8Linear", "QuantStream", "QuantizeOptions", "QuantizedSource", "analyze_linear",
    "choose_keep_bf16", "layer_state", "load_quantized", "load_quantized_stage", "quantize_checkpoint",
    "read_manifest", "reshard", "set_act_step", "verify_folder",
]
