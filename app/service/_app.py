"""The API's routes and the app: launch searches, watch their progress, read fronts, export policies.

Everything but the searches launched here is read from the study store, so studies started
from the CLI (or another service) show up too. Status codes follow the exception's type:
bad input (:class:`UserError`, pydantic) 422, a study or trial that does not exist
(:class:`NotFoundError`) 404, a study already running 409, a store that cannot answer 503.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from evaluators.errors import UserError
from app.plots import front_png
from app.service._jobs import AlreadyRunning, Jobs, NotRunning, progress
from app.service._limits import ServiceLimits, vet
from app.service._schemas import ExportRequest, StudyRequest
from studies import NotFoundError, Store, StoreError

__all__ = ["create_app"]

# Exception type -> HTTP status; the first match in this order wins (NotFoundError is a StoreError).
_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (NotFoundError, 404), (AlreadyRunning, 409), (NotRunning, 409), (UserError, 422), (StoreError, 503))


def _clean(value: Any) -> Any:
    # JSON has no NaN; pandas uses it for missing values.
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):  # numpy scalars
        return _clean(value.item())
    return value


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: _clean(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


def _page() -> str:
    return (resources.files("app.service") / "templates" / "index.html").read_text(encoding="utf-8")


def create_app(storage: str, *, token: str | None = None, ray_address: str | None = None,
               limits: ServiceLimits | None = None) -> FastAPI:
    """The FastAPI app over ``storage``. With ``token`` every API request needs ``Authorization: Bearer``;
    ``limits`` say what requests may read and run (default: the embedded corpus, aliases and hub ids,
    no remote code, 2 searches at once)."""
    limits = limits or ServiceLimits()
    store = Store(storage)  # fails now, at start-up, if the storage cannot be opened
    jobs = Jobs(storage, ray_address, max_running=limits.max_running)
    page = _page()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        # The service's own local Ray (started by its first search) goes with it: its agents and workers
        # would otherwise outlive a stopped service. A cluster joined by address is left running.
        import ray

        if ray.is_initialized():
            ray.shutdown()

    app = FastAPI(title="TurboQuant", version="0.1.0", lifespan=lifespan,
                  description="Mixed-precision quantization search: launch, watch, fronts, export.")
    app.state.service = jobs

    def auth(request: Request) -> None:
        if not token:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    api = [Depends(auth)]

    @app.post("/studies", status_code=202, dependencies=api)
    def launch(req: StudyRequest) -> dict[str, Any]:
        """Starts a search (or resumes one: same options, more trials) in the background; past the service's
        searches at once, it waits in a queue (status ``queued``)."""
        job = jobs.launch(vet(req, limits, local=ray_address is None and not os.environ.get("RAY_ADDRESS")))
        return {"study": req.study, "status": job.status, "progress": f"/studies/{req.study}"}

    @app.post("/studies/{study}/cancel", status_code=202, dependencies=api)
    def cancel(study: str) -> dict[str, Any]:
        """Stops a queued or running search: no trial is started after this; those out finish and are
        kept, so the study can be resumed."""
        job = jobs.cancel(study)
        return {"study": study, "status": job.status, "progress": f"/studies/{study}"}

    @app.get("/studies", dependencies=api)
    def studies() -> list[dict[str, Any]]:
        rows = _records(store.studies_frame())
        known = {r["study"] for r in rows}
        for r in rows:
            job = jobs.get(r["study"])
            r["status"] = job.status if job else "stored"
            r["created"] = str(r["created"]) if r.get("created") is not None else None
        for name, job in jobs.items():
            if name not in known:
                rows.append({"study": name, "model": job.request.model, "status": job.status, "error": job.error})
        return rows

    @app.get("/studies/{study}", dependencies=api)
    def study_progress(study: str) -> dict[str, Any]:
        return progress(store, study, jobs.get(study))

    @app.get("/studies/{study}/front", dependencies=api, response_model=list[dict[str, Any]])
    def front(study: str) -> Response:
        """The feasible Pareto front: the same points as ``turboquant front STUDY --json``."""
        # Encoded once per change of the study's trials (the store caches it): the busiest read.
        return Response(store.front_json(study), media_type="application/json")

    @app.get("/studies/{study}/front.csv", dependencies=api)
    def front_csv(study: str) -> Response:
        return Response(store.front(store.get_study(study)).to_csv(index=False), media_type="text/csv")

    @app.get("/studies/{study}/front.png", dependencies=api)
    def front_plot(study: str) -> Response:
        row = store.get_study(study)
        return Response(front_png(store.front(row), f"{study}: front within {row.budget_label}"),
                        media_type="image/png")

    @app.post("/studies/{study}/export", dependencies=api)
    def export(study: str, req: ExportRequest) -> Any:
        """The policy of a front point (``format`` json), its configuration for another runtime, or its GGUF file."""
        import tempfile

        from search.exporters import EXPORTERS, ExportOptions, export_point

        with tempfile.TemporaryDirectory() as tmp:  # the server keeps no files of its own
            exported = export_point(storage, study, req.format, Path(tmp) / "export", trial=req.trial,
                                    budget=req.budget, refine_trials=req.refine_trials, ray_address=ray_address,
                                    options=ExportOptions(nearest=req.nearest,
                                                          trust_remote_code=limits.allow_remote_code),
                                    progress=False, store=store)
            if req.format == "json":
                return json.loads(exported.path.read_text())
            if req.format == "gguf":
                return Response(exported.path.read_bytes(), media_type=EXPORTERS[req.format].media_type,
                                headers={"Content-Disposition": f'attachment; filename="{study}-{exported.trial}.gguf"'})
            return {"format": req.format, "text": exported.path.read_text(), "approximations": exported.approximations,
                    "skipped": exported.skipped, "flags": exported.flags, "trial": exported.trial,
                    "metrics": exported.metrics}

    @app.get("/static/plotly.min.js", include_in_schema=False)
    def plotly_js() -> FileResponse:
        # Served from the installed plotly package: the page works without internet access.
        return FileResponse(str(resources.files("plotly") / "package_data" / "plotly.min.js"),
                            media_type="application/javascript")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    for kind, status in _STATUS:
        app.add_exception_handler(kind, _answer(status))
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_middleware(BodyLimit)
    return app


class BodyLimit:
    """ASGI middleware refusing request bodies over ``limit`` bytes (413) before they are read whole: a request
    is a few hundred bytes, and a huge one (a ``bits`` list of 8M entries) blocked the event loop for a minute
    while it was parsed."""

    def __init__(self, app: Any, limit: int = 1 << 20):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                return await self._refuse(send)
            return await self.app(scope, receive, send)
        # A chunked body that did not say its length: read it here, up to the limit, then hand it on.
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            seen += len(message.get("body", b""))
            if seen > self.limit:
                return await self._refuse(send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps({"detail": f"request body over {self.limit:,} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's own 422 repeats each bad input: a NaN cannot be encoded (it answered 500) and a list of
    # 250k entries came back whole. A short, plain input is still quoted; anything else is left out.
    def shown(e: dict[str, Any]) -> dict[str, Any]:
        out = {k: e[k] for k in ("type", "loc", "msg") if k in e}
        value = e.get("input")
        plain = isinstance(value, (str, int, bool)) or (isinstance(value, float) and math.isfinite(value))
        if plain and len(str(value)) <= 100:
            out["input"] = value
        return out

    return JSONResponse({"detail": [shown(e) for e in exc.errors()]}, status_code=422)


def _answer(status: int):
    def handler(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status)

    return handler
