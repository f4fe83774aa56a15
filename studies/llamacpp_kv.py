"""A policy's KV cache settings as llama.cpp runs a cache: one ``--cache-type-k``, one ``--cache-type-v``.

llama.cpp holds every layer's keys in one type and every layer's values in one type, chosen on the
command line of ``llama-cli`` / ``llama-server`` from f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl,
q5_0 and q5_1 (``kv_cache_types`` in its ``common/arg.cpp``). Each quantized type stores blocks of 32
elements of one token's head vector: integer codes and an fp16 scale (``_1``: and a minimum;
``iq4_nl``: a fixed non-uniform grid). So a policy's per-layer settings collapse, per role, to the
type whose code bits are nearest to the layers' mean (a layer the policy leaves float counts 16; ties
to the wider type). Of the types at a width the symmetric one is taken (q4_0, q5_0): a block's
minimum costs half a bit more per element, which is further from the policy's bytes (a 4-bit turbo
or per-token vector of 64 dims holds 4.25 or 4.5 bits with its scales, q4_0 4.5, q4_1 5.0), and q4_0,
q8_0 and f16 are the pairs llama.cpp's CUDA build compiles flash attention for by default.

No torch here: this reads the policy document's ``"kv"`` section (quant's closed set of KV formats,
``quant.kv.KV_FORMATS``, by name), as the other runtime exports read its ``"matrices"``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["CACHE_TYPE_BITS", "CacheTypes", "llamacpp_cache_types"]

# Code bits per element of the cache types chosen (the nearest width wins).
CACHE_TYPE_BITS = {"q4_0": 4, "q5_0": 5, "q8_0": 8, "f16": 16}
_CUDA_FA_PAIRS = {("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0")}  # GGML_CUDA_FA_QUANTS' default
_ROLES = {"k": "keys", "v": "values"}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# What each KV format has that no llama.cpp cache type has (why the mapping is approximate).
_LOST = {
    "turbo": "no rotated Lloyd-Max codebook in llama.cpp (uniform integer codes per 32-element block)",
    "rtn_channel": "no per-channel key scales (KIVI) in llama.cpp: it scales each token's vector per 32 "
                   "elements, so channel outliers are not isolated",
    "rtn_token": "asymmetric min/max per vector -> a symmetric scale per 32 elements",
}


@dataclass(frozen=True)
class CacheTypes:
    """The llama.cpp cache types nearest to a policy's KV settings.

    Attributes:
        k: ``--cache-type-k`` (one of :data:`CACHE_TYPE_BITS`).
        v: ``--cache-type-v``.
        notes: one line per thing the mapping loses (per-layer settings collapsed, formats or bits
            llama.cpp does not have); empty when llama.cpp holds exactly the policy's cache.
    """

    k: str
    v: str
    notes: list[str] = field(default_factory=list)

    @property
    def flags(self) -> list[str]:
        """The arguments to pass to ``llama-cli`` / ``llama-server`` (a quantized value cache needs flash
        attention, which llama.cpp's default ``--flash-attn auto`` turns on for it)."""
        return ["--cache-type-k", self.k, "--cache-type-v", self.v]


def _nearest(value: float) -> str:
    return min(CACHE_TYPE_BITS, key=lambda t: (abs(CACHE_TYPE_BITS[t] - value), -CACHE_TYPE_BITS[t]))


def _describe(s: Mapping[str, Any]) -> str:
    """The label quant.kv.KVSetting.describe() gives: ``turbo3``, ``turbo3qjl``, ``rtn_channel2g128``."""
    return (f"{s['format']}{s['bits']}" + ("qjl" if s.get("qjl") else "")
            + (f"g{s['group']}" if s.get("group") is not None else ""))


def _entries(doc: Mapping[str, Any], kv: Mapping[str, Any]) -> list[dict[str, dict[str, Any]]]:
    """Every attention module's ``{"k": setting, "v": setting}``: the kv section's, and float for each
    layer the policy's matrices show but the kv section does not name (quant caches those in float)."""
    out: list[dict[str, dict[str, Any]]] = []
    for name, entry in kv.items():
        if not isinstance(entry, Mapping) or any(not isinstance(entry.get(r), Mapping)
                                                 or not {"format", "bits"} <= set(entry[r]) for r in _ROLES):
            raise ValueError(f"kv module {name!r}: an entry is {{'k': setting, 'v': setting}}, each setting with "
                             f"'format' and 'bits' (as quant.Policy writes it), got {entry!r}")
        out.append({r: dict(entry[r]) for r in _ROLES})
    named = {int(m.group(1)) for n in kv if (m := _LAYER.search(str(n)))}
    shown = {int(m.group(1)) for n in doc.get("matrices") or {} if (m := _LAYER.search(str(n)))}
    return out + [{r: {"format": "float", "bits": 16} for r in _ROLES} for _ in shown - named]


def _role(settings: list[dict[str, Any]], role: str) -> tuple[str, list[str]]:
    """The cache type of one role's per-layer settings, and what it loses."""
    mean = sum(s["bits"] for s in settings) / len(settings)
    chosen = _nearest(mean)
    bits = CACHE_TYPE_BITS[chosen]
    counts = Counter(_describe(s) for s in settings)
    notes = []
    if len(counts) > 1:
        notes.append(f"KV {_ROLES[role]}: per-layer settings ({', '.join(f'{d} x{n}' for d, n in counts.items())}) "
                     f"collapse to one llama.cpp type for every layer: mean {mean:.3g} bits -> {chosen}")
    for label in counts:
        s = next(x for x in settings if _describe(x) == label)
        lost = [_LOST[s["format"]]] if s["format"] in _LOST and chosen != "f16" else []
        if s.get("qjl"):
            lost.append("the QJL residual sketch is dropped")
        if s["bits"] != bits:
            lost.append(f"{s['bits']} bits -> {bits}")
        if lost:
            n = counts[label]
            notes.append(f"KV {_ROLES[role]} {label} ({n} layer{'s' * (n > 1)}) -> {chosen}: {'; '.join(lost)}")
    return chosen, notes


def llamacpp_cache_types(doc: Mapping[str, Any]) -> CacheTypes | None:
    """The nearest global llama.cpp cache types of the policy document ``doc``'s ``"kv"`` section, or
    ``None`` when it has none (the runtime's default f16 cache, as the policy measured).

    Raises:
        ValueError: a ``"kv"`` section that is not ``{module: {"k": setting, "v": setting}}``.
    """
    kv = doc.get("kv")
    if not kv:
        return None
    if not isinstance(kv, Mapping):
        raise ValueError(f"'kv' must map attention modules to {{'k': setting, 'v': setting}}, got {kv!r}")
    entries = _entries(doc, kv)
    k, k_notes = _role([e["k"] for e in entries], "k")
    v, v_notes = _role([e["v"] for e in entries], "v")
    notes = k_notes + v_notes
    if (k, v) not in _CUDA_FA_PAIRS:
        notes.append(f"KV: llama.cpp's CUDA build compiles flash attention for K-V types "
                     f"{', '.join('-'.join(p) for p in sorted(_CUDA_FA_PAIRS))} by default; there {k}-{v} runs "
                     f"the f16 kernel (with a warning) unless llama.cpp is built with -DGGML_CUDA_FA_QUANTS=all")
    return CacheTypes(k, v, notes)
