"""TurboQuant's quantization core: formats, bit packing, packed modules and policies.

Public API::

    packed = quant.quantize(weight, {"format": "rtn", "bits": 4, "group_size": 128})
    packed.dequantize(); packed.nbytes
    quant.apply_policy(model, policy)
"""

from quant.apply import apply_policy, quantize
from quant.calibration import collect_hessians, needs_hessians, quantize_calibrated
from quant.checkpoint import PackedCheckpoint, load_checkpoint, read_packed_tensors, save_checkpoint
from quant.formats import Format, format_names, get_format, register_format
from quant.modules import QuantEmbedding, QuantLinear
from quant.packed import PackedTensor
from quant.packing import pack_bits, packed_size, unpack_bits
from quant.policy import POLICY_VERSION, Policy, PolicyError, weight_matrices
from quant.settings import QuantSetting

__all__ = [
    "Format", "POLICY_VERSION", "PackedCheckpoint", "PackedTensor", "Policy", "PolicyError", "QuantEmbedding", "QuantLinear",
    "QuantSetting", "apply_policy", "collect_hessians", "load_checkpoint", "needs_hessians", "quantize_calibrated",
    "read_packed_tensors", "save_checkpoint", "format_names", "get_format", "pack_bits", "packed_size", "quantize",
    "register_format", "unpack_bits", "weight_matrices",
]
