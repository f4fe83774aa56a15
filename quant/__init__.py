"""TurboQuant's quantization core: formats, bit packing, packed modules and policies.

Public API::

    packed = quant.quantize(weight, {"format": "rtn", "bits": 4, "group_size": 128})
    packed.dequantize(); packed.nbytes
    weights = quant.float_weights(model)
    quant.apply_policy(model, policy)  # in place; partial=True quantizes only the matrices named
    quant.restore_float(model, weights)
    quant.kv_bytes(quant.KVSetting("turbo", 3), kv_heads, head_dim, tokens)  # a KV cache's packed bytes
"""

from quant.apply import apply_policy, quantize, restore_float
from quant.calibration import collect_hessians, needs_hessians, quantize_calibrated, quantize_calibrated_many
from quant.checkpoint import PackedCheckpoint, load_checkpoint, read_packed_tensors, save_checkpoint
from quant.formats import Format, FormatOptions, RuntimeMapping, format_names, get_format, register_format
from quant.kv import (AttentionInfo, KVSetting, PackedKV, kv_bytes, kv_settings, layer_kv_bytes, pack_kv, quantize_kv,
                      unpack_kv)
from quant.modules import PackedModule, PackedWeight, QuantEmbedding, QuantLinear, find_matrices, float_weights
from quant.packed import PackedTensor
from quant.packing import pack_bits, packed_size, unpack_bits
from quant.policy import POLICY_VERSION, Policy, PolicyError, weight_matrices
from quant.settings import QuantSetting

__all__ = [
    "Format", "POLICY_VERSION", "PackedCheckpoint", "PackedTensor", "Policy", "PolicyError", "QuantEmbedding", "QuantLinear",
    "QuantSetting", "apply_policy", "collect_hessians", "load_checkpoint", "needs_hessians", "quantize_calibrated",
    "quantize_calibrated_many",
    "read_packed_tensors", "save_checkpoint", "format_names", "get_format", "pack_bits", "packed_size", "quantize",
    "register_format", "unpack_bits", "weight_matrices",
    "PackedModule", "PackedWeight", "find_matrices", "float_weights", "restore_float",
    "FormatOptions", "RuntimeMapping",
    "AttentionInfo", "KVSetting", "PackedKV", "kv_bytes", "kv_settings", "layer_kv_bytes", "pack_kv", "quantize_kv",
    "unpack_kv",
]
