"""``json``: TurboQuant's own policy document (what ``eval``, ``apply`` and ``show`` read)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from search.exporters import ExportOptions, Exported, Exporter, register_exporter


def write_text(out: Path, text: str) -> None:
    """Writes ``out`` whole or not at all (a temporary file renamed over it)."""
    from quant.checkpoint import replace_atomically

    with replace_atomically(out) as tmp:
        tmp.write_text(text)


class PolicyJSON(Exporter):
    name = "json"
    help = "TurboQuant policy"
    media_type = "application/json"

    def write(self, doc: dict[str, Any], out: Path, options: ExportOptions) -> Exported:
        write_text(out, json.dumps(doc, indent=2))
        m, trial = doc["metrics"], doc["provenance"]["trial"]
        return Exported(self.name, out, trial, m, [f"wrote {out}: trial {trial}, {m['bytes']:,} bytes "
                                                   f"({m['bpw']:.3f} bpw), KL {m['kl']:.5f}, ppl {m['ppl']:.3f}"])


register_exporter(PolicyJSON())
