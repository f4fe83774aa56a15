"""A plain command prints its results and real warnings, not its dependencies' start-up noise."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from search.quiet import quiet_dependencies

# What torchao (imported by transformers when it loads a model) and torch print on a CPU machine.
NOISE = ("Failed to load", "_C_mxfp8", "Detected no triton", "_pytree", "register_constant")


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_the_filters_drop_exactly_the_known_noise() -> None:
    quiet_dependencies()
    quiet_dependencies()  # twice: still one filter per logger
    keep = _Keep()
    loggers = {name: logging.getLogger(name) for name in ("torchao", "torchao.kernel.intmm", "torch.utils._pytree")}
    for logger in loggers.values():
        logger.addHandler(keep)
        assert len(logger.filters) == 1
    try:
        loggers["torchao"].warning("Failed to load /venv/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu"
                                   ".so: Could not load this library")
        loggers["torchao"].warning("Failed to load %s: %s", "/venv/torchao/_C_cutlass_90a.abi3.so", "no CUDA")
        loggers["torchao.kernel.intmm"].warning("Warning: Detected no triton, on systems without Triton certain "
                                                "kernels will not work")
        loggers["torch.utils._pytree"].warning("%s is an Enum subclass and is now natively supported by torch.compile"
                                               " as an opaque value type. Calling register_constant() on Enum "
                                               "subclasses is deprecated", "<enum 'KernelPreference'>")
        # Other warnings of the same loggers still show.
        loggers["torchao"].warning("Skipping import of cpp extensions due to TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1")
        loggers["torch.utils._pytree"].warning("some other pytree warning")
    finally:
        for logger in loggers.values():
            logger.removeHandler(keep)
    assert keep.messages == ["Skipping import of cpp extensions due to TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1",
                             "some other pytree warning"]


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="without torchao there is no noise to hide")
def test_a_plain_search_prints_its_front_and_real_warnings_only(corpus: str, tmp_path: Path) -> None:
    # A budget above the 16-bit size: the search's own warning must still show.
    cmd = [sys.executable, "-m", "app.cli", "search", "--model", "tiny-random-llama", "--dataset", corpus,
           "--budget", "17bpw", "--trials", "1", "--workers", "1", "--seq-len", "64", "--eval-seqs", "2",
           "--calib-seqs", "2", "--storage", f"sqlite:///{tmp_path / 'q.db'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    assert "front of tiny-random-llama-17bpw" in done.stdout
    assert "WARNING: budget 17bpw is at or above the 16-bit model size" in done.stderr
    assert [line for line in out.splitlines() if any(n in line for n in NOISE)] == []
    assert "search tiny-random-llama-17bpw" in done.stderr  # its progress bar


def test_the_engine_imports_nothing_of_the_application() -> None:
    """``import search`` (what every Ray worker does) loads no web framework, no command line, no plots:
    those are the application's (app/), above the engine."""
    code = ("import sys, search, search.exporters, search.driver; "
            "bad = [m for m in ('fastapi', 'uvicorn', 'starlette', 'matplotlib', 'plotly', 'app') if m in sys.modules]; "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
