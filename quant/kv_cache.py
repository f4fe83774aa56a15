"""A generation cache that stores keys and values packed, as a policy's ``kv`` section says.

:class:`PackedKVLayer` is a transformers cache layer: each ``update`` packs the new tokens' keys and
values with :func:`quant.kv.pack_kv` (per-token formats at once; ``rtn_channel`` a whole group of
tokens at a time, the tokens of a partial group kept unquantized until it fills, as KIVI does) and
returns every cached token decoded, so attention reads what the evaluation path
(:func:`quant.kv.quantize_kv` over the whole sequence) reads, up to float rounding. Its
:attr:`~PackedKVLayer.nbytes` is the memory it holds, which is :func:`quant.kv.kv_bytes` of the
tokens seen (on a 16-bit model; an fp32 model's unquantized tokens take 4 bytes).

Do not also install :func:`evaluators.kv_attention.install_kv` while generating with it: the keys
would be quantized twice. Usage::

    cache = packed_cache(model, policy.kv)
    model.generate(ids, past_key_values=cache, max_new_tokens=64)
    cache.nbytes  # bytes of the packed buffers and residuals of every layer
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from quant.kv import KVPair, KVSetting, PackedKV, check_pair, pack_kv, unpack_kv

__all__ = ["PackedKVLayer", "PackedCache", "packed_cache"]


class _Stream:
    """One role's (keys' or values') packed chunks plus the unquantized tokens of a partial group."""

    def __init__(self, setting: KVSetting):
        self.setting = setting
        self.chunks: list[PackedKV] = []
        self.tail: torch.Tensor | None = None  # (B, H, n < group, D): per-channel tokens waiting for a whole group

    def append(self, x: torch.Tensor) -> torch.Tensor:
        """Stores ``x`` ``(B, H, t, D)`` and returns every token stored so far, decoded."""
        if self.setting.kind.per_channel:
            x = x if self.tail is None else torch.cat([self.tail, x], dim=2)
            whole = x.shape[2] // self.setting.group * self.setting.group
            if whole:
                self.chunks.append(pack_kv(x[:, :, :whole], self.setting))
            self.tail = x[:, :, whole:].clone() if whole < x.shape[2] else None  # a copy: x's rest is freed
        else:
            self.chunks.append(pack_kv(x if self.setting.is_float else x.detach(), self.setting))
        parts = [unpack_kv(c) for c in self.chunks] + ([self.tail] if self.tail is not None else [])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    @property
    def nbytes(self) -> int:
        tail = 0 if self.tail is None else self.tail.numel() * self.tail.element_size()
        return sum(c.nbytes for c in self.chunks) + tail


class PackedKVLayer(DynamicLayer):
    """A full-attention layer's cache holding packed keys and values.

    Args:
        keys: setting of the keys.
        values: setting of the values.
    """

    is_croppable = False

    def __init__(self, keys: KVSetting, values: KVSetting):
        check_pair(keys, values)
        super().__init__()
        self.settings = (keys, values)
        self.cumulative_length = 0
        self._streams = (_Stream(keys), _Stream(values))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Packs the new ``(B, kv_heads, t, head_dim)`` keys and values; returns all cached ones decoded."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        return self._streams[0].append(key_states), self._streams[1].append(value_states)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def reset(self) -> None:
        self.cumulative_length = 0
        self._streams = (_Stream(self.settings[0]), _Stream(self.settings[1]))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("a packed KV cache does not reorder beams; generate without beam search")

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes, norms / scales and unquantized residual tokens, keys and values."""
        return sum(s.nbytes for s in self._streams)


class PackedCache(Cache):
    """A cache whose layers are :class:`PackedKVLayer` (float layers too: ``float`` settings)."""

    @property
    def nbytes(self) -> int:
        """Bytes every layer holds (see :attr:`PackedKVLayer.nbytes`)."""
        return sum(layer.nbytes for layer in self.layers)


def packed_cache(model: nn.Module, kv: Mapping[str, KVPair]) -> PackedCache:
    """A fresh generation cache for ``model`` that stores each attention module's keys and values
    with its ``kv`` settings (a module ``kv`` does not name caches in float, 16-bit counted).

    Raises:
        ValueError: a name that is no attention module with a ``layer_idx``, or a sliding-window
            layer (its cache drops old tokens, which this cache does not do yet).
    """
    config = model.config.get_text_config(decoder=True)
    n_layers = config.num_hidden_layers
    pairs: list[KVPair] = [(KVSetting(), KVSetting())] * n_layers
    modules = dict(model.named_modules())
    for name, pair in kv.items():
        module = modules.get(name)
        layer = getattr(module, "layer_idx", None)
        if module is None or not isinstance(layer, int) or not 0 <= layer < n_layers:
            raise ValueError(f"kv settings name {name!r}, which is not an attention module with a layer_idx "
                             f"in 0..{n_layers - 1} of this model")
        if getattr(module, "sliding_window", None):
            raise ValueError(f"{name!r} is a sliding-window layer; the packed cache holds full-attention layers only")
        pairs[layer] = pair
    return PackedCache(layers=[PackedKVLayer(k, v) for k, v in pairs])
