"""Bad input at every boundary gets a named error, never a traceback of another type."""

from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluators import UserError, load_corpus, load_model
from quant import Policy, PolicyError
from search.budget import parse_budget

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20)
settings_like = st.fixed_dictionaries({}, optional={
    "format": st.sampled_from(["rtn", "turbo", "nope", 3]), "bits": json_values | st.integers(0, 10),
    "group_size": st.sampled_from([None, 32, 48, 64, 0, -1, "64"]), "options": json_values})
policies = st.fixed_dictionaries({}, optional={
    "format_version": st.sampled_from([1, 2, None, "1"]),
    "matrices": st.dictionaries(st.text(max_size=20), settings_like | json_values, max_size=4) | json_values})


@settings(max_examples=300, deadline=None)
@given(doc=policies | json_values)
def test_any_json_is_a_policy_or_a_policy_error(doc) -> None:
    try:
        policy = Policy.from_dict(doc)
    except PolicyError as exc:
        assert str(exc)
        return
    # What was accepted survives a round trip unchanged.
    assert Policy.from_dict(json.loads(json.dumps(policy.to_dict()))).settings == policy.settings


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=12) | st.from_regex(r"[0-9.]{1,5}\s?(bpw|MB|MiB|kb|gb|b|bitz)?", fullmatch=True))
def test_any_budget_is_bytes_or_a_user_error(text: str) -> None:
    try:
        value = parse_budget(text, 1000)
    except UserError as exc:
        assert "malformed budget" in str(exc)
        return
    assert isinstance(value, int) and value >= 0


def test_budget_units() -> None:
    assert parse_budget("3.0bpw", 8000) == 3000
    assert parse_budget("70MB", 1) == 70_000_000
    assert parse_budget("1MiB", 1) == 1 << 20


def test_corrupt_model_folder_and_missing_tokenizer(tmp_path) -> None:
    model = load_model("tiny-random-llama").model
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    with pytest.raises(UserError, match="has no usable tokenizer"):
        load_model(str(folder))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        load_model(str(tmp_path / "empty"))
    (folder / "config.json").write_text("{ this is not json")
    with pytest.raises(UserError, match="cannot"):
        load_model(str(folder))


def test_remote_code_models_need_the_flag(tmp_path) -> None:
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "my_custom_llm", "auto_map": {"AutoConfig": "configuration_x.XConfig",
                                                    "AutoModelForCausalLM": "modeling_x.XModel"}}))
    with pytest.raises(UserError, match="--trust-remote-code"):
        load_model(str(folder))
    # Own code for the model class only (a known config type): still refused, naming the flag.
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "auto_map": {"AutoModelForCausalLM": "modeling_x.XModel"}}))
    with pytest.raises(UserError, match="runs its own code.*--trust-remote-code"):
        load_model(str(folder))


def test_empty_and_unreadable_datasets(tmp_path) -> None:
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="is empty"):
        load_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(UserError, match="cannot read dataset"):
        load_corpus(str(tmp_path / "bin.txt"))


# The CLI end to end: each bad input exits 2 with one "error:" line naming the problem, and writes nothing.

def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a hash of its content; SQLite files by their logical content."""
    out = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name.endswith(("-wal", "-shm", "-journal")):
            continue
        if path.suffix == ".db":
            with sqlite3.connect(path) as con:
                data = "\n".join(con.iterdump()).encode()
        else:
            data = path.read_bytes()
        out[str(path.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


def _run_cli(argv: list[str], capsys) -> tuple[int, str]:
    from search.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, corpus):
    """Inputs for the CLI cases: model folders, datasets, policies, a study to export from."""
    import quant
    from studies import Store

    root = tmp_path_factory.mktemp("cli")
    model = load_model("tiny-random-llama").model
    model.save_pretrained(root / "no-tokenizer")
    model.save_pretrained(root / "corrupt")
    (root / "corrupt" / "config.json").write_text("{ this is not json")
    (root / "remote").mkdir()
    (root / "remote" / "config.json").write_text(json.dumps({
        "model_type": "my_custom_llm", "auto_map": {"AutoConfig": "configuration_x.XConfig",
                                                    "AutoModelForCausalLM": "modeling_x.XModel"}}))
    (root / "empty.txt").write_text(" \n\n")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 64)
    (root / "a-file").write_text("in the way")
    names = list(quant.weight_matrices(model))
    good = {"format_version": 1, "provenance": {"model": "tiny-random-llama", "dataset": corpus},
            "matrices": {n: {"format": "rtn", "bits": 4, "group_size": 32} for n in names}}
    first = names[0]
    policies = {
        "malformed": "{\"format_version\": 1, \"matrices\": {",
        "other-model": {**good, "matrices": {"transformer.h.0.attn.c_attn": {"format": "rtn", "bits": 4,
                                                                             "group_size": 32}}},
        "unsupported": {**good, "matrices": {**good["matrices"], first: {"format": "rtn", "bits": 12,
                                                                         "group_size": 32}}},
        "unknown-format": {**good, "matrices": {**good["matrices"], first: {"format": "fp4x", "bits": 4,
                                                                            "group_size": 32}}},
        "traversal": {**good, "matrices": {**good["matrices"], "../../escaped": {"format": "rtn", "bits": 4,
                                                                                 "group_size": 32}}},
        "good": good,
    }
    for name, doc in policies.items():
        (root / f"{name}.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    store = Store(f"sqlite:///{root / 'studies.db'}")
    study = store.create_study(name="s", model="tiny-random-llama", dataset=corpus, budget_bytes=10**6,
                               numel=10**6, sampler="nsga2", space={}, provenance={"model": "tiny-random-llama"})
    store.record_trial(study, 0, state="complete", policy=good, bytes=5000, bpw=4.0, kl=0.1, ppl=2.0, top1=0.5,
                       logit_err=0.1)
    return root


SEARCH = ["search", "--model", "tiny-random-llama", "--seq-len", "32", "--eval-seqs", "2", "--calib-seqs", "1",
          "--trials", "1", "--workers", "1", "--budget", "4bpw", "--study", "x"]
CASES = {  # name: (argv with {root} and {corpus}, what the message must say)
    "unknown model": (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    "corrupt model folder": (["--model", "{root}/corrupt"], "config.json' is not a valid JSON file"),
    "tokenizer missing": (["--model", "{root}/no-tokenizer"], "has no usable tokenizer"),
    "remote code without the flag": (["--model", "{root}/remote"], "--trust-remote-code"),
    "dataset missing": (["--dataset", "{root}/nope.txt"], "nope.txt not found"),
    "dataset empty": (["--dataset", "{root}/empty.txt"], "is empty"),
    "dataset unreadable": (["--dataset", "{root}/binary.txt"], "cannot read dataset"),
    "budget malformed": (["--budget", "3bitz"], "malformed budget '3bitz'"),
    "budget absurd": (["--budget", "9" * 60], "the number is too large"),
    "budget impossible": (["--budget", "0.1bpw"], "below the smallest allowed policy"),
    "unknown sampler": (["--sampler", "annealing"], "unknown sampler 'annealing'"),
    "unknown granularity": (["--granularity", "row"], "unknown granularity 'row'"),
    "unsupported bits": (["--bits", "3,99"], "supports bits 2..8, got 99"),
    "unsupported group size": (["--groups", "32,48"], "supports group_size 32, 64, 128, 256"),
    "bits not integers": (["--bits", "four"], "comma-separated integers"),
}
OTHER = {
    "sensitivity granularity": (["sensitivity", "--model", "tiny-random-llama", "--granularity", "row",
                                 "--storage", "sqlite:///{root}/sens.db"], "unknown granularity 'row'"),
    "export format unknown": (["export", "s", "--trial", "0", "--format", "onnx", "--out", "{root}/p.txt",
                               "--storage", "sqlite:///{root}/studies.db"], "invalid choice: 'onnx'"),
    "export into a missing folder": (["export", "s", "--trial", "0", "--out", "{root}/missing/p.json",
                                      "--storage", "sqlite:///{root}/studies.db"], "No such file or directory"),
    "export unknown trial": (["export", "s", "--trial", "7", "--out", "{root}/p.json",
                              "--storage", "sqlite:///{root}/studies.db"], "no complete trial 7"),
    "policy malformed": (["apply", "{root}/malformed.json", "--out", "{root}/ckpt"], "is not valid JSON"),
    "policy from another model": (["apply", "{root}/other-model.json", "--out", "{root}/ckpt"],
                                  "does not match the model"),
    "policy unsupported setting": (["apply", "{root}/unsupported.json", "--out", "{root}/ckpt"],
                                   "supports bits 2..8, got 12"),
    "policy unknown format": (["apply", "{root}/unknown-format.json", "--out", "{root}/ckpt"],
                              "unknown format 'fp4x'"),
    "policy names a path outside": (["apply", "{root}/traversal.json", "--out", "{root}/ckpt"],
                                    "not in the model (e.g. '../../escaped')"),
    "checkpoint onto a file": (["apply", "{root}/good.json", "--out", "{root}/a-file"], "is a file"),
    "eval policy from another model": (["eval", "{root}/other-model.json"], "does not match the model"),
}


@pytest.mark.parametrize("case", list(CASES) + list(OTHER))
def test_cli_bad_input_exits_2_naming_the_problem_and_writes_nothing(case, workdir, corpus, capsys) -> None:
    if case in CASES:
        argv = SEARCH + ["--dataset", corpus, "--storage", "sqlite:///{root}/search.db"] + CASES[case][0]
        expected = CASES[case][1]
    else:
        argv, expected = OTHER[case]
    argv = [a.format(root=workdir, corpus=corpus) for a in argv]
    before = _tree(workdir)
    code, err = _run_cli(argv, capsys)
    assert code == 2, err
    assert expected in err and "Traceback" not in err
    assert err.splitlines()[-1].startswith(("error:", "turboquant")), err  # one line naming the problem
    assert _tree(workdir) == before  # no database, checkpoint or export appeared, none changed


def test_checkpoint_writes_only_inside_its_folder(workdir, capsys) -> None:
    before = set(_tree(workdir))
    code, err = _run_cli(["apply", str(workdir / "good.json"), "--out", str(workdir / "ckpt-ok")], capsys)
    assert code == 0, err
    added = set(_tree(workdir)) - before
    assert added == {"ckpt-ok/packed.safetensors", "ckpt-ok/turboquant.json"}


def test_group_size_that_does_not_divide_is_padded_and_counted() -> None:
    import torch

    import quant

    # 576 = 4.5 groups of 128: the last group is padded to a whole one, and its scale and codes are paid for.
    w = torch.randn(8, 576, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(w, (0, 64))
    setting = {"format": "rtn", "bits": 4, "group_size": 128}
    packed, whole = quant.quantize(w, setting), quant.quantize(padded, setting)
    assert packed.nbytes == whole.nbytes == sum(b.numel() * b.element_size() for b in packed.buffers.values())
    assert packed.nbytes > quant.quantize(w[:, :512], setting).nbytes * 576 / 512
    d = packed.dequantize()
    assert d.shape == w.shape and float((w - d).pow(2).mean() / w.var()) < 0.02


def test_cli_flags_and_api_fields_are_the_request_fields() -> None:
    """One schema: ``turboquant search``'s flags and ``POST /studies``' fields are SearchRequest's fields,
    with its defaults; comma lists and switches map onto its types."""
    from search.cli import _parser
    from search.cli_args import request_from_args
    from search.request import SearchRequest
    from search.service import StudyRequest

    parser = _parser()
    search = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["search"]
    flags = {a.dest for a in search._actions} - {"help", "storage", "ray_address"}  # how to run it, not what
    assert flags == set(SearchRequest.model_fields) == set(StudyRequest.model_fields)
    args = parser.parse_args(["search", "--budget", "3bpw"])
    assert request_from_args(SearchRequest, args) == SearchRequest(budget="3bpw")
    args = parser.parse_args(["search", "--budget", "3bpw", "--bits", "2,4", "--groups", "32,ch", "--formats",
                              "rtn, gptq+clip", "--no-multi-fidelity", "--sensitivity", "--seed", "3"])
    req = request_from_args(SearchRequest, args)
    assert (req.bits, req.groups, req.formats) == ([2, 4], [32, None], ["rtn", "gptq+clip"])
    assert (req.multi_fidelity, req.sensitivity, req.seed, req.trials) == (False, True, 3, 20)
    assert req.study_name == "smollm2-135m-3bpw"
    with pytest.raises(UserError, match="--trials: input should be greater than or equal to 1, got 0"):
        request_from_args(SearchRequest, parser.parse_args(["search", "--budget", "3bpw", "--trials", "0"]))
