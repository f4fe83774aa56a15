"""A search launched through `turboquant serve` on a Ray cluster started by the test, storing into PostgreSQL.

Everything is a real process on loopback: a Ray head and a worker node (`ray start`), PostgreSQL
(tests/pg.py), the service (`turboquant serve --storage ... --ray-address ...`) and the CLI that
reads the same database. The cluster has one CPU per node and the search two workers, so the
two trial workers can only run one on each node.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path
import sys

import pytest

from studies import Store
from tests.serving import RayCluster, ServiceProcess, fresh_database

TOKEN = "cluster-token"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cluster():
    ray_cluster = RayCluster(workers=1, cpus=1)
    try:
        ray_cluster.start()
        yield ray_cluster
    finally:
        ray_cluster.stop()


@pytest.fixture(scope="module")
def service(cluster, postgres, tmp_path_factory, corpus):
    storage = fresh_database(postgres.url, "tq_cluster")
    svc = ServiceProcess(storage, token=TOKEN, ray_address=cluster.address, log_dir=tmp_path_factory.mktemp("svc"),
                         options=("--data-dir", str(Path(corpus).parent)))
    try:
        svc.wait_ready()
        yield svc, storage
    finally:
        svc.stop()


def _cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_search_through_the_service_on_a_ray_cluster_and_postgres(cluster, service, corpus, tmp_path) -> None:
    svc, storage = service
    assert cluster.alive_nodes() == 2  # the head and the worker node joined one cluster
    client = svc.client()
    body = {"study": "cluster", "model": "tiny-random-llama", "budget": "5bpw", "trials": 6, "workers": 2,
            "sampler": "nsga2", "dataset": Path(corpus).name, "seq_len": 64, "eval_seqs": 4, "calib_seqs": 4,
            "bits": [2, 3, 4, 8], "groups": [32, None]}
    r = client.post("/studies", json=body)
    assert r.status_code == 202, r.text
    progress = svc.wait_study(client, "cluster")
    assert progress["status"] == "done", progress
    assert progress["complete"] == 6 and progress["failed"] == 0

    # The trials ran in Ray workers of this cluster, on both of its nodes (one CPU each, two workers).
    trials = Store(storage).trials_frame(Store(storage).get_study("cluster"))
    pids = {int(w.rsplit(":", 1)[1]) for w in trials["worker"]}
    assert len(pids) == 2, trials["worker"].tolist()
    on_head, on_worker = pids & cluster.worker_log_pids(0), pids & cluster.worker_log_pids(1)
    assert len(on_head) == 1 and len(on_worker) == 1, (pids, cluster.worker_log_pids(0), cluster.worker_log_pids(1))

    # The front endpoint shows exactly the points of `turboquant front --json` on the same database.
    expected = json.loads(_cli("front", "cluster", "--storage", storage, "--json"))
    assert expected, "the study has no feasible point"
    assert client.get("/studies/cluster/front").json() == expected
    rows = list(csv.DictReader(io.StringIO(client.get("/studies/cluster/front.csv").text)))
    assert [int(r["trial"]) for r in rows] == [p["trial"] for p in expected]
    assert [int(r["bytes"]) for r in rows] == [p["bytes"] for p in expected]
    assert [float(r["kl"]) for r in rows] == [p["kl"] for p in expected]
    png = client.get("/studies/cluster/front.png")
    assert png.headers["content-type"] == "image/png" and png.content[:8] == PNG

    # Export through the API gives the same document as `turboquant export` from the CLI.
    trial = expected[-1]["trial"]
    _cli("export", "cluster", "--storage", storage, "--trial", str(trial), "--out", str(tmp_path / "p.json"))
    doc = client.post("/studies/cluster/export", json={"trial": trial}).json()
    assert doc == json.loads((tmp_path / "p.json").read_text())
    assert doc["metrics"]["kl"] == expected[-1]["kl"] and doc["metrics"]["bytes"] == expected[-1]["bytes"]
    gptq = client.post("/studies/cluster/export", json={"trial": trial, "format": "gptqmodel"}).json()
    assert gptq["trial"] == trial and "dynamic" in json.loads(gptq["text"])
    client.close()
