"""The runtime a search is for (``--target``): what it may choose, what ties, and the file that comes out.

The runtime is the user's first choice, so it is the search's first input. Each target names the
formats, bit-widths and group sizes its runtime runs (the defaults of a search for it, and the limits
an explicit ``--formats`` / ``--bits`` / ``--groups`` is checked against, up front), the granularities
that respect what it fuses, how it holds the KV cache, and the exporter that writes the chosen point
as its file, holding exactly the weights that were measured.

- ``turboquant``: every format we have, run by TurboQuant's own loader (``quant.load_checkpoint``).
- ``llamacpp``: llama.cpp's GGUF block types (k-quants, i-quants, each also with GPTQ's error feedback
  onto its grid), bytes as the GGUF file stores them; exported as a GGUF.
- ``vllm``: what vLLM's compressed-tensors loader serves with its weight-only (WNA16) kernels: symmetric
  integer weights at 4 or 8 bits per group of 32, 64 or 128 or per channel (the group sizes of its Marlin
  kernel; vLLM 0.10's ``MARLIN_SUPPORTED_GROUP_SIZES``), codes by ``rtn`` or ``gptq``; q/k/v and
  gate/up share one setting (vLLM fuses them into one matrix); exported as a compressed-tensors folder.

The two runtimes hold a KV cache in formats none of ours reproduces (llama.cpp's 32-element blocks per
token, vLLM's fp8), so with ``--context`` their cache is counted at 16 bits in the budget, not searched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from evaluators.errors import UserError

__all__ = ["DEFAULT_TARGET", "TARGETS", "Target", "get_target"]


@dataclass(frozen=True)
class Target:
    """Attributes:
        name: the ``--target`` value.
        runtime: what runs the exported file, in words.
        export: the exporter (:mod:`search.exporters`) that writes a point as that file.
        formats, bits, groups: a search's defaults for this target.
        granularities: those allowed (a runtime that fuses matrices needs them to share one setting).
        kv_formats: the KV cache formats allowed with ``--context`` (``None``: any).
    """

    name: str
    runtime: str
    export: str
    formats: tuple[str, ...]
    bits: tuple[int, ...]
    groups: tuple[int | None, ...]
    granularities: tuple[str, ...] = ("matrix", "fused", "block", "layer")
    kv_formats: tuple[str, ...] | None = None

    def defaults(self) -> dict[str, Any]:
        """The request fields this target sets when the user does not."""
        out: dict[str, Any] = {"formats": list(self.formats), "bits": list(self.bits), "groups": list(self.groups)}
        if self.kv_formats is not None:
            out["kv_formats"] = list(self.kv_formats)
        return out

    def refusals(self, formats: list[str], bits: list[int], groups: list[int | None], granularity: str,
                 kv_formats: list[str]) -> list[str]:
        """What of these options the runtime cannot run, one phrase each (empty: all of it runs)."""
        out = []
        if granularity not in self.granularities:
            out.append(f"--granularity {granularity} (it takes {', '.join(self.granularities)})")
        if self.kv_formats is not None:
            out += [f"KV cache format {f} (none of ours is a cache type it runs: with --context its cache is "
                    f"counted at 16 bits, not searched)" for f in kv_formats if f not in self.kv_formats]
        return out + self._weight_refusals(formats, bits, groups)

    def _weight_refusals(self, formats: list[str], bits: list[int], groups: list[int | None]) -> list[str]:
        return []

    def groups_for(self, groups: list[int | None], widths: set[int]) -> list[int | None]:
        """The group sizes of ``groups`` this runtime holds on rows of these ``widths`` (all of them here)."""
        return list(groups)


class _LlamaCpp(Target):
    def _weight_refusals(self, formats: list[str], bits: list[int], groups: list[int | None]) -> list[str]:
        from quant.gguf import BLOCK_TYPES

        # --bits and --groups do not apply to fixed-geometry types: only the formats can be wrong.
        return [f"format {f} (not a GGUF block type)" for f in formats if f.split("+")[0] not in BLOCK_TYPES]


# vLLM's WNA16 schemes: symmetric integer codes with one scale per group (compressed-tensors' pack-quantized).
_VLLM_BITS = (4, 8)
_VLLM_GROUPS: tuple[int | None, ...] = (32, 64, 128, None)
_VLLM_QUANTIZERS = {"rtn": {"symmetric", "clip"}, "gptq": {"symmetric", "clip", "act_order"}}


class _Vllm(Target):
    def _weight_refusals(self, formats: list[str], bits: list[int], groups: list[int | None]) -> list[str]:
        out = []
        for label in formats:
            name, *options = label.split("+")
            if name not in _VLLM_QUANTIZERS or not set(options) <= _VLLM_QUANTIZERS[name]:
                out.append(f"format {label} (vLLM's integer kernels take rtn or gptq codes, options "
                           f"{'/'.join(sorted(_VLLM_QUANTIZERS.get(name, _VLLM_QUANTIZERS['gptq'])))})")
            elif "symmetric" not in options:
                out.append(f"format {label} (our asymmetric grid has a float offset per group, which an integer "
                           f"zero point cannot hold: add +symmetric)")
        out += [f"{b}-bit weights (it runs {' and '.join(map(str, _VLLM_BITS))})" for b in bits if b not in _VLLM_BITS]
        out += [f"group size {g} (its kernels take 32, 64, 128 or per channel)"
                for g in groups if g not in _VLLM_GROUPS]
        return out

    def groups_for(self, groups: list[int | None], widths: set[int]) -> list[int | None]:
        # compressed-tensors' groups divide the row (ours pad a short last group): a group that pads some row
        # is left out of the space, as llama.cpp's types leave out the rows that are not whole blocks.
        fit = [g for g in groups if g is None or all(w % g == 0 for w in widths)]
        if len(fit) < len(groups):
            logging.getLogger("search.targets").info(
                "--target vllm: group sizes %s left out: they pad rows of width %s, which compressed-tensors "
                "cannot hold", [g for g in groups if g not in fit], sorted(widths))
        if not fit:
            raise UserError(f"--target vllm: none of the group sizes {groups} divides every row (widths "
                            f"{sorted(widths)}): add --groups ch (per channel)")
        return fit


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("turboquant", "TurboQuant's own loader (quant.load_checkpoint)", "checkpoint",
           ("rtn", "gptq+act_order+clip"), (2, 3, 4, 8), (64, 128)),
    _LlamaCpp("llamacpp", "llama.cpp (llama-cli, llama-server, llama-perplexity)", "gguf",
              ("gguf",), (2, 3, 4, 8), (64, 128), kv_formats=("float",)),
    _Vllm("vllm", "vLLM (its compressed-tensors loader, weight-only kernels)", "compressed-tensors",
          ("rtn+symmetric", "gptq+act_order+clip+symmetric"), _VLLM_BITS, (64, 128, None),
          granularities=("fused", "block", "layer"), kv_formats=("float",)),
)}
# What a search without --target is for. Measured (docs/search.md, "Why the defaults"): on the embedded model
# at the demo's 3.0 bpw neither runtime target has a point (their smallest policies are larger), so the default
# stays every format we have.
DEFAULT_TARGET = "turboquant"


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise UserError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]
