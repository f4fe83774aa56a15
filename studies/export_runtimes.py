"""Writing a policy in other runtimes' per-module forms: GPTQModel, llama.cpp and torchao.

Each runtime supports fewer settings than TurboQuant's search space, so every
exporter maps each matrix to the nearest setting the runtime has and returns, next to
the document, a list of notes naming what was approximated. No torch here: this works
on the policy document alone (as written by :func:`studies.export_policy`), and never on
a format's name: what a format means for a runtime (its code bits, symmetry, whether it
is the runtime's own quantizer, a type it fixes) is the entry's ``runtime`` object, and
the matrix's shape its ``shape``, both written by ``quant.Policy``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from studies.llamacpp_kv import llamacpp_cache_types

__all__ = ["RUNTIME_FORMATS", "RuntimeExport", "code_bits", "export_runtime", "llamacpp_name", "runtime"]


@dataclass
class RuntimeExport:
    """A policy in a runtime's form.

    Attributes:
        text: the file contents to write.
        approximations: one human-readable line per setting that had to change.
        skipped: matrices the runtime keeps unquantized (or cannot name).
        flags: command-line arguments to run the export with (llama.cpp: the KV cache types of a
            policy with a ``kv`` section, see :mod:`studies.llamacpp_kv`); empty when none are needed.
    """

    text: str
    approximations: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)


def _matrices(doc: Mapping[str, Any], need_runtime: bool = True) -> dict[str, dict[str, Any]]:
    matrices = doc.get("matrices")
    if not isinstance(matrices, Mapping) or not matrices:
        raise ValueError("policy document has no 'matrices'; export one with turboquant export")
    if need_runtime:  # every entry must carry what quant knows, checked before anything is written
        for name, entry in matrices.items():
            runtime(entry, str(name))
    return {str(k): dict(v) for k, v in matrices.items()}


def runtime(entry: Mapping[str, Any], name: str = "?") -> Mapping[str, Any]:
    """The entry's ``runtime`` object (quant's ``RuntimeMapping``); ``ValueError`` when it lacks one."""
    r = entry.get("runtime") if isinstance(entry, Mapping) else None
    if not isinstance(r, Mapping) or not isinstance(r.get("code_bits"), (int, float)):
        raise ValueError(f"matrix {name!r} has no 'runtime' entry (code bits, runtime types): the document was "
                         f"written before TurboQuant recorded them; re-save it through quant "
                         f"(quant.Policy.from_dict(doc).to_dict(), as turboquant show does)")
    return r


def code_bits(entry: Mapping[str, Any]) -> float:
    """Code bits per weight of a policy entry (a vector codebook spends ``bits`` on ``dim`` weights)."""
    return float(runtime(entry)["code_bits"])


def _native(entry: Mapping[str, Any], rt: str) -> bool:
    """Whether runtime ``rt`` has this very kind of quantizer (so no format change is noted)."""
    return rt in runtime(entry).get("native", ())


def _fixed_type(entry: Mapping[str, Any], rt: str) -> str | None:
    """The type of runtime ``rt`` that the format itself fixes, if any."""
    return (runtime(entry).get("types") or {}).get(rt)


def _nearest(value: float, allowed: tuple[int, ...]) -> int:
    # Ties go to the larger width: losing quality silently is worse than spending a few bytes.
    return min(allowed, key=lambda a: (abs(a - value), -a))


def _approximations(s: Mapping[str, Any], *, fmt: str | None, bits: str | None, group: str | None) -> str:
    """What changed for one matrix, as ``"format lloyd -> Q4_K, 3 bits -> 4"`` ('' when nothing did).

    Each argument is the runtime's replacement, given only where it differs from the setting.
    """
    what = [f"format {s.get('format')} -> {fmt}"] if fmt else []
    if bits:
        what.append(f"{code_bits(s):g} bits -> {bits}")
    if group:
        what.append(group)
    if runtime(s).get("outliers"):
        what.append("sparse fp16 outliers dropped")
    return ", ".join(what)


def _is_embedding(name: str) -> bool:
    return name.endswith("embed_tokens") or name.endswith("wte") or name.endswith("embeddings")


# GPTQModel ---------------------------------------------------------------------------------------

_GPTQ_BITS = (2, 3, 4, 8)
_GPTQ_GROUPS = (16, 32, 64, 128)


def _gptq_setting(name: str, s: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    eff = code_bits(s)
    bits = _nearest(eff, _GPTQ_BITS)
    group = s.get("group_size")
    g = -1 if group is None else _nearest(group, _GPTQ_GROUPS) if group not in _GPTQ_GROUPS else group
    sym = bool(runtime(s).get("symmetric", False))
    what = _approximations(s, fmt=None if _native(s, "gptqmodel") else "GPTQ integer",
                           bits=str(bits) if bits != eff else None,
                           group=f"group {group} -> {g}" if group is not None and g != group else None)
    if what:
        notes.append(f"{name}: {what}")
    return {"bits": bits, "group_size": g, "sym": sym}


def _to_gptqmodel(doc: Mapping[str, Any]) -> RuntimeExport:
    notes: list[str] = []
    skipped: list[str] = []
    per_module: dict[str, dict[str, Any]] = {}
    for name, s in _matrices(doc).items():
        if _is_embedding(name):
            skipped.append(name)  # GPTQModel quantizes linear layers only
            continue
        per_module[name] = _gptq_setting(name, s, notes)
    if not per_module:
        raise ValueError("policy has no linear layer that GPTQModel can quantize")
    # The most common setting becomes the base config; only the others need an override.
    base = Counter(json.dumps(v, sort_keys=True) for v in per_module.values()).most_common(1)[0][0]
    base_cfg = json.loads(base)
    dynamic: dict[str, dict[str, Any]] = {}
    for name, cfg in per_module.items():
        if json.dumps(cfg, sort_keys=True) != base:
            dynamic[f"+:^{re.escape(name)}$"] = cfg
    for name in skipped:
        dynamic[f"-:^{re.escape(name)}$"] = {}
    lm_head = any(n.endswith("lm_head") for n in per_module)
    out = {"bits": base_cfg["bits"], "group_size": base_cfg["group_size"], "sym": base_cfg["sym"],
           "desc_act": False, "lm_head": lm_head, "dynamic": dynamic}
    if skipped:
        notes.append(f"{len(skipped)} embedding(s) stay 16-bit in GPTQModel: {', '.join(skipped)}")
    return RuntimeExport(json.dumps(out, indent=2) + "\n", notes, skipped)


# llama.cpp ---------------------------------------------------------------------------------------

_LLAMA_MODULES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                  "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")
# Code bits -> the GGML type that stores that many bits per weight (K-quants, super-blocks of 256), for
# formats that fix no type of their own.
_GGML_BY_BITS = {2: "q2_k", 3: "q3_k", 4: "q4_k", 5: "q5_k", 6: "q6_k", 8: "q8_0"}


@functools.cache
def _ggml_types() -> Mapping[str, Any]:
    """quant's table of llama.cpp's block types (``quant/gguf/_table.py``'s ``BLOCK_TYPES``), the one source
    of their geometry (weights per block and per scale, nominal bits).

    The file is loaded alone: importing it as ``quant.gguf._table`` would run the ``quant`` package,
    which imports torch, and nothing here may (the table itself imports only gguf-py's constants).
    """
    spec = importlib.util.find_spec("quant")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("studies.export_runtimes needs the quant package beside it for llama.cpp's block types")
    path = Path(next(iter(spec.submodule_search_locations))) / "gguf" / "_table.py"
    module_spec = importlib.util.spec_from_file_location("studies._ggml_table", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # dataclasses resolve their module by name
    module_spec.loader.exec_module(module)
    return module.BLOCK_TYPES


def llamacpp_name(name: str) -> str | None:
    """The GGUF tensor name of a transformers matrix name (Llama-style models), or ``None``."""
    if name.endswith("embed_tokens"):
        return "token_embd.weight"
    if name.endswith("lm_head"):
        return "output.weight"
    m = _LAYER.search(name)
    if m and m.group(2) in _LLAMA_MODULES:
        return f"blk.{m.group(1)}.{_LLAMA_MODULES[m.group(2)]}.weight"
    return None


def _to_llamacpp(doc: Mapping[str, Any]) -> RuntimeExport:
    notes: list[str] = []
    skipped: list[str] = []
    lines: list[str] = []
    unknown_rows = 0  # matrices without a shape whose type needs rows of 256
    for name, s in _matrices(doc).items():
        target = llamacpp_name(name)
        if target is None:
            skipped.append(name)
            notes.append(f"{name}: no GGUF tensor name known for it; left to llama-quantize's default type")
            continue
        eff = code_bits(s)
        fixed = _fixed_type(s, "llamacpp")  # a GGUF format's own type (its +gptq variant too: the same bytes)
        ggml = fixed or _GGML_BY_BITS[_nearest(eff, tuple(_GGML_BY_BITS))]
        group = "per channel" if s.get("group_size") is None else f"group {s.get('group_size')}"
        bt = _ggml_types().get(ggml)
        block, row_block = (bt.sub_block, bt.block) if bt else (None, None)
        own = {block, row_block if fixed else None} - {None}
        what = _approximations(
            s, fmt=None if _native(s, "llamacpp") else ggml,
            bits=str(bt.bits) if fixed is None and float(bt.bits) != eff else None,
            group=f"{group} -> {ggml}'s blocks of {block}" if own and s.get("group_size") not in own else None)
        if what:
            notes.append(f"{name} ({target}): {what}")
        shape = s.get("shape")
        if row_block and row_block > 32 and not shape:
            unknown_rows += 1
        elif row_block and shape and shape[1] % row_block:
            notes.append(f"{name} ({target}): rows of {shape[1]} weights are not whole {row_block}-weight blocks "
                         f"of {ggml}; llama-quantize falls back to another type for it")
        lines.append(f"{target}={ggml}")
    if unknown_rows:
        notes.append(f"256-weight types (k-quants, i-quants, ternary) need rows of a multiple of 256 weights and "
                     f"{unknown_rows} matrix shape(s) are unknown (the policy has no 'shape' for them); "
                     "llama-quantize falls back to another type for tensors that are not")
    cache = llamacpp_cache_types(doc)  # the kv section: one global cache type per role
    return RuntimeExport("\n".join(lines) + "\n", notes + (cache.notes if cache else []), skipped,
                         cache.flags if cache else [])


# torchao -----------------------------------------------------------------------------------------

_TORCHAO_BITS = (1, 2, 3, 4, 5, 6, 7, 8)  # IntxWeightOnlyConfig: torch.int1 .. torch.int8
_TORCHAO_GROUPS = (32, 64, 128, 256)


def _to_torchao(doc: Mapping[str, Any]) -> RuntimeExport:
    notes: list[str] = []
    fqn: dict[str, Any] = {}
    matrices = _matrices(doc)
    shapes = {n: s["shape"] for n, s in matrices.items() if s.get("shape")}
    for name, s in matrices.items():
        eff = code_bits(s)
        bits = _nearest(eff, _TORCHAO_BITS)
        group = s.get("group_size")
        g = None if group is None else group if group in _TORCHAO_GROUPS else _nearest(group, _TORCHAO_GROUPS)
        if g is not None and name in shapes and shapes[name][1] % g:
            # TurboQuant pads a short last group; torchao needs groups that divide the row.
            fits = [c for c in _TORCHAO_GROUPS if c <= g and shapes[name][1] % c == 0]
            g = max(fits) if fits else None
        # torchao's own serialized form (torchao.core.config.config_to_dict), so config_from_dict reads it.
        granularity = ({"_type": "PerAxis", "_version": 1, "_data": {"axis": 0}} if g is None
                       else {"_type": "PerGroup", "_version": 1, "_data": {"group_size": g}})
        what = _approximations(
            s, fmt=None if _native(s, "torchao") else f"affine int{bits}",
            bits=str(bits) if bits != eff else None,
            group=(f"group {group} -> {'per channel' if g is None else g}"
                   if group is not None and g != group else None))
        if what:
            notes.append(f"{name}: {what}")
        sym = bool(runtime(s).get("symmetric", False))
        fqn[name] = {"_type": "IntxWeightOnlyConfig", "_version": 2, "_data": {
            "weight_dtype": {"_type": "torch.dtype", "_data": f"int{bits}"}, "granularity": granularity,
            "mapping_type": {"_type": "MappingType", "_data": "SYMMETRIC" if sym else "ASYMMETRIC"}}}
    if len(shapes) < len(matrices):
        notes.append(f"{len(matrices) - len(shapes)} matrix shape(s) unknown (the policy has no 'shape' for "
                     "them): torchao needs each group size to divide its row; check those rows by hand")
    # Exact FQNs take precedence over regexes in FqnToConfig; load with torchao.core.config.config_from_dict.
    out = {"_type": "FqnToConfig", "_version": 1, "_data": {"fqn_to_config": fqn}}
    return RuntimeExport(json.dumps(out, indent=2) + "\n", notes, [])


def _to_json(doc: Mapping[str, Any]) -> RuntimeExport:
    _matrices(doc, need_runtime=False)
    return RuntimeExport(json.dumps(doc, indent=2) + "\n")


RUNTIME_FORMATS: dict[str, Callable[[Mapping[str, Any]], RuntimeExport]] = {
    "json": _to_json, "gptqmodel": _to_gptqmodel, "llamacpp": _to_llamacpp, "torchao": _to_torchao,
}


def export_runtime(doc: Mapping[str, Any], fmt: str) -> RuntimeExport:
    """``doc`` (a policy document) in runtime format ``fmt`` (one of :data:`RUNTIME_FORMATS`).

    The entries' ``shape`` (written by ``quant.Policy`` when it knows the model's shapes)
    lets torchao's export pick group sizes that divide each row, which torchao requires
    and TurboQuant (padding) does not. A ``kv`` section becomes llama.cpp's cache-type flags
    (:attr:`RuntimeExport.flags`); the other runtimes have no form for it, which a note says.
    """
    try:
        exporter = RUNTIME_FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(RUNTIME_FORMATS)}") from None
    result = exporter(doc)
    if doc.get("kv") and fmt in ("gptqmodel", "torchao"):
        result.approximations.append(f"the policy's KV cache settings have no {fmt} form: its cache stays 16-bit")
    return result
