"""The driver's memory, phase by phase: what each phase holds at its peak, checked before it starts.

A search's driver loads the float model, computes the reference, runs the sensitivity proxy (a
backward pass per calibration window, the Fisher of every matrix, gptq's input Hessians) and only then
starts the workers. On a 1.5B model in float32 the proxy alone held the model, its gradients, the Fisher
and every Hessian at once (about 30 GB) and was killed by the kernel with nothing said. Here each phase
has an estimate from the model's shapes, printed when the phase starts and checked against the memory
then available, so a search that cannot fit stops before the phase, with the numbers and what to change.

The estimates are pure functions of numbers (tested without a model); :class:`Phases` measures the
real peak of each phase (sampled resident memory) and logs it beside the estimate.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from evaluators import UserError

__all__ = ["DRIVER_PROCESS_BYTES", "DriverPlan", "GB", "MARGIN_BYTES", "ModelSize", "Phases", "proxy_bytes", "reference_pass_bytes", "rss"]

log = logging.getLogger("search.driver")  # the driver's voice (see search.progress)
# The phases and their memory are what a user of a large model needs to see (minutes each, and the
# reason for a refusal): shown without -v, whatever level the command line sets for the rest.
if log.level == logging.NOTSET:
    log.setLevel(logging.INFO)
GB = 2 ** 30  # the unit of every figure logged (GiB, as the workers' estimate says)
# The driver before it loads a model (Python, torch, transformers, Optuna, SQLAlchemy): about 0.8 GB
# resident, measured here.
DRIVER_PROCESS_BYTES = 900 * 2 ** 20
# Memory left free beside every estimate: the page cache the loader reads through, allocator slack.
MARGIN_BYTES = 1 << 30


@dataclass(frozen=True)
class ModelSize:
    """What the memory of a model's passes depends on, in bytes or elements.

    Attributes:
        param_bytes: every parameter, in the dtype it is loaded in.
        matrix_numel: the weights the search quantizes (the Fisher keeps a float32 value for each).
        largest_matrix: elements of the largest matrix (the head or the embedding).
        hessian_bytes: every float32 input Hessian (``in x in`` per matrix) gptq would take.
        largest_hessian: the largest of them (a ``down_proj``'s: 8960^2 floats on Qwen2.5-1.5B).
        activations: elements a backward keeps per token: each matrix's input and output.
        vocab: the output vocabulary.
        element: bytes per parameter.
    """

    param_bytes: int
    matrix_numel: int
    largest_matrix: int
    hessian_bytes: int
    largest_hessian: int
    activations: int
    vocab: int
    element: int

    @classmethod
    def of(cls, model: Any) -> "ModelSize":
        import quant
        from torch import nn

        matrices = quant.weight_matrices(model)
        modules = dict(model.named_modules())
        fed = {n: s for n, s in matrices.items() if not isinstance(modules.get(n), nn.Embedding)}
        ties = quant.find_matrices(model)[1]  # a tied head feeds its embedding's Hessian
        hess = [4 * s[1] ** 2 for s in fed.values()] + [4 * matrices[e][1] ** 2 for e in ties.values() if e in matrices]
        params = list(model.parameters())
        return cls(param_bytes=sum(p.numel() * p.element_size() for p in params),
                   matrix_numel=sum(o * i for o, i in matrices.values()),
                   largest_matrix=max(o * i for o, i in matrices.values()),
                   hessian_bytes=sum(hess), largest_hessian=max(hess, default=0),
                   activations=sum(o + i for o, i in fed.values()), vocab=int(model.config.vocab_size),
                   element=params[0].element_size())


def reference_pass_bytes(size: ModelSize, seq_len: int, batch: int = 2) -> int:
    """A forward without gradients over ``batch`` windows: the logits in float32 thrice (the model's,
    their float copy, the log-probs) and one layer's activations."""
    return batch * seq_len * (3 * 4 * size.vocab + 4 * size.element * size.activations // max(1, _layers(size)))


def proxy_bytes(size: ModelSize, seq_len: int, gptq_bits: int) -> tuple[int, int, int]:
    """The proxy's own peaks besides the model, in its three stages: ``(fisher, pairs, largest)``.

    ``fisher``: the Fisher's float32 accumulators (one per weight) and a window's backward (every
    matrix's input and output kept, the logits' float32 copies and gradients; each gradient is freed as
    soon as it is squared in). ``pairs``: the accumulators while the layers' matrices are quantized at
    every setting (each matrix's freed once done); gptq's Hessians come on top, a group at a time.
    ``largest``: the embedding and head, quantized last: their Fisher, one setting's error terms and
    gptq's float32 copy of the matrix per bit-width.
    """
    fisher = 4 * size.matrix_numel
    backward = seq_len * (size.element * size.activations + 5 * 4 * size.vocab)
    return fisher + backward, fisher, 4 * size.largest_matrix * (5 + gptq_bits)


def _layers(size: ModelSize) -> int:
    return 1 if size.largest_hessian == 0 else max(1, size.hessian_bytes // max(size.largest_hessian, 1))


def rss() -> int:
    """This process's resident bytes."""
    import psutil

    return psutil.Process().memory_info().rss


class Phases:
    """The driver's phases, each logged as it starts with its estimated peak, checked against the
    memory then available (or ``limit``, ``--memory-limit``: the whole search's), and logged when it
    ends with the peak measured (resident memory sampled every 50 ms).

    ``start`` raises :class:`UserError` (saying the estimate, what is available and what to change)
    before a phase that would not fit.
    """

    def __init__(self, limit: int | None = None, sample_seconds: float = 0.05):
        self.limit = limit
        self.peaks: dict[str, tuple[int, int, float]] = {}  # phase -> (estimate, peak, seconds)
        self._name: str | None = None
        self._estimate = 0
        self._t0 = 0.0
        self._peak = 0
        self._stop = threading.Event()
        self._sample_seconds = sample_seconds
        self._thread: threading.Thread | None = None

    def available(self) -> int:
        """Bytes this process may still grow by."""
        import psutil

        if self.limit is not None:
            return max(0, self.limit - rss())
        return psutil.virtual_memory().available

    def start(self, name: str, estimate: int, what: str, hint: str = "") -> None:
        """Ends the phase before (logging its peak) and starts ``name``, whose driver holds about
        ``estimate`` bytes at its peak (total resident, the process included)."""
        self.end()
        held, free = rss(), self.available()
        need = max(0, estimate - held)
        log.info("phase %s: %s; driver about %.1f GiB at its peak (%.1f GiB now, %.1f GiB available)", name, what,
                 estimate / GB, held / GB, free / GB)
        if need and need + MARGIN_BYTES > free:  # a phase that needs nothing more than it holds always fits
            raise UserError(f"phase {name} ({what}) needs about {estimate / GB:.1f} GiB in the driver, "
                            f"{need / GB:.1f} GiB more than the {held / GB:.1f} GiB it holds, but {free / GB:.1f} GiB is "
                            f"available (keeping {MARGIN_BYTES / GB:.1f} GiB free)" + (f"; {hint}" if hint else ""))
        self._name, self._estimate, self._t0, self._peak = name, estimate, time.perf_counter(), held
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="phase-memory", daemon=True)
        self._thread.start()

    def end(self) -> None:
        """Ends the current phase (if any), logging its time and measured peak."""
        if self._name is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._peak = max(self._peak, rss())
        seconds = time.perf_counter() - self._t0
        self.peaks[self._name] = (self._estimate, self._peak, seconds)
        log.info("phase %s done in %.1f s: driver peak %.2f GiB (estimated %.2f GiB)", self._name, seconds,
                 self._peak / GB, self._estimate / GB)
        self._name = None

    def _sample(self) -> None:
        while not self._stop.wait(self._sample_seconds):
            self._peak = max(self._peak, rss())


@dataclass
class DriverPlan:
    """The driver's estimated peak (total resident bytes) in each phase, the Hessian memory the proxy may
    hold at once, and what one worker holds."""

    reference: int
    proxy: int
    proxy_what: str
    hessian_bytes: int | None
    workers_driver: int
    worker_what: str
    hint: str

    @classmethod
    def of(cls, model: Any, tokens: Any, space: Any, topk: int | None, phases: "Phases", *, proxied: bool,
           reference: bool = True) -> "DriverPlan":
        """Estimates every phase now (the model loaded) and refuses up front those that cannot fit.

        ``proxied``: the driver predicts the sensitivity proxy; ``reference``: it holds the float model's
        log-probs (``topk`` of them per position, or all) while it does."""
        import quant
        from evaluators import reference_nbytes

        size = ModelSize.of(model)
        rss_now, free = rss(), phases.available()
        seq_len = tokens.seq_len
        held = reference_nbytes(tokens.eval.shape[0], seq_len - 1, size.vocab, topk) if reference else 0
        settings = space.settings()
        gptq = quant.needs_hessians(settings) and len(tokens.calib) > 0
        gptq_bits = len({s.bits for s in settings if quant.needs_hessians([s])}) if gptq else 0
        hint = ("use --dtype bfloat16 (half the model), fewer --eval-seqs or --calib-seqs, --formats without gptq "
                "(no input Hessians), --reference-topk 512, or free memory")
        fisher, pairs, largest = proxy_bytes(size, seq_len, gptq_bits)
        # A float32 checkpoint is mapped, not read: its pages count once the passes touch them.
        base = max(rss_now, DRIVER_PROCESS_BYTES + size.param_bytes) + held
        hessian_bytes = None
        proxy = base + max(fisher, pairs, largest)
        if proxied and gptq:
            room = free + rss_now - base - pairs - MARGIN_BYTES
            least = size.largest_hessian
            if room < least:
                raise UserError(
                    f"the sensitivity proxy needs about {(base + pairs + least) / GB:.1f} GiB in the driver (the "
                    f"model {size.param_bytes / GB:.1f} GiB, the Fisher {pairs / GB:.1f} GiB, gptq's largest input "
                    f"Hessian {least / GB:.2f} GiB) but {(free + rss_now) / GB:.1f} GiB is available; {hint}")
            # A third of the room at most, in groups: the machine's other processes keep the rest; more
            # would save only calibration passes (one forward over the calibration windows per group).
            hessian_bytes = min(size.hessian_bytes, max(least, room // 3))
            proxy = max(proxy, base + pairs + hessian_bytes)
        groups = -(-size.hessian_bytes // hessian_bytes) if hessian_bytes else 0
        what = (f"diagonal Fisher of {size.matrix_numel / 1e6:.0f}M weights over {len(tokens.calib) or len(tokens.eval)} "
                f"windows" + (f", gptq's input Hessians ({size.hessian_bytes / GB:.1f} GiB) in {groups} calibration "
                              f"pass(es)" if hessian_bytes else ""))
        return cls(reference=base + reference_pass_bytes(size, seq_len), proxy=proxy, proxy_what=what,
                   hessian_bytes=hessian_bytes, workers_driver=max(DRIVER_PROCESS_BYTES, rss_now - size.param_bytes)
                   + held, worker_what="the workers load their own model", hint=hint)
