"""The GGUF side of benchmarks/vs_llamacpp.py: one study over llama.cpp's types, files at given sizes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf

import quant
from quant.gguf import BLOCK_TYPES
from quant.gguf_file import metadata_reserve, policy_metadata, write_gguf

_ALIGN = 32  # GGUF's default tensor alignment: each tensor's data is padded to it


def file_overhead(f32: Path) -> int:
    """Bytes of a GGUF of this model that are not weight matrices: header, metadata, tokenizer, norms,
    plus one alignment pad per tensor (an upper bound), so ``matrix bytes + overhead`` bounds the file."""
    reader = gguf.GGUFReader(f32)
    matrices = sum(int(t.n_bytes) for t in reader.tensors if len(t.shape) == 2)
    return f32.stat().st_size - matrices + _ALIGN * len(reader.tensors)


def run_gguf_study(loaded: Any, tokens: Any, f32: Path, max_file: int, sizes: list[int], *, trials: int,
                   exclude: tuple[str, ...] | None, name: str, storage: str, eval_seqs: int, seq_len: int,
                   calib_seqs: int, workers: int = 2) -> dict[str, Any]:
    """Runs (or resumes) the study: proxy sensitivity, DP/greedy seeds at every file size in ``sizes``
    (and 8 even budgets), then evo near the largest size. Returns what :func:`best_gguf_at` needs."""
    from search.driver import SearchConfig, run_search
    from search.request import SearchRequest

    overhead = file_overhead(f32)
    formats = [t for t in BLOCK_TYPES if t not in (exclude or ())]
    request = SearchRequest(model="smollm2-135m", budget=str(max_file - overhead), formats=formats,
                            granularity="matrix", sampler="evo", sensitivity=True, sensitivity_method="proxy",
                            trials=trials, workers=workers, eval_seqs=eval_seqs, seq_len=seq_len,
                            calib_seqs=calib_seqs, study=name)
    summary = run_search(SearchConfig(request, storage=storage, progress=False,
                                      extra_seed_budgets=tuple(s - overhead for s in sizes)))
    return {"name": name, "storage": storage, "overhead": overhead, "summary": summary, "request": request}


def calibration(study: dict[str, Any]) -> dict[str, Any]:
    """The float weights and the input Hessians the study's workers quantized with (same windows)."""
    from evaluators import calibration_hessians

    loaded, tokens = study["request"].data_config().load()
    matrices = quant.weight_matrices(loaded.model)
    return {"weights": {n: w.clone() for n, w in quant.float_weights(loaded.model).items()},
            "hessians": calibration_hessians(loaded.model, tokens, matrices)}


def best_gguf_at(study: dict[str, Any], file_size: int, out: Path, source: Path, calib: dict[str, Any]) -> str:
    """Writes the study's best measured point whose file fits ``file_size`` as ``out``; returns its label.

    The matrices are quantized exactly as the search's workers did (same quantizer, same Hessians), so
    the file holds the weights whose KL the study stored."""
    import studies

    store = studies.Store(study["storage"])
    w, h = calib["weights"], calib["hessians"]
    reserve = metadata_reserve(list(w))  # the policy recorded in the file counts too
    doc = studies.export_policy(store, study["name"], budget_bytes=file_size - study["overhead"] - reserve)
    policy = quant.Policy.from_dict(doc)
    packed = {n: quant.quantize_calibrated(n, w[n], s, h) for n, s in policy.settings.items()}
    write_gguf(out, source, w, packed, policy_json=policy_metadata(
        policy.settings, study=study["name"], trial=doc["provenance"]["trial"], metrics=doc["metrics"]))
    assert out.stat().st_size <= file_size, (out.stat().st_size, file_size)
    m = doc["metrics"]
    seed = store.trial(store.get_study(study["name"]), doc["provenance"]["trial"]).seed or "evo"
    return f"trial {doc['provenance']['trial']} ({seed}), searched KL {m['kl']:.4f}"
