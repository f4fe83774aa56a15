"""Shared fixtures: the tiny random model, a small corpus, a local Ray, a fresh cache."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

WORDS = ("the king queen lord lady good sir my thy thou art not what shall love death night day "
         "come go speak hear say well now here there this that with for and but if o sweet noble").split()


@pytest.fixture(scope="session", autouse=True)
def _no_ray_auth() -> None:
    # A private local Ray on loopback; its token auth would write into ~/.ray.
    os.environ["RAY_AUTH_MODE"] = "disabled"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A seeded pseudo-English text file of ~60k bytes (byte tokens for the tiny model)."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
             for _ in range(2500)]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n".join(lines))
    return str(path)


@pytest.fixture(scope="session")
def data_config(corpus: str):
    from evaluators.context import DataConfig

    return DataConfig(model="tiny-random-llama", dataset=corpus, seq_len=64, n_eval=4, n_calib=4, seed=0)


@pytest.fixture(scope="session")
def evaluator(data_config):
    from evaluators import Evaluator

    loaded, tokens = data_config.load()
    return Evaluator(loaded, tokens)


@pytest.fixture(scope="session")
def gptq_study(tmp_path_factory, data_config, local_ray) -> tuple[str, str]:
    """(storage, name) of a finished 8-trial search of the tiny model with gptq in its space, for the tests
    that export, apply and re-measure its points (none of them adds trials)."""
    from search.driver import SearchConfig, run_search
    from search.request import SearchRequest

    storage = f"sqlite:///{tmp_path_factory.mktemp('gptqdb') / 'g.db'}"
    request = SearchRequest.from_data(data_config, study="gq", budget="5bpw", trials=8, workers=1, bits=[2, 3, 4, 8],
                                      groups=[32, None], formats=["rtn", "gptq+clip"])
    run_search(SearchConfig(request, storage=storage, progress=False))
    return storage, "gq"


@pytest.fixture(scope="session")
def local_ray():
    import ray

    from search.workers import init_ray

    init_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def postgres():
    """A running PostgreSQL on loopback (installed from Debian's packages if missing)."""
    from tests.pg import PostgresServer

    server = PostgresServer()
    server.start()
    yield server
    server.stop()
    server.remove()
