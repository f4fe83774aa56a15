"""Numeric primitives shared by the scalar formats: grouping, padding, affine grids."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

__all__ = ["group_view", "ungroup", "padded_in_features", "one_thread"]


def padded_in_features(in_features: int, group_size: int | None) -> int:
    """``in_features`` rounded up to a whole number of groups.

    A group size that does not divide the row (576 by 128 in SmolLM2) is handled
    by padding the last group; the padding's codes are stored and counted in bytes.
    """
    if group_size is None:
        return in_features
    return -(-in_features // group_size) * group_size


def group_view(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``(out, in)`` float weight -> ``(out, n_groups, group)``, padding the last group.

    The pad repeats the row's last value, so it never widens a group's range.
    """
    out_features, in_features = weight.shape
    group = in_features if group_size is None else group_size
    pad = padded_in_features(in_features, group_size) - in_features
    w = weight.float()
    if pad:
        w = F.pad(w.unsqueeze(0), (0, pad), mode="replicate").squeeze(0)  # (out, in_p)
    return w.reshape(out_features, -1, group)


def ungroup(grouped: torch.Tensor, in_features: int) -> torch.Tensor:
    """``(out, n_groups, group)`` -> ``(out, in)``, dropping the padding."""
    return grouped.reshape(grouped.shape[0], -1)[:, :in_features]


@contextmanager
def one_thread() -> Iterator[None]:
    """Runs the block on one torch thread, so float products sum in one fixed order.

    GPTQ rounds weights that error feedback has updated: on 2 threads its column loop's products
    split differently, last bits differ, some roundings flip and the feedback carries each flip
    on. 6 of 7 SmolLM2 matrices tried came out different at 1 and 2 threads, and a checkpoint
    applied at 2 threads missed the KL a 1-thread search worker had measured (3.9696 vs 3.9706).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
