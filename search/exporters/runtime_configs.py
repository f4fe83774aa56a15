"""``gptqmodel``, ``llamacpp``, ``torchao``: the policy as another runtime's per-module configuration
(:mod:`studies.export_runtimes`), each setting it cannot hold mapped to its nearest and reported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import quant
from evaluators import UserError
from search.exporters import ExportOptions, Exported, Exporter, register_exporter
from search.exporters.policy_json import write_text


class RuntimeConfig(Exporter):
    media_type = "text/plain"

    def __init__(self, name: str, help: str) -> None:
        self.name, self.help = name, help

    def write(self, doc: dict[str, Any], out: Path, options: ExportOptions) -> Exported:
        from studies.export_runtimes import export_runtime

        try:
            # Through quant: a trial stored before policy entries carried their runtime mapping gets it now.
            result = export_runtime(quant.Policy.from_dict(doc).to_dict(), self.name)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        write_text(out, result.text)
        m, trial = doc["metrics"], doc["provenance"]["trial"]
        lines = [f"wrote {out} ({self.name}): trial {trial}, measured {m['bpw']:.3f} bpw, KL {m['kl']:.5f} in "
                 f"TurboQuant; {len(result.approximations)} approximation(s) for {self.name}:"]
        lines += [f"  ~ {line}" for line in result.approximations]
        if result.flags:  # the KV cache types: llama.cpp takes them on the command line, not in the file
            lines.append(f"run it with llama-cli / llama-server {' '.join(result.flags)}")
        return Exported(self.name, out, trial, m, lines, result.approximations, result.skipped, result.flags)


register_exporter(RuntimeConfig("gptqmodel", "GPTQModel's dynamic overrides"))
register_exporter(RuntimeConfig("llamacpp", "llama-quantize's --tensor-type-file"))
register_exporter(RuntimeConfig("torchao", "torchao's FqnToConfig JSON"))
