"""Keeps dependencies' start-up noise out of the command line's output.

transformers imports torchao (a dev dependency) whenever it is installed, when it loads a model.
On a CPU machine torchao then logs that its CUDA libraries fail to load and that triton is missing,
and torch logs a ``register_constant()`` deprecation for two of torchao's enums. None of it is
actionable for a user of this tool, and it buries the progress bar and the front (as does the
"Loading weights" bar transformers draws for every model load). All of it goes
through Python logging, so a filter on exactly the loggers that emit it drops exactly these
messages; every other warning of those loggers, and every other logger, still shows.
"""

from __future__ import annotations

import logging
import re

__all__ = ["NOISE", "quiet_dependencies"]

# logger name -> the messages of it that are dropped (matched at the start of the message).
NOISE: dict[str, re.Pattern[str]] = {
    # torchao/__init__.py: each CUDA-only extension (_C_mxfp8, _C_cutlass_90a) on a CPU build
    "torchao": re.compile(r"Failed to load .*torchao[/\\]_C\w*\.\S*\.so"),
    # torchao/kernel/intmm.py: CPU builds have no triton
    "torchao.kernel.intmm": re.compile(r"Warning: Detected no triton"),
    # torch/utils/_pytree.py: torchao registers its enums the pre-2.13 way
    "torch.utils._pytree": re.compile(r"<enum '\w+'> is an Enum subclass .* register_constant\(\)", re.S),
}


class _DropNoise(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def quiet_dependencies() -> None:
    """Installs the filters (once; idempotent). Call it before transformers loads a model.

    A filter on a logger applies to the records that logger itself creates, whatever handlers
    (torch's own, or the CLI's ``basicConfig``) print them later.
    """
    for name, pattern in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(pattern))
    # transformers draws a "Loading weights" bar each time a process loads the model (the driver and
    # every worker); downloads from a hub keep theirs.
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    enable_progress_bars()
