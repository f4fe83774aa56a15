"""Quantized keys and values in evaluation, hooked where attention reads them.

transformers runs every attention module through a function it looks up by name in its
``AttentionInterface`` (``config._attn_implementation``: ``"sdpa"``, ``"eager"``, ...). For each
original implementation ``impl`` this module registers ``"turboquant_kv_<impl>"``: it quantizes
the key and value tensors it receives (after rotary, before grouped-query heads are repeated:
exactly what a cache holds) with the calling module's :class:`~quant.kv.KVSetting` pair, then calls
``impl`` itself with the same arguments. Its mask function is ``impl``'s, so a float setting
computes exactly what the model computed before. Weights are untouched; modules without a setting
pass through. Any causal LM whose attention goes through the interface (all current transformers
decoders) gets it, at no cost to modules that are not quantized.

Usage::

    infos = attention_modules(model)      # {"model.layers.0.self_attn": AttentionInfo(3, 64), ...}
    install_kv(model, {name: (KVSetting("turbo", 4), KVSetting("turbo", 4)) for name in infos})
    ...                                    # forwards read quantized keys and values
    remove_kv(model)                       # back to the original attention, bit for bit

    with captured_kv(model, grad=True) as seen:  # what attention receives, for the one-pass proxy
        loss = f(model(input_ids=ids, use_cache=False))
    torch.autograd.grad(loss, [seen[name].key_probe])  # d loss / d keys of that module
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from quant.kv import FLOAT_KV, AttentionInfo, KVPair, check_pair, layer_kv_bytes, quantize_kv

__all__ = ["attention_modules", "has_kv", "install_kv", "remove_kv", "kv_installed", "kv_figures", "captured_kv", "KVCapture",
           "PREFIX"]

PREFIX = "turboquant_kv_"
_SETTING = "_turboquant_kv"  # attribute of an attention module: its (keys, values) settings
_ORIGINAL = "_turboquant_kv_original"  # attribute of a model: [(config, its original implementation)]
_INFOS = "_turboquant_kv_infos"  # attribute of a model: what attention_modules found (the architecture is fixed)
_trace: dict[int, AttentionInfo] | None = None  # set while attention_modules() records what calls attention


@dataclass
class KVCapture:
    """The key and value (``(B, kv_heads, T, head_dim)``, after rotary, before grouped-query repeat,
    detached) one attention module passed to attention in the last forward. With ``grad``, the probes
    are zero tensors of their shapes, requiring grad, added to what attention read: a loss's gradient
    with respect to a probe is its total gradient with respect to that key or value; else ``None``."""

    key: torch.Tensor
    value: torch.Tensor
    key_probe: torch.Tensor | None = None
    value_probe: torch.Tensor | None = None


_capture: tuple[dict[int, str], dict[str, KVCapture], bool] | None = None  # set inside captured_kv()


def _record(module: nn.Module, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Records what ``module`` passes to attention; with gradients, returns key and value plus their probes."""
    names, seen, grad = _capture
    entry = KVCapture(key.detach(), value.detach())
    if grad:
        # A zero leaf added (exact: x + 0 == x) rather than a detached copy of the key: the graph through
        # the key to earlier layers stays whole, so the probe's gradient is the key's total gradient.
        entry.key_probe = torch.zeros_like(key, requires_grad=True)
        entry.value_probe = torch.zeros_like(value, requires_grad=True)
        key, value = key + entry.key_probe, value + entry.value_probe
    seen[names[id(module)]] = entry
    return key, value


def _original_function(impl: str, module: nn.Module) -> Callable[..., Any]:
    """``impl``'s attention function; ``"eager"`` is each model's own, found in the module's file."""
    if impl == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__name__} runs eager attention but its module "
                               f"{type(module).__module__} has no eager_attention_forward; load the model "
                               f"with attn_implementation='sdpa' to quantize its KV cache")
        return fn
    return ALL_ATTENTION_FUNCTIONS[impl]


def _kv_attention(impl: str) -> Callable[..., Any]:
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> Any:
        # key, value: (B, kv_heads, T, head_dim)
        if _trace is not None:
            _trace[id(module)] = AttentionInfo(key.shape[1], key.shape[3], kwargs.get("sliding_window"))
        if _capture is not None:
            key, value = _record(module, key, value)
        pair: KVPair | None = getattr(module, _SETTING, None)
        if pair is not None:
            key, value = quantize_kv(key, pair[0]), quantize_kv(value, pair[1])
        return _original_function(impl, module)(module, query, key, value, attention_mask, *args, **kwargs)

    attention.__name__ = f"{PREFIX}{impl}"
    return attention


def _register(impl: str) -> str:
    """Registers (once) the quantizing wrapper of ``impl`` and its mask function; returns its name."""
    name = PREFIX + impl
    if name not in ALL_ATTENTION_FUNCTIONS:
        if impl != "eager" and impl not in ALL_ATTENTION_FUNCTIONS:
            raise ValueError(f"attention implementation {impl!r} is not registered in transformers")
        mask = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(impl)
        if mask is not None:  # without one transformers builds no mask: implementations such as TGI's
            AttentionMaskInterface.register(name, mask)
        AttentionInterface.register(name, _kv_attention(impl))
    return name


def _configs(model: nn.Module) -> list[PretrainedConfig]:
    """Every distinct config the model's modules read their attention implementation from."""
    seen: dict[int, PretrainedConfig] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            seen.setdefault(id(config), config)
    return list(seen.values())


def _wrap(model: nn.Module) -> None:
    """Points every config of the model at the wrapper of its own implementation (once)."""
    if hasattr(model, _ORIGINAL):
        return
    original = []
    for config in _configs(model):
        impl = config._attn_implementation_internal
        if isinstance(impl, str) and not impl.startswith(PREFIX):
            original.append((config, impl))
            config._attn_implementation_internal = _register(impl)  # the attribute itself: no sub-config recursion
    model.__dict__[_ORIGINAL] = original  # not an nn.Module attribute: nothing registered, nothing saved


def has_kv(model: nn.Module) -> bool:
    """Whether KV cache settings are installed on some module of ``model``."""
    return any(_SETTING in m.__dict__ for m in model.modules())


def remove_kv(model: nn.Module) -> None:
    """Undoes :func:`install_kv`: original attention implementation, no settings (no-op if none)."""
    for module in model.modules():
        module.__dict__.pop(_SETTING, None)
    for config, impl in model.__dict__.pop(_ORIGINAL, []):
        config._attn_implementation_internal = impl


@torch.inference_mode()
def attention_modules(model: nn.Module) -> dict[str, AttentionInfo]:
    """The model's attention modules (those that call transformers' attention interface), by name,
    with their KV heads, head dimension and sliding window, from one forward over two tokens
    (made once per model: quantizing weights does not change what attention caches).

    Raises:
        RuntimeError: no module called the attention interface (the model computes attention its own way).
    """
    global _trace
    if _INFOS in model.__dict__:
        return dict(model.__dict__[_INFOS])
    names = {id(m): name for name, m in model.named_modules()}
    had = hasattr(model, _ORIGINAL)
    _wrap(model)
    _trace = {}
    try:
        device = next(model.parameters()).device
        model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
        found = {names[i]: info for i, info in _trace.items()}
    finally:
        _trace = None
        if not had:
            remove_kv(model)
    if not found:
        raise RuntimeError(f"{type(model).__name__} does not run its attention through transformers' "
                           f"AttentionInterface, so its keys and values cannot be quantized here")
    model.__dict__[_INFOS] = found
    return dict(found)


def install_kv(model: nn.Module, settings: Mapping[str, KVPair]) -> None:
    """Quantizes the keys and values of the named attention modules (and only those) from now on.

    Replaces whatever an earlier call installed. ``settings``: attention module name ->
    ``(keys setting, values setting)``; names as :func:`attention_modules` lists them.

    Raises:
        ValueError: a name that is not an attention module of the model, or an invalid pair.
    """
    modules = dict(model.named_modules())
    for name, pair in settings.items():
        if name not in modules:
            raise ValueError(f"kv settings name {name!r}, which is not a module of the model; "
                             f"list its attention modules with evaluators.kv_attention.attention_modules(model)")
        check_pair(*pair)
    known = attention_modules(model) if settings else {}
    wrong = sorted(set(settings) - set(known))
    if wrong:
        raise ValueError(f"kv settings name {len(wrong)} modules that are not attention modules (e.g. {wrong[0]!r}); "
                         f"the attention modules are {sorted(known)[:3]}...")
    remove_kv(model)
    if not settings:
        return
    _wrap(model)
    for name, (k, v) in settings.items():
        modules[name].__dict__[_SETTING] = (k, v)


@contextmanager
def kv_installed(model: nn.Module, settings: Mapping[str, KVPair]) -> Iterator[None]:
    """:func:`install_kv` for the block, then :func:`remove_kv`."""
    install_kv(model, settings)
    try:
        yield
    finally:
        remove_kv(model)


def kv_figures(model: nn.Module, settings: Mapping[str, KVPair], tokens: int) -> dict[str, float]:
    """What an evaluation reports of KV settings over windows of ``tokens`` tokens: ``kv_bytes`` (the
    cache of one window over every attention module, those ``settings`` does not name in fp16),
    ``kv_bytes_per_token`` and ``kv_bits`` (bits per cached element, scales and norms included)."""
    infos = attention_modules(model)
    nbytes = sum(layer_kv_bytes(info, settings.get(name, (FLOAT_KV, FLOAT_KV)), tokens) for name, info in infos.items())
    elements = sum(2 * info.kv_heads * info.head_dim * info.cached_tokens(tokens) for info in infos.values())
    return {"kv_bytes": nbytes, "kv_bytes_per_token": nbytes / tokens, "kv_bits": 8.0 * nbytes / elements}


@contextmanager
def captured_kv(model: nn.Module, *, grad: bool = False) -> Iterator[dict[str, KVCapture]]:
    """Records, per attention module name, the key and value tensors each forward in the block passes
    to attention (the last forward's, if several): a dict filled as the forwards run.

    Without ``grad`` outputs are exactly the same; with it, each key and value gets a zero probe
    (:class:`KVCapture`) to take gradients against (call the model under ``torch.enable_grad()``),
    and outputs keep their values. Outside the block the attention path costs one ``None`` test.

    Raises:
        RuntimeError: a capture is already active, or KV settings are installed (it records the float cache).
    """
    global _capture
    if _capture is not None:
        raise RuntimeError("captured_kv is already active (captures do not nest)")
    if has_kv(model):
        raise RuntimeError("captured_kv records the float cache's tensors; call remove_kv(model) first")
    had = hasattr(model, _ORIGINAL)
    _wrap(model)
    seen: dict[str, KVCapture] = {}
    _capture = ({id(m): name for name, m in model.named_modules()}, seen, grad)
    try:
        yield seen
    finally:
        _capture = None
        if not had:
            remove_kv(model)
