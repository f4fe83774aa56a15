"""The float model's next-token distributions that every trial is compared with: full or top-k.

The full reference is the log-prob tensor ``(B, T, V)``: 400 MB in float32 for SmolLM2 (8 x 255
positions x 49,152 words), 8.6 GB for a 262k vocabulary at 8 x 1,023 positions. The top-k one keeps
the ``k`` most likely words per position, the mass of all the others, and :data:`TAIL_SAMPLES` words
drawn from those others by their probability (``8k + 4 + 8m`` bytes a position instead of ``4V``).

KL against it is the definition's sum over the k words plus the tail's share
``sum_tail p log(p/q) = r_p log(r_p / r_q) + r_p KL(p_tail || q_tail)`` (``r``: the mass outside the k
words), the second term estimated on the drawn words as the mean of ``ratio - 1 - log ratio`` with
``ratio = q_tail(x) / p_tail(x)``: unbiased (``E[ratio] = 1`` under ``p_tail``), never negative, and
its spread shrinks with the error squared, where the plain mean of ``log p/q`` spreads as the error
itself (1.6 % off at 8 bits on SmolLM2, 5 % on the tiny model). The same draws serve every trial, so
trials are compared on equal terms. Without the draws (``tail=0``) the tail is one bucket,
``r_p log(r_p / r_q)``: a lower bound that loses what the tail tells apart. On SmolLM2 (Shakespeare windows, where the words beyond the top 512
hold 6 % of the mass) the bucket reads 6-9 % below the full KL for rtn 2/3/4-bit g64 and 8-bit per
channel (EvoPress's "top-K as good as full for K >= 512" does not hold there); 64 drawn words bring
top-512 to 0.997-1.002x the full KL for those and four mixed policies (``benchmarks/topk_reference.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

__all__ = ["AUTO_TOPK", "FULL_REFERENCE_LIMIT", "FullReference", "Reference", "TAIL_SAMPLES", "TopKReference",
           "reference_nbytes", "resolve_topk"]

FullReference = np.ndarray  # (B, T, V) float32 log-probs
# Words drawn per position from the words outside the top k (with replacement). On SmolLM2 at k = 512, 16 give
# 0.996-1.000x the full KL and 64 0.997-1.002x; 64 for heavier tails (the tiny test model, 14 % of the mass
# outside its top 32: 0.2-0.5 % off), for an eighth more bytes at k = 512.
TAIL_SAMPLES = 64
# Without --reference-topk, a full reference larger than this is kept as top-AUTO_TOPK (a 128k vocabulary at
# 8 x 255 positions is 1.05 GB full, copied to every node); SmolLM2's 401 MB stays full.
FULL_REFERENCE_LIMIT = 10 ** 9
AUTO_TOPK = 512


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
        tail_logprobs: ``(B, T, m)`` float32 reference log-probs of ``m`` words drawn from the words
            outside the top k, by their probability; ``None``: the tail is one bucket.
        tail_indices: ``(B, T, m)`` int32 word ids of ``tail_logprobs``.
    """

    logprobs: np.ndarray
    indices: np.ndarray
    log_rest: np.ndarray
    vocab_size: int
    tail_logprobs: np.ndarray | None = None
    tail_indices: np.ndarray | None = None

    @classmethod
    def from_logprobs(cls, logprobs: torch.Tensor, k: int, *, tail: int = TAIL_SAMPLES,
                      first_window: int = 0) -> "TopKReference":
        """The top-``k`` reference of full ``(B, T, V)`` log-probs (``k`` is capped at ``V``), with ``tail``
        words drawn per position from the others (none when ``k`` covers the vocabulary).

        Window ``b``'s draws are seeded by ``first_window + b``, its index among the evaluation windows:
        the same reference whatever the batches it was computed in.
        """
        if k < 1:
            raise ValueError(f"top-k needs k >= 1, got {k}")
        vocab = logprobs.shape[-1]
        values, indices = torch.topk(logprobs, min(k, vocab), dim=-1, sorted=True)
        tail_lp = tail_idx = None
        if tail and vocab > k:
            drawn = torch.stack([_draw_tail(lp, idx, tail, first_window + b)
                                 for b, (lp, idx) in enumerate(zip(logprobs, indices))])  # (B, T, m)
            tail_lp, tail_idx = logprobs.gather(-1, drawn).float().numpy(), drawn.to(torch.int32).numpy()
        return cls(values.float().numpy(), indices.to(torch.int32).numpy(),
                   rest_logmass(logprobs, indices).float().numpy(), int(vocab), tail_lp, tail_idx)

    @classmethod
    def concat(cls, parts: list["TopKReference"]) -> "TopKReference":
        """One reference of the windows of ``parts``, in order."""
        tails = parts[0].tail_logprobs is not None
        return cls(np.concatenate([p.logprobs for p in parts]), np.concatenate([p.indices for p in parts]),
                   np.concatenate([p.log_rest for p in parts]), parts[0].vocab_size,
                   np.concatenate([p.tail_logprobs for p in parts]) if tails else None,
                   np.concatenate([p.tail_indices for p in parts]) if tails else None)

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        """``(logprobs, indices, log_rest)``, then ``(tail_logprobs, tail_indices)`` if drawn: the order
        :meth:`evaluators.metrics.MetricSums.add_topk` takes them in (after the targets, the tail's)."""
        top = (self.logprobs, self.indices, self.log_rest)
        return top if self.tail_logprobs is None else (*top, self.tail_logprobs, self.tail_indices)

    @property
    def k(self) -> int:
        return int(self.logprobs.shape[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        """``(B, T, V)``: the shape of the full reference this one stands for."""
        return (*self.log_rest.shape, self.vocab_size)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays))

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


def _draw_tail(logprobs: torch.Tensor, indices: torch.Tensor, m: int, seed: int) -> torch.Tensor:
    """``m`` word ids per position drawn from ``(T, V)`` log-probs outside the ``(T, k)`` kept ``indices``,
    by their probability (renormalized over the tail), with replacement: ``(T, m)``."""
    tail = logprobs.float().scatter(-1, indices, float("-inf"))  # a copy: the input is kept
    return torch.multinomial(torch.softmax(tail, dim=-1), m, replacement=True,
                             generator=torch.Generator().manual_seed(seed))


def reference_nbytes(windows: int, positions: int, vocab: int, topk: int | None, tail: int = TAIL_SAMPLES) -> int:
    """Bytes of a reference over ``windows x positions`` predicted tokens: full, or top-``topk`` with
    ``tail`` drawn words."""
    cells = windows * positions
    if topk is None or topk >= vocab:
        return cells * vocab * 4
    return cells * ((topk + tail) * (4 + 4) + 4)


def resolve_topk(requested: int | None, windows: int, positions: int, vocab: int) -> int | None:
    """The top-k a reference keeps for ``--reference-topk requested``: ``None`` (the full log-probs) for 0 or
    for a k covering the vocabulary, ``requested`` otherwise; unset, :data:`AUTO_TOPK` when the full
    reference over ``windows x positions`` would pass :data:`FULL_REFERENCE_LIMIT`, else full."""
    if requested is None:
        requested = AUTO_TOPK if reference_nbytes(windows, positions, vocab, None) > FULL_REFERENCE_LIMIT else 0
    return requested if 0 < requested < vocab else None
