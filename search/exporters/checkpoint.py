"""``checkpoint``: the packed TurboQuant checkpoint folder (``quant.load_checkpoint`` reads it back), holding
exactly the weights the search measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import quant
from search.exporters import ExportOptions, Exported, Exporter, register_exporter


class Checkpoint(Exporter):
    name = "checkpoint"
    help = "TurboQuant's packed checkpoint folder"
    folder = True

    def write(self, doc: dict[str, Any], out: Path, options: ExportOptions) -> Exported:
        from evaluators.checkpoint import pack_policy

        policy, trial = quant.Policy.from_dict(doc), doc["provenance"]["trial"]
        loaded, packed, _ = pack_policy(policy, f"trial {trial}", trust_remote_code=options.trust_remote_code)
        path = quant.save_checkpoint(loaded.model, policy, out)
        size = sum(f.stat().st_size for f in path.iterdir())
        return Exported(self.name, path, trial, doc["metrics"],
                        [f"wrote {path}: {len(packed)} packed matrices, {sum(p.nbytes for p in packed.values()):,} "
                         f"packed bytes; {size:,} bytes on disk with float tensors and metadata; trial {trial} "
                         f"measured KL {doc['metrics']['kl']:.5f}"])


register_exporter(Checkpoint())
