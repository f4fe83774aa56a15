"""The ``turboquant`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main"]


def _groups(text: str) -> tuple[int | None, ...]:
    return tuple(None if g in ("ch", "channel") else int(g) for g in text.split(","))


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="alias, local folder or Hugging Face id")
    p.add_argument("--dataset", default="shakespeare", help="'shakespeare' (embedded), a text file, or hf:NAME[:CONFIG]")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-seqs", type=int, default=8, help="evaluation windows of --seq-len tokens")
    p.add_argument("--calib-seqs", type=int, default=8, help="calibration windows (disjoint from evaluation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true", help="allow models that run their own code")


def _space_args(p: argparse.ArgumentParser) -> None:
    """What the search (and the sensitivity table) may give each unit; read by :func:`_data_and_space`."""
    p.add_argument("--bits", default="2,3,4,5,6,8", help="allowed bit-widths")
    p.add_argument("--groups", default="32,64,128", help="allowed group sizes; 'ch' = per output channel")
    p.add_argument("--formats", default="rtn", help="allowed quantizers, comma-separated: rtn, gptq, turbo, "
                   "lloyd, vq, ternary; boolean options with '+' (gptq+clip)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turboquant", description="Mixed-precision quantization search.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("search", help="run or resume a search against a memory budget")
    _data_args(p)
    p.add_argument("--budget", required=True, help="e.g. 3.0bpw or 70MB")
    p.add_argument("--trials", type=int, default=20, help="finished trials the study should have, complete or "
                   "pruned by --multi-fidelity (resume adds up to it)")
    p.add_argument("--sampler", default="nsga2", help="nsga2, tpe, gp, evo (budget-aware, ours) or random")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--storage", default=None, help="SQLAlchemy URL (default sqlite:///turboquant.db)")
    p.add_argument("--study", default=None, help="study name (default: MODEL-BUDGET)")
    _space_args(p)
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: local Ray)")
    p.add_argument("--memory-limit", default=None, help="memory the search may use, e.g. 8GB (default: available)")
    p.add_argument("--granularity", default="matrix", help="what shares one setting: matrix, block "
                   "(each layer's attention and MLP) or layer")
    p.add_argument("--multi-fidelity", action=argparse.BooleanOptionalAction, default=None,
                   help="score children on the first batch of windows and stop the hopeless ones there "
                        "(default: on for --sampler evo)")
    p.add_argument("--sensitivity", action="store_true",
                   help="measure (or reuse) per-matrix sensitivity first and enqueue DP/greedy seeds "
                        "(one forward per matrix and setting; reused by later studies)")
    p.add_argument("--sensitivity-seqs", type=int, default=None,
                   help="measure sensitivity on the first N evaluation windows only (default: all)")

    p = sub.add_parser("studies", help="list studies")
    p.add_argument("--storage", default=None)

    p = sub.add_parser("front", help="a study's Pareto front (feasible, non-dominated, by bytes)")
    p.add_argument("study")
    p.add_argument("--storage", default=None)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true")
    p.add_argument("--plot", default=None, help="also write the front as a picture: front.png or front.html")

    p = sub.add_parser("export", help="write the policy of a chosen front point")
    p.add_argument("study")
    p.add_argument("--storage", default=None)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=int)
    which.add_argument("--budget", help="best point within this budget, e.g. 3.0bpw or 60MB")
    p.add_argument("--out", required=True, help="file to write")
    p.add_argument("--format", default="json", choices=["json", "gptqmodel", "llamacpp", "torchao"],
                   help="json (TurboQuant policy), gptqmodel (dynamic overrides), llamacpp "
                        "(--tensor-type-file), torchao (FqnToConfig JSON)")

    p = sub.add_parser("eval", help="re-measure a policy (or a packed checkpoint folder) on the data it was measured on")
    p.add_argument("policy", help="policy JSON, or a checkpoint folder written by turboquant apply")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("apply", help="quantize the model with a policy and write a packed safetensors checkpoint")
    p.add_argument("policy", help="policy JSON from turboquant export")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    _add_serve_parser(sub)
    _add_sensitivity_parser(sub)
    _add_show_parser(sub)
    return parser


def _add_show_parser(sub) -> None:
    p = sub.add_parser("show", help="a policy per layer: each matrix's bits and group size (table, optional bit map)")
    p.add_argument("policy", help="policy JSON from turboquant export")
    p.add_argument("--plot", default=None, help="also write a per-layer bit map (heatmap), e.g. bits.png")


def _cmd_show(args: argparse.Namespace) -> int:
    import quant
    from evaluators.errors import UserError
    from search.show import bit_map, summary_text

    doc = quant.Policy.load(args.policy).to_dict()  # validates every setting; raises PolicyError
    try:
        text = summary_text(doc, args.policy)
        if args.plot:  # before printing anything: a bad --plot name fails alone
            from search.plots import write_bits_plot

            write_bits_plot(bit_map(doc["matrices"]), f"{Path(args.policy).name}: bits per matrix", args.plot)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(text)
    if args.plot:
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _add_sensitivity_parser(sub) -> None:
    p = sub.add_parser("sensitivity", help="KL per (weight matrix, setting) with only that matrix quantized; "
                                           "stored and reused by later studies")
    _data_args(p)
    p.add_argument("--granularity", default="matrix", help="unit measured on its own: matrix, block "
                   "(each layer's attention and MLP) or layer")
    _space_args(p)
    p.add_argument("--storage", default=None, help="SQLAlchemy URL (default sqlite:///turboquant.db)")
    p.add_argument("--top", type=int, default=10, help="print the N most sensitive matrices")
    p.add_argument("--sensitivity-seqs", type=int, default=None,
                   help="measure on the first N evaluation windows only (default: all --eval-seqs)")


def _data_and_space(args: argparse.Namespace):
    """The data options (shared by search and sensitivity) and the allowed bits, groups and formats."""
    from evaluators.context import DataConfig

    data = DataConfig(model=args.model, dataset=args.dataset, seq_len=args.seq_len, n_eval=args.eval_seqs,
                      n_calib=args.calib_seqs, seed=args.seed, trust_remote_code=args.trust_remote_code)
    try:
        bits = tuple(int(b) for b in args.bits.split(","))
        groups = _groups(args.groups)
    except ValueError:
        from evaluators.errors import UserError

        raise UserError("--bits and --groups take comma-separated integers (groups may use 'ch')") from None
    return data, bits, groups, tuple(f.strip() for f in args.formats.split(","))


def _cmd_sensitivity(args: argparse.Namespace) -> int:
    from search.sensitivity import run_sensitivity

    data, bits, groups, formats = _data_and_space(args)
    table = run_sensitivity(data, bits, groups, _storage(args), granularity=args.granularity,
                            windows=args.sensitivity_seqs, formats=formats)
    pairs = table.computed + table.reused
    per = f", {table.seconds / table.computed:.3f} s per pair" if table.computed else ""
    print(f"sensitivity of {args.model}: {len(table.units)} units ({args.granularity}) x {len(table.settings)} settings = {pairs} "
          f"pairs; measured {table.computed} in {table.seconds:.1f} s{per}; reused {table.reused} from {_storage(args)}")
    print("most sensitive at their cheapest setting (KL with only that unit quantized):")
    for name, kl in table.most_sensitive(args.top):
        print(f"  {kl:10.5f}  {name}")
    return 0


def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="HTTP API and web page: launch searches, fronts, exports")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--storage", default=None, help="SQLAlchemy URL (default sqlite:///turboquant.db)")
    p.add_argument("--token", default=None, help="require Authorization: Bearer TOKEN (or set TURBOQUANT_TOKEN)")
    p.add_argument("--ray-address", default=None, help="run searches on this Ray cluster (default: local Ray)")


def _cmd_serve(args: argparse.Namespace) -> int:
    from search.service import serve

    serve(args.host, args.port, _storage(args), args.token, args.ray_address)
    return 0


def _storage(args: argparse.Namespace) -> str:
    from studies import DEFAULT_STORAGE

    return args.storage or DEFAULT_STORAGE


def _cmd_search(args: argparse.Namespace) -> int:
    from search.budget import parse_budget
    from search.driver import SearchConfig, run_search

    data, bits, groups, formats = _data_and_space(args)
    study = args.study or f"{args.model.replace('/', '_')}-{args.budget}"
    cfg = SearchConfig(study=study, data=data, budget=args.budget, trials=args.trials, sampler=args.sampler,
                       workers=args.workers, storage=_storage(args), bits=bits, groups=groups, formats=formats,
                       ray_address=args.ray_address,
                       memory_limit=None if args.memory_limit is None else parse_budget(args.memory_limit, 8),
                       sensitivity=args.sensitivity, granularity=args.granularity,
                       multi_fidelity=args.multi_fidelity, sensitivity_seqs=args.sensitivity_seqs)
    summary = run_search(cfg)
    print(f"study {study}: {summary['complete']} complete trials ({summary['ran']} run now, "
          f"{summary['failed']} failed, {summary['pruned']} pruned after the first batch) in {summary['seconds']:.0f} s; "
          f"sampler {summary['sampler_seconds']:.1f} s of it")
    return _print_front(cfg.storage, study, "table")


def _print_front(storage: str, study: str, mode: str) -> int:
    from studies import Store

    store = Store(storage)
    row = store.get_study(study)
    front = store.front(row)
    if mode == "json":
        print(json.dumps(front.to_dict(orient="records"), indent=2))
    elif mode == "csv":
        sys.stdout.write(front.to_csv(index=False))
    else:
        print(f"front of {study} (budget {row.budget_bytes:,} bytes = {row.budget_bpw:.2f} bpw, model {row.model})")
        print(front.to_string(index=False, float_format=lambda v: f"{v:.4f}") if not front.empty else "(no feasible trial yet)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from search.budget import parse_budget
    from studies import Store, export_policy

    store = Store(_storage(args))
    budget = None
    if args.budget is not None:
        budget = parse_budget(args.budget, store.get_study(args.study).numel)
    doc = export_policy(store, args.study, trial=args.trial, budget_bytes=budget)
    if getattr(args, "format", "json") != "json":
        return _write_runtime_export(doc, args.format, args.out)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
    m = doc["metrics"]
    print(f"wrote {args.out}: trial {doc['provenance']['trial']}, {m['bytes']:,} bytes ({m['bpw']:.3f} bpw), "
          f"KL {m['kl']:.5f}, ppl {m['ppl']:.3f}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import quant
    from evaluators import Evaluator, UserError
    from evaluators.context import DataConfig

    if Path(args.policy).is_dir():
        return _cmd_eval_checkpoint(args)
    policy = quant.Policy.load(args.policy)
    provenance = policy.meta.get("provenance")
    if not isinstance(provenance, dict) or "model" not in provenance:
        raise UserError(f"policy {args.policy} has no provenance (model and data); export it with turboquant export")
    data = DataConfig.from_dict(provenance)
    loaded, tokens = data.load()
    if provenance.get("data_fingerprint") not in (None, tokens.fingerprint):
        raise UserError("the evaluation tokens differ from those the policy was measured on (corpus changed?)")
    evaluator = Evaluator(loaded, tokens)
    try:
        result = evaluator.evaluate(policy)
    except quant.PolicyError as exc:
        raise UserError(f"policy {args.policy} does not fit model {data.model}: {exc}") from None
    metrics = {k: result[k] for k in ("kl", "ppl", "top1", "logit_err", "bytes", "bpw")}
    _print_metrics(metrics, policy.meta.get("metrics", {}), args.json)
    return 0


def _print_metrics(metrics: dict, stored: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(metrics, indent=2))
        return
    for k, v in metrics.items():
        extra = f"   (stored {stored[k]:.6g})" if isinstance(stored.get(k), (int, float)) else ""
        print(f"{k:>10} {v:.6g}{extra}")


def _plot_front(storage: str, study: str, path: str) -> None:
    from evaluators.errors import UserError
    from search.plots import write_front_plot
    from studies import Store

    store = Store(storage)
    row = store.get_study(study)
    try:
        out = write_front_plot(store.front(row), f"{study}: front within {row.budget_bpw:.2f} bpw", path)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(f"wrote {out}", file=sys.stderr)  # stderr: keeps --json / --csv output clean


def _write_runtime_export(doc: dict, fmt: str, out: str) -> int:
    from evaluators.errors import UserError
    from studies.export_runtimes import export_runtime

    try:
        result = export_runtime(doc, fmt)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    with open(out, "w") as f:
        f.write(result.text)
    m = doc["metrics"]
    print(f"wrote {out} ({fmt}): trial {doc['provenance']['trial']}, measured {m['bpw']:.3f} bpw, KL {m['kl']:.5f} "
          f"in TurboQuant; {len(result.approximations)} approximation(s) for {fmt}:")
    for line in result.approximations:
        print(f"  ~ {line}")
    return 0


def _cmd_eval_checkpoint(args: argparse.Namespace) -> int:
    from evaluators.checkpoint import evaluate_checkpoint

    result, ckpt = evaluate_checkpoint(args.policy)
    metrics = {k: result[k] for k in ("kl", "ppl", "top1", "logit_err", "bytes", "bpw")}
    _print_metrics(metrics, ckpt.policy.meta.get("metrics", {}), args.json)
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    import quant
    from evaluators import UserError, calibration_hessians, load_model
    from evaluators.context import DataConfig

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a file; the checkpoint is a folder (give a new or existing folder)")
    policy = quant.Policy.load(args.policy)
    provenance = policy.meta.get("provenance")
    model_name = provenance.get("model") if isinstance(provenance, dict) else policy.meta.get("model")
    if not model_name:
        raise UserError(f"policy {args.policy} names no model; export it with turboquant export")
    hessians = {}
    if quant.needs_hessians(policy.settings.values()):  # gptq: the calibration windows the search used
        if not isinstance(provenance, dict):
            raise UserError(f"policy {args.policy} uses gptq but has no provenance naming its calibration data")
        loaded, tokens = DataConfig.from_dict(provenance).load()
        hessians = calibration_hessians(loaded.model, tokens, quant.weight_matrices(loaded.model))
    else:
        loaded = load_model(model_name, trust_remote_code=bool((provenance or {}).get("trust_remote_code")))
    try:
        packed = quant.apply_policy(loaded.model, policy,
                                    quantizer=lambda n, w, s: quant.quantize_calibrated(n, w, s, hessians))
    except quant.PolicyError as exc:
        raise UserError(f"policy {args.policy} does not fit model {model_name}: {exc}") from None
    out = quant.save_checkpoint(loaded.model, policy, args.out)
    nbytes = sum(p.nbytes for p in packed.values())
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out}: {len(packed)} packed matrices, {nbytes:,} packed bytes; {size:,} bytes on disk "
          f"with float tensors and metadata")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    from evaluators.errors import UserError
    from quant import PolicyError
    from studies import StoreError

    try:
        if args.command == "search":
            return _cmd_search(args)
        if args.command == "studies":
            from studies import Store

            frame = Store(_storage(args)).studies_frame()
            print(frame.to_string(index=False) if not frame.empty else "no studies yet")
            return 0
        if args.command == "front":
            if args.plot:
                _plot_front(_storage(args), args.study, args.plot)
            return _print_front(_storage(args), args.study, "json" if args.json else "csv" if args.csv else "table")
        if args.command == "export":
            return _cmd_export(args)
        if args.command == "eval":
            return _cmd_eval(args)
        if args.command == "apply":
            return _cmd_apply(args)
        if args.command == "serve":
            return _cmd_serve(args)
        if args.command == "sensitivity":
            return _cmd_sensitivity(args)
        if args.command == "show":
            return _cmd_show(args)
    except (UserError, PolicyError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output path that cannot be written (missing folder, a file in the way)
        print(f"error: {exc.strerror or exc}: {exc.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished trials are saved — run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
