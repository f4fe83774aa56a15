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
    from app.cli import main

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
    provenance = good["provenance"]
    policies.update({  # provenances a hand (or an attacker) wrote: each read as input, none trusted
        "remote-code": {**good, "provenance": {**provenance, "trust_remote_code": True}},
        "remote-code-string": {**good, "provenance": {**provenance, "trust_remote_code": "yes"}},
        "nan-seq-len": {**good, "provenance": {**provenance, "seq_len": float("nan")}},
        "string-seed": {**good, "provenance": {**provenance, "seed": "0"}},
        "huge-seed": {**good, "provenance": {**provenance, "seed": 2**70}},
        "bool-n-eval": {**good, "provenance": {**provenance, "n_eval": True}},
        "model-list": {**good, "provenance": {**provenance, "model": ["tiny-random-llama"]}},
        "nested": "[" * 100_000 + "]" * 100_000,
        "nested-object": '{"format_version": 1, "matrices": ' + '{"a": ' * 50_000 + "1" + "}" * 50_001,
        "empty": "",
        "array": "[1, 2, 3]",
        "null": "null",
        "no-matrices": {"format_version": 1, "provenance": provenance},
        "future-version": {**good, "format_version": 99},
        "bits-as-string": {**good, "matrices": {**good["matrices"], first: {"format": "rtn", "bits": "4",
                                                                            "group_size": 32}}},
        "inf-bits": '{"format_version": 1, "matrices": {"' + first + '": {"format": "rtn", "bits": Infinity}}}',
    })
    for name, doc in policies.items():
        (root / f"{name}.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    (root / "binary.json").write_bytes(bytes(range(256)) * 8)
    with open(root / "huge.json", "wb") as f:  # sparse: past the size a policy may have, costs no disk
        f.truncate(65 << 20)
    (root / "a-folder.json").mkdir()
    _checkpoints(root, corpus)
    store = Store(f"sqlite:///{root / 'studies.db'}")
    study = store.create_study(name="s", model="tiny-random-llama", dataset=corpus, budget_bytes=10**6,
                               numel=10**6, sampler="nsga2", space={}, provenance={"model": "tiny-random-llama"})
    store.record_trial(study, 0, state="complete", policy=good, bytes=5000, bpw=4.0, kl=0.1, ppl=2.0, top1=0.5,
                       logit_err=0.1)
    remote = store.create_study(name="remote", model="tiny-random-llama", dataset=corpus, budget_bytes=10**6,
                                numel=10**6, sampler="nsga2", space={},
                                provenance={"model": "tiny-random-llama", "trust_remote_code": True})
    store.record_trial(remote, 0, state="complete", policy=good, bytes=5000, bpw=4.0, kl=0.1, ppl=2.0, top1=0.5,
                       logit_err=0.1)
    return root


def _checkpoints(root: Path, corpus: str) -> None:
    """A good checkpoint of the tiny model, and copies of it damaged the ways a crash or a hand damages one."""
    import shutil

    import quant
    from quant.checkpoint import META_FILE, TENSORS_FILE

    loaded = load_model("tiny-random-llama")
    policy = Policy.from_dict(json.loads((root / "good.json").read_text()))
    quant.apply_policy(loaded.model, policy)
    base = quant.save_checkpoint(loaded.model, policy, root / "ckpt-base")

    def copy(name: str) -> Path:
        return Path(shutil.copytree(base, root / name))

    def edit_meta(folder: Path, change) -> None:
        meta = json.loads((folder / META_FILE).read_text())
        change(meta)
        (folder / META_FILE).write_text(json.dumps(meta))

    size = (base / TENSORS_FILE).stat().st_size
    with open(copy("ckpt-truncated") / TENSORS_FILE, "r+b") as f:  # a crash half-way through the tensors
        f.truncate(size // 2)
    old = copy("ckpt-truncated-old")  # the same, written before the config recorded the tensors' hash
    with open(old / TENSORS_FILE, "r+b") as f:
        f.truncate(size // 2)
    edit_meta(old, lambda m: m.pop("tensors", None))
    with open(copy("ckpt-other-tensors") / TENSORS_FILE, "r+b") as f:  # same size, other bytes
        f.seek(size - 1)
        last = f.read(1)
        f.seek(size - 1)
        f.write(bytes([last[0] ^ 0xFF]))
    (copy("ckpt-config-nested") / META_FILE).write_text("[" * 100_000 + "]" * 100_000)
    (copy("ckpt-config-list") / META_FILE).write_text("[]")
    (copy("ckpt-config-binary") / META_FILE).write_bytes(bytes(range(256)))
    edit_meta(copy("ckpt-remote-code"), lambda m: m["policy"]["provenance"].update(trust_remote_code=True))
    edit_meta(copy("ckpt-nan-seq-len"), lambda m: m["policy"]["provenance"].update(seq_len=float("nan")))
    edit_meta(copy("ckpt-bad-shape"), lambda m: next(iter(m["matrices"].values())).update(shape=[-1, 2**70]))
    edit_meta(copy("ckpt-unknown-arch"), lambda m: m["config"].update(model_type="no_such_arch"))
    (root / "ckpt-empty").mkdir()


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
    # Lists are bounded, counted before any entry is parsed (issue 22, item 4).
    "bits list too long": (["--bits", ",".join(["4"] * 65)], "--bits takes at most 64 comma-separated values"),
    "bits list of millions": (["--bits", ",".join(["4"] * 8_000_000)], "got 8000000"),
    "groups list too long": (["--groups", ",".join(["32"] * 100)], "--groups takes at most 64"),
    "formats list too long": (["--formats", ",".join(["rtn"] * 65)], "--formats takes at most 64"),
    "kv bits list too long": (["--kv-bits", ",".join(["4"] * 65)], "--kv-bits takes at most 64"),
    "kv formats list too long": (["--kv-formats", ",".join(["turbo"] * 65)], "--kv-formats takes at most 64"),
    "bits empty": (["--bits", ""], "--bits takes comma-separated integers, got ''"),
    "bits garbage quoted short": (["--bits", "x" * 5000], "(5002 characters)"),
    "groups typo for per channel": (["--groups", "chan"], "(or 'ch' for per output channel)"),
    "formats unknown": (["--formats", "magic"], "unknown format 'magic'"),
    "formats empty name": (["--formats", ""], "unknown format ''"),
    # The seed (item 8): numpy takes 0 <= seed < 2**32; beyond, a traceback in the background.
    "seed too large": (["--seed", str(2**70)], "--seed: input should be less than 4294967296"),
    "seed negative": (["--seed=-1"], "--seed: input should be greater than or equal to 0"),
    "seed not a number": (["--seed", "0x10"], "invalid int value: '0x10'"),
    # Study names (item 11): one line, a URL-safe alphabet, at most 128 characters.
    "study with a newline": (["--study", "a\nb"], "study name 'a\\nb': use letters, digits"),
    "study with an ANSI escape": (["--study", "\x1b[31mred"], "study name '\\x1b[31mred'"),
    "study with a slash": (["--study", "a/b"], "study name 'a/b'"),
    "study climbing up": (["--study", "../etc"], "study name '../etc'"),
    "study too long": (["--study", "x" * 129], "(129 characters)"),
    "study hidden": (["--study", ".hidden"], "starting with a letter or digit"),
    "study unicode": (["--study", "étude"], "study name 'étude'"),
    "study empty": (["--study", ""], "study name ''"),
    # Numbers far out of range, and what the newcomer mixes up.
    "trials zero": (["--trials", "0"], "--trials: input should be greater than or equal to 1, got 0"),
    "trials absurd": (["--trials", str(10**30)], "--trials: input should be less than or equal to 1000000"),
    "workers negative": (["--workers=-3"], "--workers: input should be greater than or equal to 1, got -3"),
    "seq-len one": (["--seq-len", "1"], "--seq-len: input should be greater than or equal to 2"),
    "seq-len absurd": (["--seq-len", str(10**12)], "--seq-len: input should be less than or equal to 1048576"),
    "eval-seqs absurd": (["--eval-seqs", str(10**30)], "--eval-seqs: input should be less than or equal to"),
    "calib-seqs negative": (["--calib-seqs=-1"], "--calib-seqs: input should be greater than or equal to 0"),
    "reference-topk negative": (["--reference-topk=-1"], "--reference-topk: input should be greater than or"),
    "context zero": (["--context", "0", "--budget", "1MB"], "--context: input should be greater than or equal"),
    "context with a bpw budget": (["--context", "256"], "with --context the budget covers the weights"),
    "batch zero": (["--batch", "0"], "--batch: input should be greater than or equal to 1"),
    "budget negative": (["--budget=-1bpw"], "malformed budget '-1bpw'"),
    "budget NaN": (["--budget", "nanbpw"], "malformed budget 'nanbpw'"),
    "budget infinite": (["--budget", "infMB"], "malformed budget 'infMB'"),
    "memory limit malformed": (["--memory-limit", "lots"], "malformed budget 'lots'"),
    "dtype unknown": (["--dtype", "float8"], "invalid choice: 'float8'"),
    "sensitivity method unknown": (["--sensitivity-method", "guess"], "unknown sensitivity method 'guess'"),
    "sampler empty": (["--sampler", ""], "unknown sampler ''"),
    "dataset is a folder": (["--dataset", "{root}"], "Is a directory"),
    "model is a file": (["--model", "{root}/a-file"], "is a file; pass the model folder"),
    # Storage URLs: a password never printed (item 6).
    "storage URL unknown with a password": (["--storage", "notadb://u:hunter2@x/db"],
                                            "cannot use storage URL 'notadb://u:***@x/db'"),
    "storage URL unparsable with a password": (["--storage", "postgresql+psycopg://u:hunter2@:::/db"],
                                               "cannot use storage URL 'postgresql+psycopg://u:***@:::/db'"),
    "storage server refusing, with a password": (["--storage", "postgresql+psycopg://u:hunter2@127.0.0.1:1/db"],
                                                 "cannot open storage postgresql+psycopg://u:***@127.0.0.1:1/db"),
    "storage in a missing folder": (["--storage", "sqlite:///{root}/missing/dir/s.db"], "cannot open storage"),
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
    # Remote code only from the command line's flag, never from a file (issue 22, item 2).
    "eval policy asking for remote code": (["eval", "{root}/remote-code.json"],
                                           "runs its own code; a file cannot allow that: read the model's code, "
                                           "then pass --trust-remote-code"),
    "apply policy asking for remote code": (["apply", "{root}/remote-code.json", "--out", "{root}/ckpt"],
                                            "then pass --trust-remote-code"),
    "eval checkpoint asking for remote code": (["eval", "{root}/ckpt-remote-code"], "then pass --trust-remote-code"),
    "export gguf of a study asking for remote code": (["export", "remote", "--trial", "0", "--format", "gguf",
                                                       "--nearest", "--out", "{root}/m.gguf", "--storage",
                                                       "sqlite:///{root}/studies.db"], "pass --trust-remote-code"),
    "provenance remote code as a string": (["eval", "{root}/remote-code-string.json"],
                                           "trust_remote_code must be true or false, got 'yes'"),
    # Provenance numbers a hand wrote (item 8).
    "provenance NaN seq_len": (["eval", "{root}/nan-seq-len.json"],
                               "nan-seq-len.json: bad provenance: seq_len must be an integer in [2, 1048576], got nan"),
    "provenance string seed": (["eval", "{root}/string-seed.json"], "bad provenance: seed must be an integer"),
    "provenance huge seed": (["eval", "{root}/huge-seed.json"], "seed must be an integer in [0, 4294967295]"),
    "provenance boolean n_eval": (["eval", "{root}/bool-n-eval.json"], "bad provenance: n_eval must be an integer"),
    "provenance model a list": (["apply", "{root}/model-list.json", "--out", "{root}/ckpt"],
                                "bad provenance: model must be a string"),
    "checkpoint NaN seq_len": (["eval", "{root}/ckpt-nan-seq-len"], "bad provenance: seq_len must be an integer"),
    # Files that are no policy.
    "eval deeply nested JSON": (["eval", "{root}/nested.json"], "is nested too deeply to be a policy"),
    "show deeply nested JSON": (["show", "{root}/nested.json"], "is nested too deeply to be a policy"),
    "show deeply nested object": (["show", "{root}/nested-object.json"], "is nested too deeply"),
    "show binary file": (["show", "{root}/binary.json"], "is not a text file (not UTF-8)"),
    "show empty file": (["show", "{root}/empty.json"], "is empty; export one with turboquant export"),
    "show a folder": (["show", "{root}/a-folder.json"], "is a folder; give the JSON file"),
    "show missing file": (["show", "{root}/nope.json"], "cannot read policy"),
    "show a device": (["show", "/dev/zero"], "/dev/zero is not a regular file"),
    "show a huge file": (["show", "{root}/huge.json"], "a policy is JSON of at most 64 MB"),
    "show a JSON array": (["show", "{root}/array.json"], "a policy must be a JSON object"),
    "show JSON null": (["show", "{root}/null.json"], "a policy must be a JSON object"),
    "show policy without matrices": (["show", "{root}/no-matrices.json"], "policy has no 'matrices'"),
    "show future policy version": (["show", "{root}/future-version.json"], "unsupported policy format_version 99"),
    "show bits as a string": (["show", "{root}/bits-as-string.json"], "'4'"),
    "show infinite bits": (["show", "{root}/inf-bits.json"], "inf"),
    "apply a binary file": (["apply", "{root}/binary.json", "--out", "{root}/ckpt"], "is not a text file"),
    # Checkpoints cut short, mixed up or edited (items 8 and 9).
    "eval truncated checkpoint": (["eval", "{root}/ckpt-truncated"], "(half-written or from another checkpoint)"),
    "eval truncated checkpoint without a hash": (["eval", "{root}/ckpt-truncated-old"],
                                                 "packed.safetensors cannot be read"),
    "eval checkpoint with other tensors": (["eval", "{root}/ckpt-other-tensors"],
                                           "does not match the sha256 its config records"),
    "eval checkpoint config nested": (["eval", "{root}/ckpt-config-nested"], "nested too deeply"),
    "eval checkpoint config a list": (["eval", "{root}/ckpt-config-list"], "is not a checkpoint config"),
    "eval checkpoint config binary": (["eval", "{root}/ckpt-config-binary"], "is not valid JSON"),
    "eval checkpoint bad shape": (["eval", "{root}/ckpt-bad-shape"], "has shape [-1, 1180591620717411303424]"),
    "eval checkpoint unknown architecture": (["eval", "{root}/ckpt-unknown-arch"], "cannot be built"),
    "eval empty folder": (["eval", "{root}/ckpt-empty"], "is not a TurboQuant checkpoint"),
    "eval seq-len without a dataset": (["eval", "{root}/good.json", "--seq-len", "64"], "--dataset FILE"),
    # Read-only commands never create a database (item 10), and name what is missing.
    "studies on a missing SQLite file": (["studies", "--storage", "sqlite:///{root}/none.db"],
                                         "none.db does not exist"),
    "front on a missing SQLite file": (["front", "s", "--storage", "sqlite:///{root}/none.db"], "does not exist"),
    "front plot on a missing SQLite file": (["front", "s", "--plot", "{root}/f.png", "--storage",
                                             "sqlite:///{root}/none.db"], "does not exist"),
    "export from a missing SQLite file": (["export", "s", "--trial", "0", "--out", "{root}/p.json", "--storage",
                                           "sqlite:///{root}/none.db"], "does not exist"),
    "studies on a folder": (["studies", "--storage", "sqlite:///{root}"], "is a folder, not a database file"),
    # Unknown studies: the CLI helps with the known names, never with a password.
    "front of an unknown study": (["front", "nope", "--storage", "sqlite:///{root}/studies.db"],
                                  "no study named 'nope' in sqlite:///"),
    "studies on a server refusing, with a password": (["studies", "--storage",
                                                       "postgresql+psycopg://u:hunter2@127.0.0.1:1/db"],
                                                      "postgresql+psycopg://u:***@127.0.0.1:1/db"),
    "studies on an unknown dialect with a password": (["studies", "--storage", "nodb+x://admin:hunter2@h/db"],
                                                      "'nodb+x://admin:***@h/db'"),
    # Outputs that cannot be written.
    "export onto a folder": (["export", "s", "--trial", "0", "--out", "{root}/ckpt-empty", "--storage",
                              "sqlite:///{root}/studies.db"], "is a folder; give the file to write"),
    "export under a file": (["export", "s", "--trial", "0", "--out", "{root}/a-file/p.json", "--storage",
                             "sqlite:///{root}/studies.db"], "Not a directory"),
    "export budget malformed": (["export", "s", "--budget", "lots", "--out", "{root}/p.json", "--storage",
                                 "sqlite:///{root}/studies.db"], "malformed budget 'lots'"),
    "export refine trials negative": (["export", "s", "--budget", "1MB", "--refine-trials=-1", "--out",
                                       "{root}/p.json", "--storage", "sqlite:///{root}/studies.db"],
                                      "--refine-trials must be 0 or more"),
    "export neither trial nor budget": (["export", "s", "--out", "{root}/p.json"],
                                        "one of the arguments --trial --budget is required"),
    "apply under a file": (["apply", "{root}/good.json", "--out", "{root}/a-file/ckpt"], "a-file/ckpt"),
    "sensitivity seed too large": (["sensitivity", "--model", "tiny-random-llama", "--seed", str(2**40),
                                    "--storage", "sqlite:///{root}/sens.db"], "--seed: input should be less than"),
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
    assert expected in err and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith(("error:", "turboquant")), err  # one line naming the problem
    assert "hunter2" not in err  # a storage URL's password is never printed
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
    from app.cli import _parser
    from app.cli_args import request_from_args
    from search.request import SearchRequest
    from app.service import StudyRequest

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


def test_remote_code_is_allowed_by_the_flag_only(workdir, capsys) -> None:
    """A policy whose provenance asks for remote code is refused without --trust-remote-code (a case above)
    and measured with it: the person at the command line decides, never the file."""
    code, err = _run_cli(["eval", str(workdir / "remote-code.json"), "--trust-remote-code", "--json"], capsys)
    assert code == 0, err


def test_repeated_list_entries_count_once_and_a_list_of_millions_is_refused_at_once(capsys) -> None:
    import time

    from app.cli import _parser
    from app.cli_args import request_from_args
    from search.request import SearchRequest

    parser = _parser()

    def request(*argv: str) -> SearchRequest:
        return request_from_args(SearchRequest, parser.parse_args(["search", "--budget", "3bpw", *argv]))

    assert request("--bits", "4,4").bits == request("--bits", "4").bits == [4]
    assert request("--bits", "4,2,4,3,2").bits == [4, 2, 3]  # first order kept
    assert request("--groups", "ch,64,channel,64").groups == [None, 64]
    assert request("--formats", "rtn,rtn").formats == ["rtn"]
    assert request("--formats", "gguf,q4_k").formats == request("--formats", "gguf").formats
    assert SearchRequest(budget="1MB", kv_bits=[4, 4, 2], kv_formats=["turbo", "turbo"]).kv_bits == [4, 2]
    from pydantic import ValidationError

    many = [4] * 8_000_000
    start = time.perf_counter()
    with pytest.raises(ValidationError) as refused:
        SearchRequest(budget="3bpw", bits=many)
    assert time.perf_counter() - start < 0.1  # refused by its length, before any entry is looked at
    assert refused.value.errors()[0]["type"] == "too_long" and refused.value.errors()[0]["loc"] == ("bits",)


def test_a_derived_study_name_is_a_valid_name() -> None:
    from search.request import STUDY_NAME, SearchRequest

    assert SearchRequest(budget="3bpw").study_name == "smollm2-135m-3bpw"  # unchanged where it was valid
    for model, budget in [("/tmp/models/My Model", "3bpw"), ("org/name", "70 MB"), ("./m", "1MB"),
                          ("x" * 300, "3bpw")]:
        name = SearchRequest(budget=budget).model_copy(update={"model": model}).study_name
        assert STUDY_NAME.match(name), name
    assert SearchRequest(budget="70 MB").study_name == "smollm2-135m-70_MB"


def test_export_onto_a_symlink_replaces_the_link_not_its_target(workdir, tmp_path, capsys) -> None:
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me")
    link = tmp_path / "p.json"
    link.symlink_to(target)
    code, err = _run_cli(["export", "s", "--trial", "0", "--out", str(link), "--storage",
                          f"sqlite:///{workdir / 'studies.db'}"], capsys)
    assert code == 0, err
    assert target.read_text() == "keep me" and not link.is_symlink()
    assert json.loads(link.read_text())["provenance"]["trial"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.txt", "p.json"]  # no temporary left


def test_a_model_replaced_in_its_folder_is_converted_again(tmp_path) -> None:
    """The converted GGUF cache is keyed by the folder's files (name, size, mtime), not its path alone."""
    import os

    from evaluators.llamacpp import converted_key

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"a" * 100)
    first = converted_key(folder)
    assert converted_key(folder) == first  # stable while nothing changes
    (folder / "model.safetensors").write_bytes(b"b" * 101)  # downloaded again: other weights
    assert converted_key(folder) != first
    second = converted_key(folder)
    info = (folder / "model.safetensors").stat()
    os.utime(folder / "model.safetensors", ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000))  # same size
    assert converted_key(folder) != second
