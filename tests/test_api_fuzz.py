"""Hypothesis fuzz of the HTTP API's write routes against a real uvicorn server on loopback.

Every malformed ``POST /studies`` or ``POST /studies/{s}/export`` payload must get a 4xx
with a reason (never a 500), launch nothing and write nothing to the store.
"""

from __future__ import annotations

import hashlib
import re
import socket
import sqlite3
import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search.budget import parse_budget
from studies import Store

# A launchable request, but one that would fail fast (tiny model, missing corpus) if a defect slipped through.
VALID = {"study": "fz", "budget": "4bpw", "model": "tiny-random-llama", "dataset": "/nonexistent/corpus.txt",
         "trials": 1, "workers": 1}
FIELDS = {"study", "model", "budget", "trials", "workers", "sampler", "dataset", "seq_len", "eval_seqs",
          "calib_seqs", "seed", "bits", "groups", "formats", "trust_remote_code"}
# What the README documents as a budget: a number and an optional unit.
BUDGET = re.compile(r"\s*[0-9]*\.?[0-9]+\s*(bpw|b|kb|mb|gb|kib|mib|gib)?\s*", re.IGNORECASE)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)
not_a_string = st.none() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.lists(json_values, max_size=3) \
    | st.dictionaries(st.text(max_size=5), json_values, max_size=3)
# Values no integer field accepts (pydantic's lax mode takes "5", 5.0 and true as integers).
not_an_int = st.none() | st.text(alphabet="abcxyz-", min_size=1, max_size=6) | st.lists(json_values, max_size=3) \
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != int(f)) | st.just({})
bad_budget = (st.sampled_from(["3bitz", "", "bpw", "-1bpw", "1e5", "3 bits", "9" * 400, "NaN", "inf", "4bpw4", "0x10"])
              | st.text(max_size=12).filter(lambda t: not BUDGET.fullmatch(t)) | not_a_string)
bad_study = (st.sampled_from(["", " ", "../etc", "a/b", "-lead", ".hidden", "x" * 129, "sp ace", "é"])
             | st.text(max_size=10).map(lambda t: "/" + t) | not_a_string)
# Unsupported settings (bits outside 2..8, group sizes the formats do not offer) weigh most.
bad_bits = st.one_of(*[st.lists(st.integers(2, 8), max_size=3).flatmap(
    lambda ok: st.sampled_from([0, 1, 9, 16, 99, -4]).map(lambda b: ok + [b]))] * 3,
    st.just([]), not_an_int.map(lambda v: [v]), st.text(max_size=5), st.just({}))
bad_groups = st.one_of(*[st.lists(st.sampled_from([32, 64, None]), max_size=3).flatmap(
    lambda ok: st.sampled_from([0, -32, 48, 100, 7]).map(lambda g: ok + [g]))] * 3,
    st.just([]), st.text(max_size=5), st.just({}))
# Lists with a format that does not exist, an option it lacks, or no format at all.
bad_formats = st.one_of(
    st.lists(st.sampled_from(["rtn", "gptq", "gptq+clip", "turbo"]), max_size=2).flatmap(
        lambda ok: st.sampled_from(["magic", "", "rtn+bogus", "gptq+", "RTN", "+clip"]).map(lambda f: ok + [f])),
    st.just([]), st.text(max_size=5), not_an_int.map(lambda v: [v]))
# Names that are no alias, no folder here and not of a hub id's form (org/name).
bad_model = st.text(alphabet="abcxyz-_.", min_size=1, max_size=12).filter(
    lambda t: t not in ("smollm2-135m", "tiny-random-llama") and not Path(t).exists())

DEFECTS = {
    "study": bad_study, "budget": bad_budget, "model": bad_model | not_a_string, "dataset": not_a_string,
    "trials": st.integers(max_value=0) | st.integers(min_value=1_000_001) | not_an_int,
    "workers": st.integers(max_value=0) | st.integers(min_value=4097)
    | not_an_int.filter(lambda v: v is not None),  # null: chosen by the search
    "seq_len": st.integers(max_value=1) | st.integers(min_value=(1 << 20) + 1) | not_an_int,
    "eval_seqs": st.integers(max_value=0) | not_an_int, "calib_seqs": st.integers(max_value=-1) | not_an_int,
    "seed": not_an_int, "sampler": st.text(max_size=10).filter(lambda s: s not in ("nsga2", "tpe", "random", "gp", "evo"))
    | not_a_string, "bits": bad_bits, "groups": bad_groups, "formats": bad_formats,
    "trust_remote_code": st.sampled_from(["maybe", "2", [], {}, 0.5]),
}


@st.composite
def malformed_study_requests(draw) -> dict:
    """A valid request with one to three defects: a bad value, a missing required key or an unknown key."""
    body = dict(VALID)
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):  # mostly one defect alone: none hides another
        kind = draw(st.sampled_from(["value"] * 8 + ["missing", "unknown"]))
        if kind == "value":
            key = draw(st.sampled_from(sorted(DEFECTS)))
            body[key] = draw(DEFECTS[key])
        elif kind == "missing":
            body.pop(draw(st.sampled_from(["study", "budget"])), None)
        else:
            body[draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in FIELDS))] = draw(json_values)
    return body


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _snapshot(path: str) -> str:
    with sqlite3.connect(path) as con:
        return hashlib.sha256("\n".join(con.iterdump()).encode()).hexdigest()


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """A real server on loopback over a SQLite store holding one study of 40 synthetic trials."""
    import uvicorn

    from app.service import create_app

    path = str(tmp_path_factory.mktemp("fuzz") / "f.db")
    store = Store(f"sqlite:///{path}")
    study = store.create_study(name="big", model="tiny-random-llama", dataset="synthetic", budget_bytes=60_000,
                               numel=100_000, sampler="nsga2", space={}, provenance={"model": "tiny-random-llama"})
    for n in range(40):
        nbytes = 20_000 + 1_000 * n
        store.record_trial(study, n, state="complete", bytes=nbytes, bpw=8 * nbytes / 100_000, kl=1.0 / (n + 1),
                           ppl=3.0, top1=0.5, logit_err=0.1, policy={"format_version": 1, "matrices": {
                               "model.layers.0.mlp.down_proj": {"format": "rtn", "bits": 4, "group_size": 64}}})
    store.record_trial(study, 40, state="failed", policy={}, error="boom")
    app = create_app(f"sqlite:///{path}")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    client = httpx.Client(base_url=f"http://127.0.0.1:{server.config.port}", timeout=30)
    before = _snapshot(path)
    yield client, app, store, path
    client.close()
    server.should_exit = True
    thread.join(10)
    # Across every example of every test: no search launched, not a byte of the store changed.
    assert app.state.service.jobs == {}
    assert _snapshot(path) == before


def _assert_refused(r: httpx.Response) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    detail = r.json()["detail"]
    assert detail and str(detail).strip()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=malformed_study_requests())
def test_malformed_study_requests_are_refused_with_a_reason(api, body) -> None:
    client, app, _, _ = api
    launched = len(app.state.service.jobs)
    r = client.post("/studies", json=body)
    _assert_refused(r)
    assert len(app.state.service.jobs) == launched, f"launched a search for {body!r}"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=json_values.filter(lambda v: not (isinstance(v, dict) and "budget" in v))
       | st.binary(max_size=40).map(lambda b: b"\x00" + b))
def test_any_other_body_is_refused(api, body) -> None:
    client, app, _, _ = api
    launched = len(app.state.service.jobs)
    if isinstance(body, bytes):
        r = client.post("/studies", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/studies", json=body)
    _assert_refused(r)
    assert len(app.state.service.jobs) == launched


export_bodies = st.fixed_dictionaries({}, optional={
    "trial": st.integers(-5, 45) | st.integers(min_value=2**31) | st.integers(max_value=-2**63) | not_an_int,
    "budget": st.sampled_from(["3bpw", "4.8bpw", "60KB", "0", "25000", "3bitz", "9" * 400, ""]) | bad_budget,
    "format": st.sampled_from(["json", "gptqmodel", "llamacpp", "torchao", "onnx", "", "JSON"]) | not_a_string,
    "out": st.sampled_from(["/tmp/evil.json", "../../evil.json", "policy.json"]),
}) | json_values


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(study=st.sampled_from(["big", "big", "big", "nope"]) | st.text(min_size=1, max_size=12), body=export_bodies)
def test_export_answers_a_policy_or_a_4xx_never_a_500(api, study, body) -> None:
    client, _, store, _ = api
    r = client.post(f"/studies/{quote(study, safe='')}/export", json=body)
    if r.status_code != 200:
        _assert_refused(r)
        return
    # Accepted: it must have been a well-formed request for an existing study and a front point (a JSON null
    # is an option left out).
    assert study == "big" and isinstance(body, dict)
    body = {k: v for k, v in body.items() if v is not None}
    assert ("trial" in body) != ("budget" in body) and set(body) <= {"trial", "budget", "format"}
    doc = r.json()
    trial = doc["trial"] if "format" in doc else doc["provenance"]["trial"]
    row = store.trial(store.get_study("big"), trial)
    assert row is not None and row.state == "complete"
    if "trial" in body:
        assert trial == body["trial"]
    else:
        limit = parse_budget(body["budget"], 100_000)
        front = store.front(store.get_study("big"), limit)
        assert trial == int(front.iloc[-1]["trial"])  # the best point within the budget


# Named hostile requests (issue 22): each a 4xx whose answer names the problem, nothing launched or written.
# The body is a launchable request (the embedded corpus, so that no other field's refusal hides the one tested)
# with the changes given.
NAMED = {  # name: (method, path, JSON changes to the body / raw bytes / None, status, what the answer says)
    "study with a newline": ("post", "/studies", {"study": "a\nb"}, 422, "study name"),
    "study with a trailing newline": ("post", "/studies", {"study": "fz\n"}, 422, "study name"),
    "study with an ANSI escape": ("post", "/studies", {"study": "\x1b[31mred"}, 422, "study name"),
    "study with a slash": ("post", "/studies", {"study": "a/b"}, 422, "study name"),
    "study too long": ("post", "/studies", {"study": "x" * 129}, 422, "at most 128 characters"),
    "study unicode": ("post", "/studies", {"study": "étude"}, 422, "study name"),
    "bits list too long": ("post", "/studies", {"bits": [4] * 65}, 422, "at most 64 items"),
    "groups list too long": ("post", "/studies", {"groups": [32] * 65}, 422, "at most 64 items"),
    "formats list too long": ("post", "/studies", {"formats": ["rtn"] * 65}, 422, "at most 64 items"),
    "kv bits list too long": ("post", "/studies", {"kv_bits": [4] * 65}, 422, "at most 64 items"),
    "kv formats list too long": ("post", "/studies", {"kv_formats": ["turbo"] * 65}, 422, "at most 64 items"),
    "seed too large": ("post", "/studies", {"seed": 2**70}, 422, "less than 4294967296"),
    "seed negative": ("post", "/studies", {"seed": -1}, 422, "greater than or equal to 0"),
    "seed a huge float": ("post", "/studies", {"seed": 1e300}, 422, "integer"),
    "seed a string": ("post", "/studies", {"seed": "one"}, 422, "valid integer"),
    "eval seqs absurd": ("post", "/studies", {"eval_seqs": 10**30}, 422, "less than or equal to 1048576"),
    "calib seqs absurd": ("post", "/studies", {"calib_seqs": 10**9}, 422, "less than or equal to 1048576"),
    "reference topk absurd": ("post", "/studies", {"reference_topk": 10**12}, 422, "less than or equal to"),
    "sensitivity seqs zero": ("post", "/studies", {"sensitivity_seqs": 0}, 422, "greater than or equal to 1"),
    "context with a bpw budget": ("post", "/studies", {"context": 256}, 422, "with --context the budget covers"),
    "misspelled field": ("post", "/studies", {"stdy": "x"}, 422, "Extra inputs are not permitted"),
    "budget missing": ("post", "/studies", {"budget": None}, 422, "budget"),
    "model a path": ("post", "/studies", {"model": "../../etc/passwd"}, 422, "model"),
    "body not JSON": ("post", "/studies", b"study=fz&budget=4bpw", 422, "JSON"),
    "body nested 100000 deep": ("post", "/studies", b"[" * 100_000 + b"]" * 100_000, 400, "parsing the body"),
    "body a JSON array": ("post", "/studies", b"[1, 2]", 422, "object"),
    "body empty": ("post", "/studies", b"", 422, "required"),
    # An unknown study: the answer names it and nothing else (no storage URL, no list of the other studies).
    "progress of an unknown study": ("get", "/studies/nope", None, 404, "no study named 'nope'"),
    "front of an unknown study": ("get", "/studies/nope/front", None, 404, "no study named 'nope'"),
    "front csv of an unknown study": ("get", "/studies/nope/front.csv", None, 404, "no study named 'nope'"),
    "front png of an unknown study": ("get", "/studies/nope/front.png", None, 404, "no study named 'nope'"),
    "export of an unknown study": ("post", "/studies/nope/export", {"trial": 0}, 404, "no study named 'nope'"),
    "export trial past 64 bits": ("post", "/studies/big/export", {"trial": 2**70}, 422, "less than or equal to"),
    "export trial negative": ("post", "/studies/big/export", {"trial": -1}, 422, "greater than or equal to 0"),
    "export trial and budget": ("post", "/studies/big/export", {"trial": 1, "budget": "3bpw"}, 422, "exactly one"),
    "export budget NaN": ("post", "/studies/big/export", {"budget": "nanbpw"}, 422, "malformed budget"),
    "export format unknown": ("post", "/studies/big/export", {"trial": 1, "format": "onnx"}, 422, "onnx"),
    "export as a folder": ("post", "/studies/big/export", {"trial": 1, "format": "checkpoint"}, 422, "checkpoint"),
    "export refine trials absurd": ("post", "/studies/big/export", {"budget": "3bpw", "refine_trials": 10**9}, 422,
                                    "less than or equal to 1000"),
    "export of a failed trial": ("post", "/studies/big/export", {"trial": 40}, 404, "no complete trial 40"),
}
# JSON's NaN and Infinity (Python's json reads them): refused, but FastAPI's 422 echoes the input, which JSON
# cannot encode, so the answer is a 500 until the service's validation handler drops or stringifies it.
NON_FINITE = {
    "seed NaN": b'{"study": "fz", "budget": "4bpw", "seed": NaN}',
    "seq_len Infinity": b'{"study": "fz", "budget": "4bpw", "seq_len": Infinity}',
}
API_BODY = {**VALID, "dataset": "shakespeare"}


def _named(client, method: str, path: str, changes) -> httpx.Response:
    if isinstance(changes, bytes):
        return client.request(method, path, content=changes, headers={"content-type": "application/json"})
    if changes is None:
        return client.request(method, path)
    body = {k: v for k, v in {**(API_BODY if path == "/studies" else {}), **changes}.items() if v is not None}
    return client.request(method, path, json=body)


@pytest.mark.parametrize("case", list(NAMED))
def test_named_hostile_requests_are_refused_with_a_reason(api, case) -> None:
    client, app, _, path = api
    method, url, changes, status, expected = NAMED[case]
    launched = len(app.state.service.jobs)
    started = time.perf_counter()
    r = _named(client, method, url, changes)
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert expected in r.text, r.text[:500]
    assert time.perf_counter() - started < 5
    assert len(app.state.service.jobs) == launched
    # Nothing about where or what else is stored (issue 22, item 6).
    assert Path(path).name not in r.text and "sqlite" not in r.text and "known studies" not in r.text


def test_a_list_of_a_quarter_million_entries_is_refused_without_work_per_entry(api) -> None:
    client, app, _, _ = api
    started = time.perf_counter()
    r = client.post("/studies", json={**API_BODY, "bits": [4] * 250_000})  # 750 kB: under the body limit
    assert r.status_code == 422 and "at most 64 items" in r.text[:2000]
    assert time.perf_counter() - started < 10  # JSON parsing and the answer; validation itself is microseconds
    assert app.state.service.jobs == {}


@pytest.mark.parametrize("case", list(NON_FINITE))
def test_non_finite_numbers_are_refused_with_a_reason(api, case) -> None:
    client, app, _, _ = api
    r = client.post("/studies", content=NON_FINITE[case], headers={"content-type": "application/json"})
    assert r.status_code == 422 and "finite" in r.text
    assert app.state.service.jobs == {}
