"""The HTTP service against a real uvicorn server on loopback and SQLite: launch, progress, fronts, export."""

from __future__ import annotations

import csv
import io
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from app.service import ServiceLimits
from studies import Store, export_policy

TOKEN = "s3cret-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def offered(tmp_path_factory, corpus) -> ServiceLimits:
    """The folders the service offers: the test corpus's, and one holding a corrupt model folder."""
    models = tmp_path_factory.mktemp("models")
    (models / "corrupt").mkdir()
    (models / "corrupt" / "config.json").write_text("{not json")
    return ServiceLimits(data_dir=Path(corpus).parent, models_dir=models)


@pytest.fixture(scope="module")
def server(tmp_path_factory, local_ray, offered):
    import uvicorn

    from app.service import create_app

    storage = f"sqlite:///{tmp_path_factory.mktemp('svc') / 's.db'}"
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(storage, token=TOKEN, limits=offered), host="127.0.0.1",
                                        port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"},
                          timeout=60)
    yield client, storage, port
    client.close()
    srv.should_exit = True
    thread.join(10)


def _wait(client: httpx.Client, study: str, timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = client.get(f"/studies/{study}")
        assert r.status_code == 200, r.text
        body = r.json()
        if body["status"] not in ("running", "queued"):
            return body
        time.sleep(0.5)
    raise AssertionError(f"study {study} still running after {timeout} s")


@pytest.fixture(scope="module")
def searched(server, corpus):
    client, storage, _ = server
    body = {"study": "api", "model": "tiny-random-llama", "budget": "5bpw", "trials": 6, "workers": 1,
            "sampler": "nsga2", "dataset": Path(corpus).name, "seq_len": 64, "eval_seqs": 4, "calib_seqs": 4,
            "bits": [2, 3, 4, 8], "groups": [32, None], "granularity": "layer"}
    r = client.post("/studies", json=body)
    assert r.status_code == 202, r.text
    bad = client.post("/studies", json={**body, "study": "broken", "model": "corrupt"})
    assert bad.status_code == 202  # a model folder is found to be corrupt only once the search loads it
    progress = _wait(client, "api")
    assert progress["status"] == "done", progress
    return client, storage


def test_search_through_the_api_completes_and_reports_progress(searched) -> None:
    client, storage = searched
    p = client.get("/studies/api").json()
    assert p["complete"] == 6 and p["failed"] == 0 and p["running"] == 0
    assert p["best_kl"] is not None and p["best_kl"] >= 0 and p["elapsed_s"] > 0 and p["trials_per_min"] > 0
    names = {s["study"] for s in client.get("/studies").json()}
    assert {"api", "broken"} <= names
    row = Store(storage).get_study("api")
    assert row.space["granularity"] == "layer"  # the request's search options reach the driver
    layers = {}
    for point in client.get("/studies/api/front").json():
        doc = client.post("/studies/api/export", json={"trial": point["trial"]}).json()
        for name, setting in doc["matrices"].items():
            if ".layers." in name:  # every matrix of a layer shares its setting
                layers.setdefault((point["trial"], name.split(".mlp.")[0].split(".self_attn.")[0]), set()).add(
                    # the setting itself: an entry also records its matrix's shape and runtime mapping
                    json.dumps({k: setting.get(k) for k in ("format", "bits", "group_size", "options")},
                               sort_keys=True))
    assert layers and all(len(s) == 1 for s in layers.values())


def test_a_failed_search_is_recorded_and_the_service_survives(searched) -> None:
    client, _ = searched
    p = _wait(client, "broken", 60)
    assert p["status"] == "failed" and "config.json' is not a valid JSON file" in p["error"]
    assert client.get("/studies/api").status_code == 200


def test_front_endpoints_show_the_same_points_as_the_store(searched) -> None:
    client, storage = searched
    store = Store(storage)
    expected = store.front(store.get_study("api"))
    points = client.get("/studies/api/front").json()
    assert [p["trial"] for p in points] == list(expected["trial"])
    assert [p["bytes"] for p in points] == list(expected["bytes"])
    assert [p["kl"] for p in points] == pytest.approx(list(expected["kl"]), rel=0, abs=0)
    rows = list(csv.DictReader(io.StringIO(client.get("/studies/api/front.csv").text)))
    assert [int(r["trial"]) for r in rows] == list(expected["trial"])
    png = client.get("/studies/api/front.png")
    assert png.headers["content-type"] == "image/png" and png.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_returns_the_policy_document(searched) -> None:
    client, storage = searched
    store = Store(storage)
    trial = int(store.front(store.get_study("api")).iloc[0]["trial"])
    doc = client.post("/studies/api/export", json={"trial": trial}).json()
    assert doc == export_policy(store, "api", trial=trial)
    by_budget = client.post("/studies/api/export", json={"budget": "5bpw"}).json()
    assert by_budget["metrics"]["bpw"] <= 5.0
    llama = client.post("/studies/api/export", json={"trial": trial, "format": "llamacpp"}).json()
    assert "blk.0.attn_q.weight=" in llama["text"] and isinstance(llama["approximations"], list)
    # A GGUF file: rtn is refused naming the matrices; with nearest the tiny model has no GGUF to take its
    # metadata from (tests/test_llamacpp.py exports the embedded model's through the CLI).
    refused = client.post("/studies/api/export", json={"trial": trial, "format": "gguf"})
    assert refused.status_code == 422 and "llama.cpp cannot run" in refused.json()["detail"]
    no_source = client.post("/studies/api/export", json={"trial": trial, "format": "gguf", "nearest": True})
    assert no_source.status_code == 422 and "Hugging Face model folder" in no_source.json()["detail"]


def test_every_exporter_writes_the_same_through_the_command_line_and_the_api(searched, tmp_path, capsys) -> None:
    """Both front ends go through one registry (search.exporters): each format's file from ``turboquant
    export`` is what ``POST /studies/{s}/export`` answers, byte for byte; a new exporter needs its case here."""
    from app.cli import main
    from search.exporters import EXPORTERS

    client, storage = searched
    store = Store(storage)
    trial = int(store.front(store.get_study("api")).iloc[0]["trial"])
    for name in EXPORTERS:
        out = tmp_path / name
        code = main(["export", "api", "--storage", storage, "--trial", str(trial), "--format", name, "--out", str(out)])
        answer = client.post("/studies/api/export", json={"trial": trial, "format": name})
        if name == "json":
            assert code == 0 and answer.json() == json.loads(out.read_text())
        elif name in ("gptqmodel", "llamacpp", "torchao"):
            assert code == 0 and answer.json()["text"] == out.read_text()
        elif name == "checkpoint":  # a folder: the command line's only
            assert code == 0 and (out / "turboquant.json").is_file()
            assert answer.status_code == 422 and "checkpoint" in answer.text
        elif name == "gguf":  # an rtn study: refused by both, for the same reason (tests/test_llamacpp.py: a file)
            assert code == 2 and "llama.cpp cannot run" in capsys.readouterr().err
            assert answer.status_code == 422 and "llama.cpp cannot run" in answer.json()["detail"]
        elif name == "compressed-tensors":  # a folder: the command line's only; an rtn study (asymmetric: an
            # fp16 offset per group) is refused before anything is written (tests/test_compressed_tensors.py)
            assert code == 2 and "compressed-tensors cannot hold" in capsys.readouterr().err and not out.exists()
            assert answer.status_code == 422 and name in answer.text
        else:
            pytest.fail(f"no check for exporter {name!r}: add its case")


def test_auth_is_required_when_a_token_is_set(server) -> None:
    _, _, port = server
    base = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{base}/studies").status_code == 401
    assert httpx.get(f"{base}/studies", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(f"{base}/studies", json={}).status_code == 401
    page = httpx.get(f"{base}/")  # the page holds no data; it calls the API with the token
    assert page.status_code == 200 and "plotly" in page.text
    assert httpx.get(f"{base}/static/plotly.min.js").status_code == 200


@pytest.mark.parametrize("method, path, body, status, reason", [
    ("get", "/studies/nope", None, 404, "no study named 'nope'"),
    ("get", "/studies/nope/front", None, 404, "no study named 'nope'"),
    ("post", "/studies", {"study": "x", "budget": "3bpw", "colour": "red"}, 422, "colour"),
    ("post", "/studies", {"study": "x", "budget": "3bitz"}, 422, "malformed budget"),
    ("post", "/studies", {"study": "x", "budget": "3bpw", "model": "nope-model"}, 422, "model 'nope-model' is not offered"),
    ("post", "/studies", {"study": "x", "budget": "3bpw", "sampler": "magic"}, 422, "unknown sampler"),
    ("post", "/studies", {"study": "x", "budget": "3bpw", "granularity": "row"}, 422, "unknown granularity"),
    ("post", "/studies", {"study": "x", "budget": "3bpw", "target": "vllm", "bits": [3]}, 422,
     "--target vllm cannot run: 3-bit weights"),
    ("post", "/studies", {"study": "x", "budget": "3bpw", "target": ["vllm"]}, 422, "target"),
    ("post", "/studies", {"study": "../x", "budget": "3bpw"}, 422, "study name"),
    ("post", "/studies", {"study": "x", "budget": "3bpw", "trials": 0}, 422, "trials"),
    ("post", "/studies", {"study": "x", "budget": "3bpw", "context": 512}, 422, "give it as a size"),
    ("post", "/studies", {"study": "x", "budget": "1MB", "context": 512, "kv_formats": ["zip"]}, 422,
     "unknown KV cache format"),
    # What a token holder may make the server read or run (issue 22: files, remote code, processes).
    ("post", "/studies", {"study": "x", "budget": "3bpw", "dataset": "/etc/passwd"}, 422, "outside the service's"),
    ("post", "/studies", {"study": "x", "budget": "3bpw", "dataset": "nope.txt"}, 422, "not offered by this service"),
    ("post", "/studies", {"study": "x", "budget": "3bpw", "dataset": "../etc/passwd"}, 422, "outside the service's"),
    ("post", "/studies", {"study": "x", "budget": "3bpw", "dataset": "hf:/etc/passwd"}, 422, "not a hub dataset"),
    ("post", "/studies", {"study": "x", "budget": "3bpw", "dataset": "hf:../x"}, 422, "not a hub dataset"),
    ("post", "/studies", {"study": "x", "budget": "3bpw", "model": "/etc"}, 422, "not a path"),
    ("post", "/studies", {"study": "x", "budget": "3bpw", "model": "../models/corrupt"}, 422, "not a path"),
    ("post", "/studies", {"study": "x", "budget": "3bpw", "model": "~/m"}, 422, "not a path"),
    ("post", "/studies", {"study": "x", "budget": "3bpw", "trust_remote_code": True}, 422,
     "does not run a model's own code"),
    ("post", "/studies", {"study": "x", "budget": "3bpw", "workers": 4096}, 422, "cores"),
    ("post", "/studies/nope/cancel", None, 409, "not running in this service"),
    ("post", "/studies/api/cancel", None, 409, "(it is done)"),
    ("post", "/studies/api/export", {"trial": 1, "budget": "3bpw"}, 422, "exactly one"),
    ("post", "/studies/api/export", {"trial": 9999}, 404, "no complete trial 9999"),
    ("post", "/studies/api/export", {"budget": "0.1bpw"}, 422, "below the smallest allowed policy"),
    ("post", "/studies/api/export", {"budget": "0.1bpw", "refine_trials": 0}, 404, "no finished trial within"),
])
def test_bad_requests_get_4xx_with_a_reason(searched, method, path, body, status, reason) -> None:
    client, _ = searched
    r = getattr(client, method)(path, **({"json": body} if body is not None else {}))
    assert r.status_code == status, r.text
    assert reason in r.text


def test_a_kv_study_through_the_api_carries_its_cache_bytes(searched, corpus) -> None:
    client, storage = searched
    body = {"study": "api-kv", "model": "tiny-random-llama", "budget": "200KB", "context": 256, "trials": 4,
            "workers": 1, "dataset": Path(corpus).name, "seq_len": 64, "eval_seqs": 4, "calib_seqs": 4, "bits": [2, 4],
            "groups": [32], "formats": ["rtn"], "kv_bits": [2, 4]}
    assert client.post("/studies", json=body).status_code == 202
    assert _wait(client, "api-kv")["status"] == "done"
    points = client.get("/studies/api-kv/front").json()
    store = Store(storage)
    expected = store.front(store.get_study("api-kv"))
    assert points and [p["kv_bytes"] for p in points] == list(expected["kv_bytes"])
    assert all(0 < p["kv_bytes"] < p["bytes"] <= 200_000 for p in points)
    doc = client.post("/studies/api-kv/export", json={"trial": points[-1]["trial"]}).json()
    assert doc["kv"] and doc["metrics"]["kv_bytes"] == points[-1]["kv_bytes"]


def test_cli_front_plot_writes_png_and_html_of_the_same_points(searched, tmp_path, capsys) -> None:
    import json as _json

    from app.cli import main

    _, storage = searched
    capsys.readouterr()
    assert main(["front", "api", "--storage", storage, "--json", "--plot", str(tmp_path / "f.png")]) == 0
    points = _json.loads(capsys.readouterr().out)  # --plot leaves stdout to the JSON
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["front", "api", "--storage", storage, "--plot", str(tmp_path / "f.html")]) == 0
    html = (tmp_path / "f.html").read_text()
    assert "plotly" in html.lower()
    for p in points:
        assert f"trial {p['trial']}\\u003cbr" in html or f"trial {p['trial']}<br>" in html
    capsys.readouterr()
    assert main(["front", "api", "--storage", storage, "--plot", str(tmp_path / "f.gif")]) == 2
    assert "use a .png or .html" in capsys.readouterr().err
