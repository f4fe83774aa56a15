"""The KV cache's precision: a setting per key or value tensor, its packed layout and exact bytes.

A cached key or value tensor is ``(batch, kv_heads, tokens, head_dim)`` (keys after rotary).
Each :class:`KVSetting` stores it through one of the weight formats, on a 2-D view of it, so
the numerics, the bit packing and the byte count are the formats' own (no second quantizer):

- ``turbo``: each head vector is one group of the ``turbo`` format (a seeded randomized
  Hadamard rotation, the Lloyd-Max codebook of N(0, 1) per coordinate, one fp16 scale per
  vector: its RMS, i.e. its norm over ``sqrt(head_dim)``). With ``qjl`` (keys only) the
  codebook has ``bits - 1`` bits and the 1-bit QJL sketch of the residual (plus its fp16 norm)
  takes the last bit: ``bits`` is the total per coordinate, as in the TurboQuant paper. The
  rotation's seed is turbo's default (0) for every layer; a head of other than 32..256 dims
  (a power of two) is padded to the next group (its padding's codes counted) or split into 256s.
- ``rtn_token``: each head vector is one asymmetric min/max group of ``rtn`` (fp16 scale
  and offset per vector), the usual per-token cache quantization.
- ``rtn_channel``: keys per channel (KIVI): each channel of each head over ``group``
  consecutive tokens (default 128, groups aligned from the first token) shares an fp16 scale and
  offset; the last ``tokens % group`` tokens, not yet a whole group, stay unquantized (KIVI's
  residual) until the group fills.
- ``float`` (``bits`` 16): not quantized.

Unquantized elements (``float``, the residual) are kept in the model's dtype and counted at 2 bytes,
as a 16-bit (fp16 / bf16) deployment holds them; an fp32 model is evaluated in fp32 (so a float
cache reproduces its outputs exactly). Evaluation quantizes a whole window at once: the cache as it
is read back after the window's prefill, which is also what :mod:`quant.kv_cache` holds while generating.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from quant.formats import get_format
from quant.packed import PackedTensor
from quant.settings import QuantSetting

__all__ = ["KVSetting", "KVFormat", "KVPair", "PackedKV", "AttentionInfo", "KV_FORMATS", "KV_BITS", "CHANNEL_GROUPS",
           "pack_kv", "unpack_kv", "quantize_kv", "kv_bytes", "layer_kv_bytes", "kv_settings",
           "FLOAT_KV", "check_pair", "kv_to_dict", "kv_from_dict", "KV_ROLES", "kv_unit", "split_kv_unit"]

KV_BITS = (2, 3, 4, 8, 16)
CHANNEL_GROUPS = (32, 64, 128, 256)  # tokens per scale of rtn_channel: rtn's group sizes
DEFAULT_CHANNEL_GROUP = 128  # 0.25 bit of scale and offset per element, as turbo's one fp16 scale per 64 dims
_TURBO_GROUPS = (32, 64, 128, 256)  # the Hadamard transform needs a power of two
_KEYS = ("format", "bits", "qjl", "group")


@dataclass(frozen=True)
class KVFormat:
    """One way a cache holds keys or values: a weight format applied to a 2-D view of the tensor.

    Attributes:
        name: the setting's ``format``.
        weight_format: the weight format that packs the view (``None``: kept in 16-bit, unquantized).
        per_channel: the view's rows are channels and its groups run over tokens (whole groups of tokens
            are quantized, the rest kept as it came); else its rows are the tokens' head vectors.
        qjl: may spend one of its bits on the QJL sketch of the residual (keys only, :func:`check_pair`).
        keys_only: offered for keys only (per-channel scales are KIVI's answer to the keys' channel outliers).
    """

    name: str
    weight_format: str | None
    per_channel: bool = False
    qjl: bool = False
    keys_only: bool = False

    @property
    def is_float(self) -> bool:
        return self.weight_format is None


# The KV cache formats, by name: the one place that says what each one is.
KV_FORMATS: dict[str, KVFormat] = {f.name: f for f in (
    KVFormat("turbo", "turbo", qjl=True),  # a rotation, then Lloyd-Max codes of the head vector
    KVFormat("rtn_token", "rtn"),  # min/max per head vector
    KVFormat("rtn_channel", "rtn", per_channel=True, keys_only=True),  # min/max per channel over a group of tokens
    KVFormat("float", None),
)}


@dataclass(frozen=True)
class KVSetting:
    """How one layer's keys or values are cached.

    Attributes:
        format: one of :data:`KV_FORMATS`.
        bits: bits per element in :data:`KV_BITS`; 16 exactly when ``format`` is ``"float"``.
            With ``qjl``, the total of codebook bits and the QJL bit.
        qjl: ``turbo`` only (and keys only, see :func:`check_pair`): spend one of the bits on
            the QJL sketch of the residual (unbiased inner products with the queries).
        group: ``rtn_channel`` only: tokens per scale (one of :data:`CHANNEL_GROUPS`; default 128).

    Raises:
        ValueError: a combination the cache cannot store, saying what is allowed.
    """

    format: str = "float"
    bits: int = 16
    qjl: bool = False
    group: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.format, str) or self.format not in KV_FORMATS:
            raise ValueError(f"KV format must be one of {tuple(KV_FORMATS)}, got {self.format!r}")
        if isinstance(self.bits, bool) or self.bits not in KV_BITS:
            raise ValueError(f"KV bits must be one of {KV_BITS}, got {self.bits!r}")
        if (self.bits == 16) != self.is_float:
            raise ValueError(f"bits 16 means an unquantized cache: write {{'format': 'float', 'bits': 16}} "
                             f"(got format {self.format!r} with bits {self.bits})")
        if not isinstance(self.qjl, bool):
            raise ValueError(f"KV qjl must be a boolean, got {self.qjl!r}")
        if self.qjl and not self.kind.qjl:
            raise ValueError(f"qjl is a residual of the turbo codebook; format {self.format!r} has none")
        if self.kind.per_channel:
            if self.group is None:
                object.__setattr__(self, "group", DEFAULT_CHANNEL_GROUP)  # frozen: set once, here
            elif isinstance(self.group, bool) or self.group not in CHANNEL_GROUPS:
                raise ValueError(f"rtn_channel group (tokens per scale) must be one of {CHANNEL_GROUPS}, "
                                 f"got {self.group!r}")
        elif self.group is not None:
            raise ValueError(f"group (tokens per scale) is for rtn_channel only; format {self.format!r} "
                             f"takes none (got {self.group!r})")

    @property
    def kind(self) -> KVFormat:
        """The setting's format (:data:`KV_FORMATS`)."""
        return KV_FORMATS[self.format]

    @property
    def is_float(self) -> bool:
        return self.kind.is_float

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "bits": self.bits, "qjl": self.qjl, "group": self.group}

    @classmethod
    def from_dict(cls, data: Any) -> "KVSetting":
        """Builds and validates a setting from ``{"format", "bits"[, "qjl"][, "group"]}``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a KV setting must be an object like {{'format': 'turbo', 'bits': 4}}, got {data!r}")
        unknown = set(data) - set(_KEYS)
        if unknown:
            raise ValueError(f"unknown KV setting keys {sorted(unknown)}; allowed: {', '.join(_KEYS)}")
        if "format" not in data or "bits" not in data:
            raise ValueError(f"a KV setting needs 'format' and 'bits', got {dict(data)!r}")
        return cls(data["format"], data["bits"], data.get("qjl", False), data.get("group"))

    def key(self) -> str:
        """A canonical string, equal for equal settings (for caches and study parameters)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def describe(self) -> str:
        """Short label: ``turbo3``, ``turbo3qjl``, ``rtn_token4``, ``rtn_channel2g128``, ``float16``."""
        return (f"{self.format}{self.bits}" + ("qjl" if self.qjl else "")
                + (f"g{self.group}" if self.group is not None else ""))


FLOAT_KV = KVSetting()
KVPair = tuple[KVSetting, KVSetting]  # (keys, values) of one attention module
KV_ROLES = ("k", "v")


def kv_unit(module: str, role: str) -> str:
    """The search's unit name of one attention module's keys (``role="k"``) or values: ``"<module>:kv_k"``.
    The colon keeps it apart from every module path (the units of weights)."""
    if role not in KV_ROLES:
        raise ValueError(f"role must be 'k' (keys) or 'v' (values), got {role!r}")
    return f"{module}:kv_{role}"


def split_kv_unit(unit: str) -> tuple[str, str] | None:
    """``(module, role)`` of a :func:`kv_unit` name; ``None`` for any other unit (a weight unit)."""
    module, sep, role = unit.rpartition(":kv_")
    return (module, role) if sep and module and role in KV_ROLES else None


def check_pair(k: KVSetting, v: KVSetting) -> None:
    """Raises ``ValueError`` unless ``(k, v)`` is a valid (keys, values) pair: QJL only on keys."""
    if v.qjl:
        raise ValueError("qjl is for keys only (it makes the queries' inner products unbiased; "
                         "values need low MSE, which QJL raises): drop it from the 'v' setting")


@dataclass(frozen=True)
class AttentionInfo:
    """What one attention module caches per token.

    Attributes:
        kv_heads: key / value heads (after grouped-query sharing).
        head_dim: dimensions per head.
        sliding_window: the window of a sliding-window layer, which caches at most that many
            tokens; ``None`` for a full-attention layer.
    """

    kv_heads: int
    head_dim: int
    sliding_window: int | None = None

    def cached_tokens(self, context: int) -> int:
        """Tokens this layer holds at ``context`` tokens."""
        return context if self.sliding_window is None else min(context, self.sliding_window)


def _turbo_group(head_dim: int) -> int:
    """turbo's group for a head: the head itself, padded up to a power of two (256 at most)."""
    return next((g for g in _TURBO_GROUPS if g >= head_dim), _TURBO_GROUPS[-1])


def _quant_setting(s: KVSetting, head_dim: int) -> QuantSetting:
    """The weight-format setting that stores ``s`` on the 2-D view of :func:`_matrix`."""
    fmt = s.kind.weight_format
    if fmt == "turbo":  # one group per head vector, padded up to a power of two
        return QuantSetting(fmt, s.bits - int(s.qjl), _turbo_group(head_dim), {"qjl": True} if s.qjl else {})
    # Per token: one group per row (the head vector); per channel: rows are channels, groups run over tokens.
    return QuantSetting(fmt, s.bits, s.group if s.kind.per_channel else None, {})


def _quantized_tokens(s: KVSetting, tokens: int) -> int:
    """How many of ``tokens`` are quantized: all, none (float), or whole ``rtn_channel`` groups."""
    if s.is_float:
        return 0
    return tokens // s.group * s.group if s.kind.per_channel else tokens


def _matrix_shape(s: KVSetting, shape: tuple[int, int, int, int]) -> tuple[int, int]:
    b, h, t, d = shape
    return (b * h * d, t) if s.kind.per_channel else (b * h * t, d)


def _matrix(x: torch.Tensor, s: KVSetting) -> torch.Tensor:
    """``(B, H, T, D)`` -> the 2-D view the format quantizes: ``(B*H*T, D)``, or per channel ``(B*H*D, T)``."""
    if s.kind.per_channel:
        return x.transpose(-1, -2).reshape(-1, x.shape[-2])
    return x.reshape(-1, x.shape[-1])


@dataclass
class PackedKV:
    """A key or value tensor as a cache holds it.

    Attributes:
        setting: how it is stored.
        shape: ``(batch, kv_heads, tokens, head_dim)``.
        dtype: the dtype it is read back in (the model's).
        packed: the format's packed buffers (codes, norms / scales, QJL signs); ``None`` when
            nothing is quantized (float, or fewer tokens than a ``rtn_channel`` group).
        residual: the unquantized tokens ``(batch, kv_heads, n, head_dim)`` in the model's dtype: all
            of them for float, the last partial group for ``rtn_channel``; else ``None``.
    """

    setting: KVSetting
    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    packed: PackedTensor | None = None
    residual: torch.Tensor | None = None

    @property
    def buffers(self) -> dict[str, torch.Tensor]:
        out = dict(self.packed.buffers) if self.packed is not None else {}
        if self.residual is not None:
            out["residual"] = self.residual
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers held (a float tensor counts its own dtype's size)."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


def pack_kv(x: torch.Tensor, setting: KVSetting) -> PackedKV:
    """Packs a ``(batch, kv_heads, tokens, head_dim)`` key or value tensor with ``setting``."""
    if x.dim() != 4:
        raise ValueError(f"a key / value tensor is (batch, kv_heads, tokens, head_dim), got shape {tuple(x.shape)}")
    shape = tuple(x.shape)
    t = _quantized_tokens(setting, shape[2])
    residual = x[:, :, t:] if t < shape[2] else None
    if not t:
        return PackedKV(setting, shape, x.dtype, residual=residual)
    qs = _quant_setting(setting, shape[-1])
    packed = get_format(qs.format).quantize(_matrix(x.detach()[:, :, :t], setting), qs)
    return PackedKV(setting, shape, x.dtype, packed=packed, residual=residual)


def unpack_kv(p: PackedKV) -> torch.Tensor:
    """The tensor :func:`pack_kv` stored, in its dtype, shaped ``(batch, kv_heads, tokens, head_dim)``."""
    if p.packed is None:
        return p.residual
    b, h, _, d = p.shape
    t = _quantized_tokens(p.setting, p.shape[2])
    m = p.packed.dequantize().to(p.dtype)  # (rows, cols) of _matrix
    x = m.view(b, h, d, t).transpose(-1, -2) if p.setting.kind.per_channel else m.view(b, h, t, d)
    # (tokens, dims) rows in memory, as attention kernels read them: SDPA on the CPU runs 4x slower on a
    # transposed view (rtn_channel's rows are channels) or a padded head's slice.
    return x.contiguous() if p.residual is None else torch.cat([x, p.residual], dim=2)


def quantize_kv(x: torch.Tensor, setting: KVSetting) -> torch.Tensor:
    """``x`` as the cache reads it back (quantize, pack, unpack); ``x`` itself for a float setting."""
    return x if setting.is_float else unpack_kv(pack_kv(x, setting))


def kv_bytes(setting: KVSetting, kv_heads: int, head_dim: int, tokens: int, batch: int = 1) -> int:
    """Bytes a cache holds for one layer's keys (or values) over ``tokens`` tokens: exactly
    :attr:`PackedKV.nbytes` of ``pack_kv`` on such a tensor of a 16-bit dtype (unquantized
    elements, a float setting's or a ``rtn_channel`` residual's, count 2 bytes)."""
    shape = (batch, kv_heads, tokens, head_dim)
    if min(shape) < 1:
        raise ValueError(f"kv_heads, head_dim, tokens and batch must be positive, got {shape}")
    t = _quantized_tokens(setting, tokens)
    residual = 2 * batch * kv_heads * (tokens - t) * head_dim  # 16-bit
    if not t:
        return residual
    qs = _quant_setting(setting, head_dim)
    return residual + get_format(qs.format).expected_nbytes(_matrix_shape(setting, (batch, kv_heads, t, head_dim)), qs)


def layer_kv_bytes(info: AttentionInfo, pair: KVPair, context: int, batch: int = 1) -> int:
    """Cache bytes of one attention module (keys + values) at ``context`` tokens."""
    tokens = info.cached_tokens(context)
    return sum(kv_bytes(s, info.kv_heads, info.head_dim, tokens, batch) for s in pair)


def kv_settings(role: str) -> list[KVSetting]:
    """The candidate settings of keys (``role="k"``) or values (``"v"``), float first.

    Keys: turbo at 2/3/4/8 bits with and without QJL (2-bit QJL = 1-bit codebook + 1 bit),
    rtn_token and rtn_channel (128 tokens per scale) at 2/3/4/8. Values: turbo and rtn_token.
    """
    if role not in ("k", "v"):
        raise ValueError(f"role must be 'k' (keys) or 'v' (values), got {role!r}")
    bits = (2, 3, 4, 8)
    kinds = [f for f in KV_FORMATS.values() if not f.is_float]
    out = [FLOAT_KV] + [KVSetting(f.name, b) for f in kinds if not f.keys_only for b in bits]
    if role == "k":
        out += [KVSetting(f.name, b, qjl=True) for f in kinds if f.qjl for b in bits]
        out += [KVSetting(f.name, b) for f in kinds if f.keys_only for b in bits]
    return out


def kv_to_dict(kv: Mapping[str, KVPair]) -> dict[str, dict[str, Any]]:
    """The policy document's ``"kv"`` section: ``{module: {"k": setting, "v": setting}}``."""
    return {name: {"k": k.to_dict(), "v": v.to_dict()} for name, (k, v) in kv.items()}


def kv_from_dict(data: Any) -> dict[str, KVPair]:
    """Reads and validates a ``"kv"`` section (see :func:`kv_to_dict`); ``ValueError`` naming the module."""
    if not isinstance(data, Mapping):
        raise ValueError(f"'kv' must be an object mapping attention modules to {{'k': ..., 'v': ...}}, got {data!r}")
    out: dict[str, KVPair] = {}
    for name, entry in data.items():
        try:
            if not isinstance(entry, Mapping) or set(entry) != {"k", "v"}:
                raise ValueError(f"an entry is {{'k': setting, 'v': setting}}, got {entry!r}")
            pair = (KVSetting.from_dict(entry["k"]), KVSetting.from_dict(entry["v"]))
            check_pair(*pair)
        except ValueError as exc:
            raise ValueError(f"kv module {name!r}: {exc}") from None
        out[str(name)] = pair
    return out
