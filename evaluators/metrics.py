"""Quality metrics of a model's next-token distributions against the reference.

All metrics are means over the predicted positions (every position but the last of
each window, since the last has no next token to score perplexity against).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from evaluators.reference import rest_logmass

__all__ = ["MetricSums", "METRIC_NAMES"]

METRIC_NAMES = ("kl", "ppl", "top1", "logit_err")


@dataclass
class MetricSums:
    """Running sums, so long evaluations can be done in batches.

    ``kl``: KL(reference || model) in nats. ``ppl``: exp of the model's mean
    next-token negative log-likelihood. ``top1``: share of positions where the model's
    most likely token is the reference's. ``logit_err``: mean absolute difference of
    log-probabilities (logits up to the per-position shift that softmax ignores).
    """

    kl: float = 0.0
    nll: float = 0.0
    top1: float = 0.0
    abs_err: float = 0.0
    positions: int = 0
    cells: int = 0

    def add(self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, targets: torch.Tensor,
            ref_top: torch.Tensor | None = None) -> None:
        """Adds ``(B, T, V)`` model and reference log-probs with ``(B, T)`` next tokens.

        ``ref_top``: the reference's argmax ``(B, T)`` when the caller keeps it (it is the same
        every trial). One ``(B, T, V)`` temporary serves KL and logit error: this runs once per
        batch of every trial, and the passes over a 49k vocabulary cost about a third of a forward.
        """
        if logprobs.shape != ref_logprobs.shape or logprobs.shape[:2] != targets.shape:
            # Broadcasting would silently compare one window with another.
            raise ValueError(f"shapes differ: model {tuple(logprobs.shape)}, reference {tuple(ref_logprobs.shape)}, "
                             f"targets {tuple(targets.shape)}")
        diff = (ref_logprobs - logprobs).reshape(-1)
        self.kl += float(torch.dot(ref_logprobs.exp().reshape(-1), diff))
        self.abs_err += float(diff.abs_().sum())
        self.nll -= float(logprobs.gather(-1, targets.unsqueeze(-1)).sum())
        top = ref_logprobs.argmax(-1) if ref_top is None else ref_top
        self.top1 += float((logprobs.argmax(-1) == top).sum())
        self.positions += targets.numel()
        self.cells += logprobs.numel()

    def add_topk(self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, ref_indices: torch.Tensor,
                 ref_log_rest: torch.Tensor, targets: torch.Tensor, tail_logprobs: torch.Tensor | None = None,
                 tail_indices: torch.Tensor | None = None) -> None:
        """Adds ``(B, T, V)`` model log-probs against a top-k reference (see
        :class:`~evaluators.reference.TopKReference`): ``(B, T, k)`` log-probs and word ids, ``(B, T)``
        log of the mass outside them.

        KL is the definition's over the k words, ``sum_k p_i (log p_i - log q_i)``, plus the rest's share,
        ``r_p (log r_p - log r_q) + r_p KL(p_tail || q_tail)``: the rest as one bucket (``r_p``, ``r_q`` the
        reference's and the model's mass outside the reference's k words) plus the divergence within it,
        estimated on the ``(B, T, m)`` ``tail_logprobs`` / ``tail_indices`` (words drawn from the
        reference's tail) as the mean of ``ratio - 1 - log ratio``, ``ratio = q_tail / p_tail``. Without
        drawn words, the bucket alone (a lower bound). The rest's term is 0 where ``r_p`` is. ``logit_err``
        is the mean over the k kept words; perplexity and top-1 come from the model's own log-probs.
        """
        if logprobs.shape[:2] != targets.shape or ref_logprobs.shape != ref_indices.shape \
                or ref_logprobs.shape[:2] != targets.shape or ref_log_rest.shape != targets.shape:
            raise ValueError(f"shapes differ: model {tuple(logprobs.shape)}, reference top-k "
                             f"{tuple(ref_logprobs.shape)} / {tuple(ref_indices.shape)}, rest "
                             f"{tuple(ref_log_rest.shape)}, targets {tuple(targets.shape)}")
        indices = ref_indices.long()
        diff = ref_logprobs - logprobs.gather(-1, indices)  # (B, T, k)
        rest_p = ref_log_rest.exp()
        log_rest_q = rest_logmass(logprobs, indices)
        rest = rest_p * (ref_log_rest - log_rest_q)  # the bucket
        if tail_logprobs is not None:
            # log q_tail(x) / p_tail(x) on the drawn words: r = ratio - 1 - log ratio is never negative, has
            # mean KL(p_tail || q_tail) (E[ratio] = 1 under p_tail) and shrinks with the error squared,
            # where the plain mean of -log ratio has a spread of the error's own size.
            log_ratio = (logprobs.gather(-1, tail_indices.long()) - log_rest_q.unsqueeze(-1)) \
                - (tail_logprobs - ref_log_rest.unsqueeze(-1))
            rest = rest + rest_p * (torch.expm1(log_ratio) - log_ratio).mean(-1)
        rest = torch.where(rest_p > 0, rest, torch.zeros_like(rest_p))
        self.kl += float((ref_logprobs.exp() * diff).sum()) + float(rest.sum())
        self.abs_err += float(diff.abs_().sum())
        self.nll -= float(logprobs.gather(-1, targets.unsqueeze(-1)).sum())
        self.top1 += float((logprobs.argmax(-1) == indices[..., 0]).sum())
        self.positions += targets.numel()
        self.cells += diff.numel()

    def result(self) -> dict[str, float]:
        n = max(self.positions, 1)
        return {"kl": max(self.kl / n, 0.0), "ppl": math.exp(self.nll / n), "top1": self.top1 / n,
                "logit_err": self.abs_err / max(self.cells, 1)}
