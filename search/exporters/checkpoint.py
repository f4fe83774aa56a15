"""``checkpoint``: the packed TurboQuant checkpoint folder (``quant.load_checkpoint`` reads it back), holding
exactly the weights the search measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import quant
from search.exporters import ExportOptions, Exported, Exporter, register_exporter


def write_checkpoint(policy: quant.Policy, label: str, out: Path | str, *, trust_remote_code: bool = False
                     ) -> tuple[Path, str]:
    """Quantizes the policy's model as the search did and writes it as a packed checkpoint folder ``out``
    (what ``turboquant apply`` and this exporter write); returns the folder and a line saying what it holds."""
    from evaluators.checkpoint import pack_policy

    loaded, packed, _ = pack_policy(policy, label, trust_remote_code=trust_remote_code)
    path = quant.save_checkpoint(loaded.model, policy, out)
    size = sum(f.stat().st_size for f in path.iterdir())
    return path, (f"wrote {path}: {len(packed)} packed matrices, {sum(p.nbytes for p in packed.values()):,} "
                  f"packed bytes; {size:,} bytes on disk with float tensors and metadata")


class Checkpoint(Exporter):
    name = "checkpoint"
    help = "TurboQuant's packed checkpoint folder"
    folder = True

    def write(self, doc: dict[str, Any], out: Path, options: ExportOptions) -> Exported:
        trial = doc["provenance"]["trial"]
        path, line = write_checkpoint(quant.Policy.from_dict(doc), f"trial {trial}", out,
                                      trust_remote_code=options.trust_remote_code)
        return Exported(self.name, path, trial, doc["metrics"],
                        [f"{line}; trial {trial} measured KL {doc['metrics']['kl']:.5f}"])


register_exporter(Checkpoint())
