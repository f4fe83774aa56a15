"""Load on the HTTP service: many concurrent clients reading a 1,000-trial front while a real search writes.

Everything runs on loopback and stops by itself (bounded in time and requests):
1. a SQLite study of ``--trials`` synthetic trials is written through the store (random
   bytes/KL pairs: the front query's cost depends on the row count, not the values);
2. ``turboquant serve`` starts on a free loopback port;
3. a real ``turboquant search`` on the tiny model writes to the same database meanwhile;
4. ``--clients`` threads read ``/studies/big/front`` for ``--seconds``.
Prints requests per second, p50 / p99 latency and errors. Goal (issue 6): no errors, p99 < 200 ms.

    python benchmarks/service_load.py [--clients 16] [--seconds 20] [--trials 1000]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from studies import Store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seed_study(store: Store, n: int) -> None:
    study = store.create_study(name="big", model="tiny-random-llama", dataset="synthetic", budget_bytes=60_000,
                               numel=100_000, sampler="nsga2", space={}, provenance={"synthetic": True})
    rng = random.Random(0)
    for number in range(n):
        nbytes = rng.randint(20_000, 70_000)
        store.record_trial(study, number, state="complete", policy={"format_version": 1, "matrices": {}},
                           bytes=nbytes, bpw=8 * nbytes / 100_000, kl=rng.random() * 100_000 / nbytes,
                           ppl=10.0, top1=0.5, logit_err=0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--trials", type=int, default=1000)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="tq-load-"))
    storage = f"sqlite:///{root}/load.db"
    store = Store(storage)
    t0 = time.perf_counter()
    _seed_study(store, args.trials)
    print(f"seeded study 'big' with {args.trials} trials in {time.perf_counter() - t0:.1f} s")
    corpus = root / "corpus.txt"
    corpus.write_text(" ".join(random.Random(1).choice(["to", "be", "or", "not", "that", "is"]) for _ in range(40000)))

    t0 = time.perf_counter()
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    server = subprocess.Popen([sys.executable, "-m", "search.cli", "serve", "--port", str(port), "--storage", storage],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    writer = subprocess.Popen([sys.executable, "-m", "search.cli", "search", "--model", "tiny-random-llama",
                               "--dataset", str(corpus), "--seq-len", "64", "--eval-seqs", "4", "--budget", "4.5bpw",
                               "--workers", "1", "--trials", "100000", "--storage", storage, "--study", "writer"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"{base}/studies/big/front", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("the service did not come up within 180 s")
                time.sleep(0.2)
        print(f"service up after {time.perf_counter() - t0:.1f} s")
        # Measure only while the search is really writing trials.
        while store.find_study("writer") is None or store.trials_frame(store.get_study("writer")).empty:
            if time.time() > deadline + 120 or writer.poll() is not None:
                raise SystemExit("the writing search did not start")
            time.sleep(0.5)
        print(f"search writing after {time.perf_counter() - t0:.1f} s")
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        stop_at = time.perf_counter() + args.seconds

        def client() -> None:
            with httpx.Client(base_url=base, timeout=10) as c:
                while time.perf_counter() < stop_at:
                    t = time.perf_counter()
                    try:
                        r = c.get("/studies/big/front")
                        ok = r.status_code == 200 and isinstance(r.json(), list)
                        err = None if ok else f"HTTP {r.status_code}"
                    except httpx.HTTPError as exc:
                        err = type(exc).__name__
                    with lock:
                        latencies.append(time.perf_counter() - t)
                        if err:
                            errors.append(err)

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        load_before = os.getloadavg()
        start = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        elapsed = time.perf_counter() - start
        load_after = os.getloadavg()
        wrote = int((store.trials_frame(store.get_study("writer"))["state"] == "complete").sum())
    finally:
        for p in (writer, server):
            p.terminate()
            p.wait(timeout=30)
    lat = sorted(latencies)
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    print(f"{'clients':>8} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'trials written':>15}")
    print(f"{args.clients:>8} {len(lat):>9} {len(lat) / elapsed:>8.1f} {1000 * statistics.median(lat):>8.1f} "
          f"{1000 * p99:>8.1f} {len(errors):>7} {wrote:>15}")
    if errors:
        print("errors:", sorted(set(errors)))
    # The machine is shared: say how busy it was (1/5/15-minute load averages, on os.cpu_count() cores).
    print(f"load average before {' '.join(f'{v:.2f}' for v in load_before)}, after "
          f"{' '.join(f'{v:.2f}' for v in load_after)} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
