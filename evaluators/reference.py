"""The float model's next-token distributions that every trial is compared with: full or top-k.

The full reference is the log-prob tensor ``(B, T, V)``: 400 MB in float32 for SmolLM2 (8 x 255
positions x 49,152 words), 8.6 GB for a 262k vocabulary at 8 x 1,023 positions. The top-k one keeps
the ``k`` most likely words per position and the mass of all the others as one bucket (``8k + 4``
bytes a position instead of ``4V``); KL against it is the KL of the distributions with that bucket
as one outcome, a lower bound of the full KL (merging outcomes loses what the tail tells apart).

EvoPress reports top-K KL as good as full KL for K >= 512; on SmolLM2 (Shakespeare windows, where
the words beyond the top 512 hold 6 % of the mass on average) top-512 KL reads 6-9 % below full KL
for rtn 2/3/4-bit g64 and 8-bit per channel, top-8192 0.5-0.6 %: full stays the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

__all__ = ["FullReference", "Reference", "TopKReference", "reference_nbytes"]

FullReference = np.ndarray  # (B, T, V) float32 log-probs


@dataclass(frozen=True)
class TopKReference:
    """The ``k`` largest reference log-probs per position and the log of the mass outside them.

    Plain numpy arrays, so Ray's object store shares them with every worker without a copy.

    Attributes:
        logprobs: ``(B, T, k)`` float32, largest first (``[..., 0]`` is the reference's argmax).
        indices: ``(B, T, k)`` int32 word ids of ``logprobs``.
        log_rest: ``(B, T)`` float32 log of ``1 - sum(exp(logprobs))``; ``-inf`` when ``k`` is the
            whole vocabulary (no mass is left).
        vocab_size: the model's vocabulary (the width of a full log-prob row).
    """

    logprobs: np.ndarray
    indices: np.ndarray
    log_rest: np.ndarray
    vocab_size: int

    @classmethod
    def from_logprobs(cls, logprobs: torch.Tensor, k: int) -> "TopKReference":
        """The top-``k`` reference of full ``(B, T, V)`` log-probs (``k`` is capped at ``V``)."""
        if k < 1:
            raise ValueError(f"top-k needs k >= 1, got {k}")
        vocab = logprobs.shape[-1]
        values, indices = torch.topk(logprobs, min(k, vocab), dim=-1, sorted=True)
        return cls(values.float().numpy(), indices.to(torch.int32).numpy(),
                   rest_logmass(logprobs, indices).float().numpy(), int(vocab))

    @classmethod
    def concat(cls, parts: list["TopKReference"]) -> "TopKReference":
        """One reference of the windows of ``parts``, in order."""
        return cls(np.concatenate([p.logprobs for p in parts]), np.concatenate([p.indices for p in parts]),
                   np.concatenate([p.log_rest for p in parts]), parts[0].vocab_size)

    @property
    def k(self) -> int:
        return int(self.logprobs.shape[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        """``(B, T, V)``: the shape of the full reference this one stands for."""
        return (*self.log_rest.shape, self.vocab_size)

    @property
    def nbytes(self) -> int:
        return int(self.logprobs.nbytes + self.indices.nbytes + self.log_rest.nbytes)

    def __len__(self) -> int:
        return int(self.log_rest.shape[0])


Reference = Union[FullReference, TopKReference]


# Below this remainder a float32 sum of the kept probabilities is too coarse (its rounding, ~1e-6,
# would be a visible share of the remainder): those positions are summed over the words left out.
_EXACT_BELOW = 1e-3


def rest_logmass(logprobs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``log(1 - sum_{i in indices} exp(logprobs_i))`` per position, ``(B, T, V)``, ``(B, T, k)`` -> ``(B, T)``.

    ``1 - sum`` in float64 over the k kept words (a pass over k, not V, in every trial); where less
    than ``_EXACT_BELOW`` is left, the float32 inputs cannot resolve the remainder that way, so it
    is summed over the words left out instead (their log-probs, the kept ones masked to -inf):
    ``-inf`` when nothing is left (k = V).
    """
    indices = indices.long()
    kept = logprobs.gather(-1, indices).double().exp().sum(-1)  # (B, T)
    rest = torch.log1p(-kept.clamp(max=1.0))
    close = kept > 1 - _EXACT_BELOW
    if bool(close.any()):
        masked = logprobs[close].scatter(-1, indices[close], float("-inf"))  # (n, V): a copy, the input is kept
        rest[close] = torch.logsumexp(masked, dim=-1).double()
    return rest.to(logprobs.dtype)


def reference_nbytes(windows: int, positions: int, vocab: int, topk: int | None) -> int:
    """Bytes of a reference over ``windows x positions`` predicted tokens: full, or top-``topk``."""
    cells = windows * positions
    if topk is None or topk >= vocab:
        return cells * vocab * 4
    return cells * (topk * (4 + 4) + 4)
