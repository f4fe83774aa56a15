"""Writing a GGUF file that llama.cpp runs: the source file's metadata and tokenizer, our tensors.

A GGUF needs far more than tensors (architecture hyper-parameters, the tokenizer, its merges, the
chat template), and llama.cpp's own converter is the authority on them. So a GGUF is always written
from a *source* GGUF of the same model: the file the model came from (the embedded SmolLM2), or the
float GGUF that ``convert_hf_to_gguf.py`` makes of a Hugging Face folder. Every source tensor that is
one of the model's weight matrices is replaced, either by its packed tensor (a GGUF block format:
the bytes go in as they are, so llama.cpp computes with exactly the weights the search measured) or
by its float32 values; everything else (norms, metadata) is copied unchanged.

Rows: llama.cpp's converter stores some matrices with their rows permuted (Llama's q/k projections,
for its rotary layout). Quantization blocks run along a row, so a row permutation commutes with
every block format: the packed rows are reordered, never re-quantized. Which order a matrix uses is
read off the source tensor itself (identity, or the Llama permutation), never assumed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import gguf
import numpy as np
import torch

from quant.packed import PackedTensor
from quant.settings import QuantSetting

__all__ = ["GGUFExportError", "gguf_names", "gguf_type", "metadata_reserve", "policy_metadata", "write_gguf"]


class GGUFExportError(ValueError):
    """A policy or model that cannot become a GGUF file (the message says which matrices and why)."""


def gguf_type(setting: QuantSetting | PackedTensor) -> gguf.GGMLQuantizationType | None:
    """The GGML type whose bytes a setting's packed tensors hold, or ``None`` for a format llama.cpp
    cannot run (only llama.cpp's own block types store GGUF bytes)."""
    from quant.formats import get_format

    if isinstance(setting, PackedTensor):
        setting = setting.setting
    return getattr(get_format(setting.format), "ggml_type", None)


def _field(reader: gguf.GGUFReader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def gguf_names(reader: gguf.GGUFReader, matrices: list[str]) -> dict[str, str]:
    """Model matrix name -> the GGUF tensor name it has in the source file (``blk.3.attn_q.weight``)."""
    arch_name = _field(reader, "general.architecture")
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None:
        raise GGUFExportError(f"the source GGUF's architecture {arch_name!r} is unknown to gguf-py {gguf.__name__}")
    n_blocks = int(_field(reader, f"{arch_name}.block_count") or 0)
    name_map = gguf.get_tensor_name_map(arch, n_blocks)
    present = {t.name for t in reader.tensors}
    names: dict[str, str] = {}
    for matrix in matrices:
        base = name_map.get_name(matrix)
        if base is None or f"{base}.weight" not in present:
            continue  # no such tensor in the file: write_gguf names it as missing
        names[matrix] = f"{base}.weight"
    return names


def _source_rows(tensor: gguf.ReaderTensor, n: int) -> torch.Tensor:
    """The first ``n`` rows of the source tensor as float32 ``(n, cols)``."""
    values = gguf.quants.dequantize(tensor.data[:n], tensor.tensor_type)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(-1, int(tensor.shape[0]))


def _llama_permutation(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order of llama.cpp's rotary permutation: GGUF row ``i`` is model row ``perm[i]``."""
    idx = torch.arange(n_rows)
    return idx.reshape(n_head, 2, n_rows // n_head // 2).transpose(1, 2).reshape(-1)


def _row_order(reader: gguf.GGUFReader, tensor: gguf.ReaderTensor, weight: torch.Tensor, name: str) -> torch.Tensor | None:
    """``None`` if the file stores the model's rows as they are, else the permutation it uses."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    if shape != tuple(weight.shape):
        raise GGUFExportError(f"{name}: the source GGUF tensor {tensor.name} has shape {shape}, "
                              f"the model's weight {tuple(weight.shape)}: the source file is of another model")
    # A permutation acts within each head: the first rows (a few heads) tell which order the file uses.
    n = min(weight.shape[0], 256)
    src = _source_rows(tensor, n)
    weight = weight.float()
    tol = 1e-3 * float(weight.abs().max()) + 1e-6  # the source may be a quantized file of the same weights
    if torch.allclose(src, weight[:n], rtol=0, atol=tol):
        return None
    arch = _field(reader, "general.architecture")
    for key in ("attention.head_count", "attention.head_count_kv"):
        n_head = int(_field(reader, f"{arch}.{key}") or 0)
        if n_head and weight.shape[0] % (2 * n_head) == 0:
            perm = _llama_permutation(weight.shape[0], n_head)
            if torch.allclose(src, weight[perm[:n]], rtol=0, atol=tol):
                return perm
    raise GGUFExportError(f"{name}: the model's weight matches the source GGUF tensor {tensor.name} in no known "
                          "row order (identity or llama's rotary permutation): the source file is of another model")


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, extra: Mapping[str, str]) -> None:
    for field in reader.fields.values():
        # GGUF.* are virtual (header) fields; the writer adds general.architecture itself.
        if field.name.startswith("GGUF.") or field.name == "general.architecture" or field.name in extra:
            continue
        if field.name == "general.file_type":
            writer.add_file_type(gguf.LlamaFileType.GUESSED)  # mixed per tensor: no single llama.cpp ftype
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for key, value in extra.items():
        writer.add_string(key, value)


def write_gguf(out: Path | str, source: Path | str, weights: Mapping[str, torch.Tensor],
               packed: Mapping[str, PackedTensor] | None = None, *, policy_json: str | None = None) -> dict[str, str]:
    """Writes ``out``: ``source`` with every weight matrix replaced.

    Args:
        out: the GGUF file to write.
        source: a GGUF file of the same model (metadata, tokenizer and the tensors we do not replace).
        weights: the model's float weights by matrix name, ``(out, in)`` as the model holds them (they
            fix each tensor's row order; with ``packed`` absent for a matrix they are written as F32).
        packed: packed tensors by matrix name; each must be of a GGUF block format.
        policy_json: stored as ``turboquant.policy`` in the file's metadata (provenance).

    Returns:
        GGUF tensor name -> the GGML type written, for every replaced tensor.
    """
    packed = dict(packed or {})
    reader = gguf.GGUFReader(source)
    names = gguf_names(reader, list(weights))
    foreign = sorted(n for n, p in packed.items() if gguf_type(p) is None)
    if foreign:
        raise GGUFExportError(f"{len(foreign)} matrices use formats llama.cpp cannot run: "
                              + ", ".join(f"{n} ({packed[n].setting.describe()})" for n in foreign)
                              + "; use GGUF types (--formats gguf) or export with --nearest")
    missing = sorted(set(weights) - set(names))
    if missing:
        raise GGUFExportError(f"matrices with no tensor in the source GGUF: {', '.join(missing)}")
    by_gguf = {g: m for m, g in names.items()}
    arch = _field(reader, "general.architecture")
    writer = gguf.GGUFWriter(out, arch)
    _copy_metadata(reader, writer, {"turboquant.policy": policy_json} if policy_json else {})
    written: dict[str, str] = {}
    for tensor in reader.tensors:
        matrix = by_gguf.get(tensor.name)
        if matrix is None:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
            continue
        weight = weights[matrix]
        perm = _row_order(reader, tensor, weight, matrix)
        p = packed.get(matrix)
        if p is None:
            data = (weight if perm is None else weight[perm]).float().contiguous().numpy()
            writer.add_tensor(tensor.name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
            written[tensor.name] = "F32"
            continue
        (buf,) = p.buffers.values()
        rows = buf.reshape(p.shape[0], -1)  # (out, bytes per row): GGUF rows are contiguous
        if perm is not None:
            rows = rows[perm]
        qtype = gguf_type(p)
        writer.add_tensor(tensor.name, rows.contiguous().numpy(), raw_dtype=qtype)
        written[tensor.name] = qtype.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def policy_metadata(settings: Mapping[str, object], **provenance: object) -> str:
    """What a written file records of its policy (``turboquant.policy``): each matrix's type and the
    provenance given (study, trial, measured metrics), as compact JSON. A llama.cpp type's name is its
    whole setting, so this is the policy; it is kept small because its bytes count in the file."""
    doc = {"matrices": {n: s.describe() for n, s in settings.items()}, **provenance}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def metadata_reserve(names: list[str]) -> int:
    """An upper bound on :func:`policy_metadata`'s bytes for these matrices (for budgets of whole files)."""
    return sum(len(n) + 16 for n in names) + 1024
