"""The CLI's policy commands: ``export`` a front point, ``eval`` a policy or checkpoint, ``apply`` a
policy to write a packed checkpoint, ``show`` a policy per layer."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import quant
from app.cli_args import STORAGE_HELP, arg, command, storage_url
from app.show import bit_map, summary_text
from evaluators import METRIC_NAMES, Evaluator, UserError
from evaluators.checkpoint import REMOTE_CODE_FLAG, checked_provenance
from evaluators.context import measured_on
from search.at_budget import REFINE_TRIALS
from search.exporters import EXPORTERS, ExportOptions, export_point
from search.exporters.checkpoint import write_checkpoint

__all__: list[str] = []  # registers its subcommands in app.cli_args.COMMANDS

# A policy is tens of kB (a 70B model's: about 1 MB); anything far larger is not one, and is not read whole.
MAX_POLICY_BYTES = 64 << 20
_TRUST = arg(REMOTE_CODE_FLAG, action="store_true", dest="trust_remote_code",
             help="allow the policy's model to run its own code (never taken from the file)")


def load_policy(path: str) -> quant.Policy:
    """The policy in the file ``path``, any failure a one-line :class:`quant.PolicyError`: a missing file,
    a folder, a device or pipe, a file too large to be a policy, bytes that are not UTF-8, JSON that
    is malformed or nested too deeply to parse, a document that is no policy."""
    file = Path(path)
    try:
        info = file.stat()
    except OSError as exc:
        raise quant.PolicyError(f"cannot read policy {path}: {exc.strerror}") from None
    if file.is_dir():
        raise quant.PolicyError(f"policy {path} is a folder; give the JSON file turboquant export wrote")
    if not file.is_file():  # /dev/zero, a FIFO: reading would never end
        raise quant.PolicyError(f"policy {path} is not a regular file")
    if info.st_size > MAX_POLICY_BYTES:
        raise quant.PolicyError(f"policy {path} is {info.st_size:,} bytes; a policy is JSON of at most "
                                f"{MAX_POLICY_BYTES >> 20} MB")
    try:
        text = file.read_bytes().decode("utf-8")
    except OSError as exc:
        raise quant.PolicyError(f"cannot read policy {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise quant.PolicyError(f"policy {path} is not a text file (not UTF-8); a policy is the JSON "
                                f"turboquant export writes") from None
    if not text.strip():
        raise quant.PolicyError(f"policy {path} is empty; export one with turboquant export")
    try:
        return quant.Policy.from_dict(json.loads(text))
    except json.JSONDecodeError as exc:
        raise quant.PolicyError(f"policy {path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise quant.PolicyError(f"policy {path} is nested too deeply to be a policy (a policy is an object of "
                                f"matrices, each a flat setting)") from None


def _export_which(p) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=int)
    which.add_argument("--budget", help="best point within this budget, e.g. 3.0bpw or 60MB; where the study has "
                       "no point using 99 %% of it, --refine-trials more trials are run at it first")


@command("export", "write a chosen front point as a file (or folder) a runtime reads", arg("study"),
         arg("--storage", default=None, help=STORAGE_HELP),
         _export_which, arg("--out", required=True, help="file (a checkpoint: folder) to write"),
         arg("--format", default="json", choices=tuple(EXPORTERS),
             help="; ".join(f"{name}: {e.help}" for name, e in EXPORTERS.items())),
         arg("--nearest", action="store_true", help="gguf, compressed-tensors: quantize each setting the runtime "
             "cannot hold again at the nearest one it holds (each change printed; the file then holds other weights "
             "than the measured ones); without it such a policy is refused"),
         arg("--refine-trials", type=int, default=REFINE_TRIALS, help="with --budget: trials run at that budget "
             "when the study has no point using 99 %% of it (solved from its sensitivity table, then evo; stored "
             "in the study); 0: only stored points"),
         arg("--workers", type=int, default=None, help="Ray workers for those trials (default: as a search)"),
         arg("--ray-address", default=None, help="join this Ray cluster for them (default: local Ray)"), _TRUST)
def _cmd_export(args: argparse.Namespace) -> int:
    exported = export_point(storage_url(args.storage), args.study, args.format, Path(args.out), trial=args.trial,
                            budget=args.budget, refine_trials=args.refine_trials, workers=args.workers,
                            ray_address=args.ray_address,
                            options=ExportOptions(nearest=args.nearest, trust_remote_code=args.trust_remote_code))
    print("\n".join(exported.lines))
    return 0


_OTHER_TEXT = ("dataset", "seq_len", "n_eval")  # eval's flags for measuring on another text


@command("eval", "re-measure a policy (or a packed checkpoint folder) on the data it was measured on, "
         "or on any other text (--dataset)",
         arg("policy", help="policy JSON, or a checkpoint folder written by turboquant apply"),
         arg("--dataset", default=None, help="measure on this text instead (a UTF-8 file, or hf:NAME[:CONFIG]), "
             "against the float model's outputs on it; printed beside the stored figures"),
         arg("--eval-seqs", type=int, default=None, dest="n_eval",
             help="with --dataset: evaluation windows (default: as the policy was measured)"),
         arg("--seq-len", type=int, default=None, help="with --dataset: tokens per window (default: as measured)"),
         arg("--json", action="store_true"), _TRUST)
def _cmd_eval(args: argparse.Namespace) -> int:
    other = {k: getattr(args, k) for k in _OTHER_TEXT}
    if Path(args.policy).is_dir():
        from evaluators.checkpoint import POLICY_FILE, evaluate_checkpoint, evaluate_export

        if (Path(args.policy) / POLICY_FILE).is_file():  # a folder another runtime loads (compressed-tensors)
            result, meta = evaluate_export(args.policy, trust_remote_code=args.trust_remote_code, **other)
        else:
            result, ckpt = evaluate_checkpoint(args.policy, trust_remote_code=args.trust_remote_code, **other)
            meta = ckpt.policy.meta
        _print_metrics(result, meta, args.json, args.dataset)
        return 0
    policy = load_policy(args.policy)
    meta = checked_provenance(policy.meta, f"policy {args.policy}", trust_remote_code=args.trust_remote_code)
    loaded, tokens = measured_on(meta, "policy", args.policy, "; export it with turboquant export", **other)
    try:
        result = Evaluator(loaded, tokens).evaluate(policy)
    except quant.PolicyError as exc:
        raise UserError(f"policy {args.policy} does not fit model {loaded.name}: {exc}") from None
    _print_metrics({**result, "seq_len": tokens.seq_len}, policy.meta, args.json, args.dataset)
    return 0


def _print_metrics(result: dict[str, Any], meta: dict, as_json: bool, dataset: str | None = None) -> None:
    # A policy with a kv section also reports its cache over one window (kv_bytes) and bits per cached element.
    metrics = {k: result[k] for k in (*METRIC_NAMES, "bytes", "bpw")} | \
        {k: result[k] for k in ("kv_bytes", "kv_bits") if k in result}
    if as_json:
        print(json.dumps(metrics, indent=2))
        return
    stored = meta.get("metrics") or {}
    if dataset is None:
        for k, v in metrics.items():
            extra = f"   (stored {stored[k]:.6g})" if isinstance(stored.get(k), (int, float)) else ""
            print(f"{k:>10} {v:.6g}{extra}")
        return
    # Beside the figures measured on the text the policy was searched on (its provenance's corpus).
    provenance = meta.get("provenance") or {}
    here = f"on {dataset} ({result['windows']} x {result['seq_len']} tokens)"
    there = f"stored, on {provenance.get('dataset', '?')} ({provenance.get('n_eval', '?')} x " \
            f"{provenance.get('seq_len', '?')} tokens)"
    width = max(len(here), 12)
    print(f"{'':>10} {here:>{width}}   {there}")
    for k, v in metrics.items():
        old = stored.get(k)
        spec = "," if k in ("bytes", "kv_bytes") else ".6g"  # bytes as the export prints them, not 6.72399e+07
        print(f"{k:>10} {v:>{width}{spec}}   " + (f"{old:{spec}}" if isinstance(old, (int, float)) else "-"))


@command("apply", "quantize the model with a policy and write a packed safetensors checkpoint",
         arg("policy", help="policy JSON from turboquant export"),
         arg("--out", required=True, help="checkpoint folder to write"), _TRUST)
def _cmd_apply(args: argparse.Namespace) -> int:
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a file; the checkpoint is a folder (give a new or existing folder)")
    _, line = write_checkpoint(load_policy(args.policy), f"policy {args.policy}", args.out,
                               trust_remote_code=args.trust_remote_code)
    print(line)
    return 0


@command("show", "a policy per layer: each matrix's bits and group size (table, optional bit map)",
         arg("policy", help="policy JSON from turboquant export"),
         arg("--plot", default=None, help="also write a per-layer bit map (heatmap), e.g. bits.png"))
def _cmd_show(args: argparse.Namespace) -> int:
    doc = load_policy(args.policy).to_dict()  # validates every setting; raises PolicyError
    try:
        text = summary_text(doc, args.policy)
        if args.plot:  # before printing anything: a bad --plot name fails alone
            from app.plots import write_bits_plot

            write_bits_plot(bit_map(doc["matrices"]), f"{Path(args.policy).name}: bits per matrix", args.plot)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(text)
    if args.plot:
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0

