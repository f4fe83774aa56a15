"""docker-compose.yml and the Dockerfile, checked without Docker (no engine on these machines).

What can be checked here is what breaks a deployment silently: the commands the containers run
must parse with turboquant's own CLI, the service must reach the database and the Ray head under
the names and credentials compose gives them, and the image must contain every package.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import yaml
from sqlalchemy.engine import make_url

from app.cli import _parser
from app.cli_args import STORAGE_ENV

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # safe_load resolves anchors and '<<'


def _turboquant_argv(command: str) -> list[str]:
    """The arguments after ``turboquant`` in a shell command line."""
    words = shlex.split(command)
    return words[words.index("turboquant") + 1:]


def test_services_and_their_wiring() -> None:
    services = _compose()["services"]
    assert set(services) == {"postgres", "ray-head", "ray-worker", "service"}
    pg_env = services["postgres"]["environment"]
    assert services["postgres"]["healthcheck"]["test"]

    head = shlex.split(services["ray-head"]["command"])
    port = next(w.split("=")[1] for w in head if w.startswith("--port="))
    assert "--head" in head and "--block" in head
    assert f"--address=ray-head:{port}" in shlex.split(services["ray-worker"]["command"])

    svc = services["service"]
    inner = shlex.split(svc["command"])[2]  # sh -c "<ray start ... && exec turboquant serve ...>"
    assert f"ray start --address=ray-head:{port}" in inner
    args = _parser().parse_args(_turboquant_argv(inner))  # SystemExit here: a flag serve does not know
    assert args.command == "serve" and args.ray_address == "auto"
    # The storage URL, password included, comes from the environment: never on a command line (ps shows it).
    assert args.storage is None
    url = make_url(svc["environment"][STORAGE_ENV])
    assert (url.host, url.port, url.username, url.password, url.database) == (
        "postgres", 5432, pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"], pg_env["POSTGRES_DB"])
    assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert f"127.0.0.1:{args.port}:{args.port}" in svc["ports"]  # the API only on the host's loopback
    assert "TURBOQUANT_TOKEN" in svc["environment"]  # a token is required: the API leaves the container
    # Every role runs the same image, so both sides of Ray have the same code.
    assert {s.get("image") for name, s in services.items() if name != "postgres"} == {"turboquant:latest"}


def test_the_image_holds_every_package_and_its_command_parses() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = set(re.findall(r"^COPY (\S+) \1$", dockerfile, re.MULTILINE))
    assert {p.rstrip("*") for p in include} <= copied
    assert re.search(r"pip install torch==[\d.]+ --index-url https://download\.pytorch\.org/whl/cpu", dockerfile)
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.MULTILINE)
    assert cmd, "the Dockerfile has no exec-form CMD"
    args = _parser().parse_args(yaml.safe_load(cmd.group(1))[1:])
    assert args.command == "serve" and args.host == "0.0.0.0"
    # Served on every interface, so: not as root, and with a token given at run time, never baked in.
    users = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0") and dockerfile.index("USER") < dockerfile.index("CMD")
    assert "TURBOQUANT_TOKEN" not in "".join(re.findall(r"^(?:ENV|ARG) .*$", dockerfile, re.MULTILINE))
    assert args.token is None


def test_secrets_must_be_given_and_the_database_is_not_published() -> None:
    services = _compose()["services"]
    pg = services["postgres"]
    assert "ports" not in pg  # reachable only on the project's network
    # Compose refuses to start without them (${VAR:?message}); no default password to guess.
    assert re.fullmatch(r"\$\{POSTGRES_PASSWORD:\?[^}]+\}", pg["environment"]["POSTGRES_PASSWORD"])
    env = services["service"]["environment"]
    assert re.fullmatch(r"\$\{TURBOQUANT_TOKEN:\?[^}]+\}", env["TURBOQUANT_TOKEN"])
    assert "${POSTGRES_PASSWORD:?" in env[STORAGE_ENV]
    text = (ROOT / "docker-compose.yml").read_text()
    assert "turboquant:turboquant@" not in text  # the old default password, nowhere
    # Every published port is on the host's loopback only.
    for name, service in services.items():
        for mapping in service.get("ports", []):
            assert str(mapping).startswith("127.0.0.1:"), (name, mapping)


def test_serve_refuses_every_interface_without_a_token(monkeypatch, capsys) -> None:
    """What makes the image's CMD safe: without TURBOQUANT_TOKEN the container does not start serving."""
    from app.cli import main

    monkeypatch.delenv("TURBOQUANT_TOKEN", raising=False)
    dockerfile = (ROOT / "Dockerfile").read_text()
    argv = yaml.safe_load(re.search(r"^CMD (\[.*\])$", dockerfile, re.MULTILINE).group(1))[1:]
    assert main(argv + ["--storage", "sqlite://"]) == 2
    assert "needs a token" in capsys.readouterr().err
