"""``gguf``: a front point as a GGUF file that llama.cpp runs.

The policy is applied as the search applied it (same quantizers, same calibration windows), and the
packed bytes go into the file as they are: llama.cpp computes with exactly the weights that were
measured. Metadata, tokenizer and the tensors a policy does not cover (norms) come from a GGUF of the
same model (:func:`evaluators.llamacpp.source_gguf`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import quant
from evaluators import UserError
from quant.gguf_file import GGUFExportError, gguf_type, policy_metadata, write_gguf
from search.exporters import ExportOptions, Exported, Exporter, register_exporter
from studies.llamacpp_kv import llamacpp_cache_types

__all__ = ["GGUF", "nearest_gguf"]


def _runs_in_llamacpp(setting: quant.QuantSetting) -> bool:
    return gguf_type(setting) is not None


def nearest_gguf(policy: quant.Policy, shapes: dict[str, tuple[int, int]]) -> tuple[quant.Policy, list[str]]:
    """Each setting llama.cpp cannot run becomes the llama.cpp type that fits its matrix with the
    nearest bytes (the larger on a tie); returns the new policy and one line per change."""
    from quant.gguf import BLOCK_TYPES

    types = [quant.QuantSetting.from_dict({"format": name}) for name in BLOCK_TYPES]
    settings, changes = dict(policy.settings), []
    for name, s in policy.settings.items():
        if _runs_in_llamacpp(s):
            continue
        shape = shapes[name]
        bpw = {t: 8 * quant.get_format(t.format).expected_nbytes(shape, t) / (shape[0] * shape[1])
               for t in types if t.fits(shape)}
        want = 8 * quant.get_format(s.format).expected_nbytes(shape, s) / (shape[0] * shape[1])
        best = min(bpw, key=lambda t: (abs(bpw[t] - want), -bpw[t]))
        settings[name] = best
        changes.append(f"{name}: {s.describe()} ({want:.3f} bpw) -> {best.describe()} ({bpw[best]:.3f} bpw)")
    return quant.Policy(settings, policy.meta, kv=policy.kv), changes


class GGUF(Exporter):
    name = "gguf"
    help = "the whole model as a GGUF file llama.cpp runs, with exactly the searched weights"

    def write(self, doc: dict[str, Any], out: Path, options: ExportOptions) -> Exported:
        from evaluators.checkpoint import pack_policy
        from evaluators.llamacpp import source_gguf
        from quant.checkpoint import replace_atomically

        policy = quant.Policy.from_dict(doc)
        foreign = [n for n, s in policy.settings.items() if not _runs_in_llamacpp(s)]
        if foreign and not options.nearest:
            raise UserError(f"{len(foreign)} matrices use formats llama.cpp cannot run ("
                            + ", ".join(f"{n}: {policy.settings[n].describe()}" for n in foreign[:5])
                            + (", ..." if len(foreign) > 5 else "")
                            + "): search with --formats gguf, or export with --nearest to map each to the nearest "
                              "llama.cpp type (the file then holds other weights than the ones measured)")
        changes: list[str] = []

        def remap(p: quant.Policy, shapes: dict[str, tuple[int, int]]) -> quant.Policy:
            mapped, lines = nearest_gguf(p, shapes)
            changes.extend(lines)
            return mapped

        trial = doc["provenance"]["trial"]
        loaded, packed, weights = pack_policy(policy, f"trial {trial}", remap=remap if foreign else None,
                                              trust_remote_code=options.trust_remote_code)
        try:
            with replace_atomically(out) as tmp:
                written = write_gguf(tmp, source_gguf(loaded.name), weights, packed,
                                     policy_json=policy_metadata(policy.settings, study=doc["provenance"].get("study"),
                                                                 trial=trial, metrics=doc["metrics"]))
        except GGUFExportError as exc:
            raise UserError(str(exc)) from None
        m = doc["metrics"]
        kinds = Counter(gguf_type(p).name for p in packed.values())
        lines = [f"wrote {out}: {len(written)} tensors replaced ({', '.join(f'{k} x{v}' for k, v in sorted(kinds.items()))}), "
                 f"{sum(p.nbytes for p in packed.values()):,} packed bytes; trial {trial} measured KL {m['kl']:.5f} at "
                 f"{m['bytes']:,} bytes"]
        lines += [f"  ~ {line}" for line in changes]
        if changes:
            lines.append(f"  {len(changes)} matrices changed by --nearest: the file is not the policy that was measured")
        # A GGUF holds no cache type: the policy's KV settings become llama.cpp's nearest global flags.
        cache = llamacpp_cache_types(policy.to_dict())
        flags, notes = (cache.flags, cache.notes) if cache is not None else ([], [])
        if cache is not None:
            lines.append(f"run it with llama-cli / llama-server {' '.join(flags)}"
                         + (f" ({len(notes)} approximation(s) of the policy's KV cache):" if notes else ""))
            lines += [f"  ~ {line}" for line in notes]
        return Exported(self.name, out, trial, m, lines, changes + notes, [], flags)


register_exporter(GGUF())
