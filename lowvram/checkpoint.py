"""Checkpoints, one job per module (this module gathers their public names):

* `lowvram.headers`    safetensors headers, one tensor read at a time, sha256;
* `lowvram.pth`        pickled state dicts, opened only with `torch.load(weights_only=True)`;
* `lowvram.index`      where a checkpoint folder's tensors are (index + shards, or one file);
* `lowvram.identify`   the model side: expected keys and shapes, which model a checkpoint is, key checks;
* `lowvram.lora`       the LiveAvatar LoRA and its merge;
* `lowvram.loader`     streaming loads with the per-tensor transform (LoRA, overrides, TP slice, cast);
* `lowvram.inspection` what `lowvram inspect` reports.
"""

from lowvram.errors import CheckpointError  # noqa: F401
from lowvram.headers import (  # noqa: F401
    DTYPE_NAMES, MAX_HEADER_BYTES, Header, TensorEntry, check_no_overlap, dtype_name, file_index, file_sha256,
    read_header, read_tensor,
)
from lowvram.identify import (  # noqa: F401
    CONFIG_NAME, KeyReport, build_meta_model, check_keys, expected_shapes, identify, linear_weight_keys,
    read_config_json,
)
from lowvram.index import INDEX_NAME, LORA_NAME, SINGLE_NAME, checkpoint_index  # noqa: F401
from lowvram.inspection import inspect_checkpoint, inspect_renderables  # noqa: F401
from lowvram.loader import assign_tensor, load_state_dict_streaming  # noqa: F401
from lowvram.lora import LORA_ALPHA, LORA_PREFIX, LORA_TARGETS, LoraWeights, lora_target_modules, read_lora  # noqa: F401
from lowvram.pth import PICKLE_SUFFIXES, PickleRefusedError, torch_load_weights  # noqa: F401
