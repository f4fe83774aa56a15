"""The HTTP service: launch searches, watch their progress, read fronts, export policies.

``turboquant serve`` runs :func:`create_app` under uvicorn. Searches run in background
threads of the service process (each one drives its own Ray workers through
:func:`search.driver.run_search`), many at once; a search that fails is recorded with
its error and never takes the service down. Everything else is read from the study
store, so studies started from the CLI (or another service) show up too.
"""

from __future__ import annotations

import logging
import math
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import pandas as pd
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evaluators.context import DataConfig
from evaluators.errors import UserError
from search.budget import parse_budget
from search.plots import front_png
from search.samplers import SAMPLERS
from studies import Store, StoreError, export_policy

__all__ = ["StudyRequest", "ExportRequest", "create_app", "serve"]

log = logging.getLogger(__name__)
STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StudyRequest(BaseModel):
    """A search to launch: the same options as ``turboquant search``."""

    model_config = ConfigDict(extra="forbid")

    study: str = Field(description="study name; letters, digits, '.', '_' and '-'")
    model: str = "smollm2-135m"
    budget: str = Field(description="e.g. 3.0bpw or 70MB")
    trials: int = Field(20, ge=1, le=1_000_000)
    workers: int = Field(2, ge=1, le=4096)
    sampler: str = "nsga2"
    dataset: str = "shakespeare"
    seq_len: int = Field(256, ge=2, le=1 << 20)
    eval_seqs: int = Field(8, ge=1)
    calib_seqs: int = Field(8, ge=0)
    seed: int = 0
    bits: list[int] = Field(default_factory=lambda: [2, 3, 4, 5, 6, 8], min_length=1)
    groups: list[int | None] = Field(default_factory=lambda: [32, 64, 128], min_length=1,
                                     description="group sizes; null = per output channel")
    formats: list[str] = Field(default_factory=lambda: ["rtn"], min_length=1,
                               description="quantizers: rtn, gptq, turbo, lloyd, vq, ternary; options with '+' "
                                           "(gptq+clip)")
    granularity: str = Field("matrix", description="what shares one setting: matrix, block or layer")
    sensitivity: bool = Field(False, description="measure (or reuse) the sensitivity table and enqueue solved seeds")
    sensitivity_seqs: int | None = Field(None, ge=1, description="windows the sensitivity table is measured on")
    multi_fidelity: bool | None = Field(None, description="stop hopeless children after the first batch "
                                                          "(default: on for evo)")
    trust_remote_code: bool = False

    @field_validator("study")
    @classmethod
    def _name(cls, v: str) -> str:
        if not STUDY_NAME.match(v):
            raise ValueError("study names use letters, digits, '.', '_' and '-' (at most 128, not starting with a symbol)")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        from evaluators.models import check_model_name

        try:
            check_model_name(v)
        except UserError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("budget")
    @classmethod
    def _budget(cls, v: str) -> str:
        try:
            parse_budget(v, 8)  # the format only; the model's size is known once it loads
        except UserError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, v: str) -> str:
        if v not in SAMPLERS:
            raise ValueError(f"unknown sampler {v!r}; choose one of {', '.join(SAMPLERS)}")
        return v

    @field_validator("granularity")
    @classmethod
    def _granularity(cls, v: str) -> str:
        from search.space import check_granularity

        try:
            return check_granularity(v)
        except UserError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _settings(self) -> "StudyRequest":
        # Unsupported formats / bits / group sizes are a 422 now, not a search that fails in the background.
        from search.space import SearchSpace

        try:
            SearchSpace({}, tuple(self.bits), tuple(self.groups), tuple(self.formats))
        except UserError as exc:
            raise ValueError(str(exc)) from None
        return self


class ExportRequest(BaseModel):
    """Which front point to export: a trial number or the best point within a budget."""

    model_config = ConfigDict(extra="forbid")

    trial: int | None = Field(None, ge=0, le=2**31 - 1)  # the store's trial numbers are 32-bit integers
    budget: str | None = None
    format: Literal["json", "gptqmodel", "llamacpp", "torchao"] = "json"

    @model_validator(mode="after")
    def _one_of(self) -> "ExportRequest":
        if (self.trial is None) == (self.budget is None):
            raise ValueError("give exactly one of 'trial' or 'budget'")
        return self


@dataclass
class _Job:
    """A search launched by this service."""

    request: StudyRequest
    status: str = "running"  # running | done | failed
    started: float = field(default_factory=time.time)
    finished: float | None = None
    error: str | None = None
    summary: dict[str, Any] | None = None


def _clean(value: Any) -> Any:
    # JSON has no NaN; pandas uses it for missing values.
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):  # numpy scalars
        return _clean(value.item())
    return value


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: _clean(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


class _Service:
    def __init__(self, storage: str, ray_address: str | None):
        self.storage = storage
        self.ray_address = ray_address
        self.store = Store(storage)  # fails now, at start-up, if the storage cannot be opened
        # transformers resolves names lazily and that is not thread-safe: two searches starting at once
        # got "cannot import name 'AutoConfig'". Resolve them once here, before any search thread runs.
        import transformers

        for name in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "LlamaConfig", "LlamaForCausalLM"):
            getattr(transformers, name)
        import search.driver  # noqa: F401  (same reason: import once, not from racing threads)
        self.jobs: dict[str, _Job] = {}
        self.lock = threading.Lock()
        self.ray_lock = threading.Lock()

    def launch(self, req: StudyRequest) -> _Job:
        with self.lock:
            job = self.jobs.get(req.study)
            if job is not None and job.status == "running":
                raise HTTPException(409, f"study {req.study!r} is already running in this service")
            job = self.jobs[req.study] = _Job(req)
        threading.Thread(target=self._run, args=(job,), name=f"search-{req.study}", daemon=True).start()
        return job

    def _run(self, job: _Job) -> None:
        from search.driver import SearchConfig, run_search
        from search.workers import init_ray

        req = job.request
        try:
            with self.ray_lock:  # one ray.init, however many searches start at once
                init_ray(self.ray_address, os.cpu_count() or 2)
            data = DataConfig(model=req.model, dataset=req.dataset, seq_len=req.seq_len, n_eval=req.eval_seqs,
                              n_calib=req.calib_seqs, seed=req.seed, trust_remote_code=req.trust_remote_code)
            cfg = SearchConfig(study=req.study, data=data, budget=req.budget, trials=req.trials,
                               sampler=req.sampler, workers=req.workers, storage=self.storage,
                               bits=tuple(req.bits), groups=tuple(req.groups), formats=tuple(req.formats),
                               granularity=req.granularity,
                               sensitivity=req.sensitivity, sensitivity_seqs=req.sensitivity_seqs,
                               multi_fidelity=req.multi_fidelity, ray_address=self.ray_address, progress=False)
            job.summary = run_search(cfg)
            job.status = "done"
        except Exception as exc:  # a failed search is reported, never fatal to the service
            log.warning("search %s failed: %s", req.study, exc, exc_info=not isinstance(exc, (UserError, StoreError)))
            job.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, (UserError, StoreError)) else str(exc)
            job.status = "failed"
        finally:
            job.finished = time.time()

    def study_row(self, name: str):
        try:
            return self.store.get_study(name)
        except StoreError as exc:
            raise HTTPException(404, str(exc)) from None

    def progress(self, name: str) -> dict[str, Any]:
        job = self.jobs.get(name)
        row = self.store.find_study(name)
        if row is None:
            if job is None:
                self.study_row(name)  # raises 404 with the known studies
            # Launched but not yet created (loading the model), or failed before creating it.
            return {"study": name, "status": job.status, "error": job.error, "complete": 0, "failed": 0,
                    "running": 0, "target_trials": job.request.trials, "best_kl": None,
                    "elapsed_s": (job.finished or time.time()) - job.started, "trials_per_min": None}
        trials = self.store.trials_frame(row)
        complete = int((trials["state"] == "complete").sum())
        failed = int((trials["state"] == "failed").sum())
        feasible = trials[(trials["state"] == "complete") & trials["feasible"].fillna(False).astype(bool)]
        best = None if feasible.empty else float(feasible["kl"].min())
        if job is not None:
            elapsed = (job.finished or time.time()) - job.started
            running = min(job.request.workers, max(job.request.trials - complete, 0)) if job.status == "running" else 0
        else:
            # Not launched here (CLI or another service): the trials' own compute time is what is known.
            elapsed = float(trials["seconds"].fillna(0).sum())
            running = 0
        return {"study": name, "status": job.status if job else "stored", "error": job.error if job else None,
                "model": row.model, "sampler": row.sampler, "budget_bytes": row.budget_bytes,
                "budget_bpw": row.budget_bpw, "complete": complete, "failed": failed, "running": running,
                "target_trials": job.request.trials if job else None, "best_kl": best, "elapsed_s": elapsed,
                "trials_per_min": (60.0 * complete / elapsed) if elapsed else None}


def create_app(storage: str, *, token: str | None = None, ray_address: str | None = None) -> FastAPI:
    """The FastAPI app over ``storage``. With ``token`` every API request needs ``Authorization: Bearer``."""
    service = _Service(storage, ray_address)
    app = FastAPI(title="TurboQuant", version="0.1.0",
                  description="Mixed-precision quantization search: launch, watch, fronts, export.")
    app.state.service = service

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
        """Starts a search (or resumes one: same options, more trials) in the background."""
        job = service.launch(req)
        return {"study": req.study, "status": job.status, "progress": f"/studies/{req.study}"}

    @app.get("/studies", dependencies=api)
    def studies() -> list[dict[str, Any]]:
        rows = _records(service.store.studies_frame())
        known = {r["study"] for r in rows}
        for r in rows:
            job = service.jobs.get(r["study"])
            r["status"] = job.status if job else "stored"
            r["created"] = str(r["created"]) if r.get("created") is not None else None
        for name, job in service.jobs.items():
            if name not in known:
                rows.append({"study": name, "model": job.request.model, "status": job.status, "error": job.error})
        return rows

    @app.get("/studies/{study}", dependencies=api)
    def progress(study: str) -> dict[str, Any]:
        return service.progress(study)

    @app.get("/studies/{study}/front", dependencies=api, response_model=list[dict[str, Any]])
    def front(study: str) -> Response:
        """The feasible Pareto front: the same points as ``turboquant front STUDY --json``."""
        # Encoded once per change of the study's trials (the store caches it): the busiest read.
        return Response(service.store.front_json(study), media_type="application/json")

    @app.get("/studies/{study}/front.csv", dependencies=api)
    def front_csv(study: str) -> Response:
        frame = service.store.front(service.study_row(study))
        return Response(frame.to_csv(index=False), media_type="text/csv")

    @app.get("/studies/{study}/front.png", dependencies=api)
    def front_plot(study: str) -> Response:
        row = service.study_row(study)
        points = service.store.front(row)
        return Response(front_png(points, f"{study}: front within {row.budget_bpw:.2f} bpw"), media_type="image/png")

    @app.post("/studies/{study}/export", dependencies=api)
    def export(study: str, req: ExportRequest) -> Any:
        """The policy of a front point (``format`` json), or its form for another runtime."""
        row = service.study_row(study)
        try:
            budget = None if req.budget is None else parse_budget(req.budget, row.numel)
            doc = export_policy(service.store, study, trial=req.trial, budget_bytes=budget)
        except UserError as exc:
            raise HTTPException(422, str(exc)) from None
        except StoreError as exc:
            raise HTTPException(404, str(exc)) from None
        if req.format == "json":
            return doc
        from studies.export_runtimes import export_runtime

        result = export_runtime(doc, req.format)
        return {"format": req.format, "text": result.text, "approximations": result.approximations,
                "skipped": result.skipped, "trial": doc["provenance"]["trial"], "metrics": doc["metrics"]}

    @app.get("/static/plotly.min.js", include_in_schema=False)
    def plotly_js() -> FileResponse:
        # Served from the installed plotly package: the page works without internet access.
        return FileResponse(str(resources.files("plotly") / "package_data" / "plotly.min.js"),
                            media_type="application/javascript")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return _PAGE

    @app.exception_handler(StoreError)
    def _store_error(_request: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404 if "no study" in str(exc) else 503)

    return app


# The page holds no data itself: it reads the API with the token from the URL fragment (#token=...).
_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>TurboQuant studies</title>
<script src="/static/plotly.min.js"></script>
<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #ddd}
.front{width:720px;height:400px}</style></head>
<body><h1>TurboQuant studies</h1>
<table id="studies"><thead><tr><th>study</th><th>model</th><th>status</th><th>complete</th><th>failed</th>
<th>best KL</th><th>budget bpw</th></tr></thead><tbody></tbody></table>
<div id="fronts"></div>
<script>
const token = new URLSearchParams(location.hash.slice(1)).get("token");
const headers = token ? {"Authorization": "Bearer " + token} : {};
async function api(path, opts) {
  const r = await fetch(path, Object.assign({headers: Object.assign({"Content-Type": "application/json"}, headers)}, opts));
  if (!r.ok) throw new Error(path + ": " + r.status);
  return r.json();
}
async function exportTrial(study, trial) {
  const doc = await api(`/studies/${encodeURIComponent(study)}/export`, {method: "POST", body: JSON.stringify({trial})});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([JSON.stringify(doc, null, 2)], {type: "application/json"}));
  a.download = `${study}-trial${trial}.json`; a.click();
}
async function load() {
  const studies = await api("/studies");
  const body = document.querySelector("#studies tbody");
  const fronts = document.getElementById("fronts");
  body.innerHTML = ""; fronts.innerHTML = "";
  for (const s of studies) {
    const tr = document.createElement("tr");
    for (const v of [s.study, s.model, s.status, s.complete, s.failed,
                     s.best_kl == null ? "" : s.best_kl.toFixed(5), s.budget_bpw]) {
      const td = document.createElement("td"); td.textContent = v == null ? "" : v; tr.appendChild(td);
    }
    body.appendChild(tr);
    if (!s.budget_bytes) continue;
    const pts = await api(`/studies/${encodeURIComponent(s.study)}/front`);
    const h = document.createElement("h2"); h.textContent = s.study; fronts.appendChild(h);
    const div = document.createElement("div"); div.className = "front"; div.id = "front-" + s.study;
    div.dataset.points = JSON.stringify(pts.map(p => p.trial)); fronts.appendChild(div);
    Plotly.newPlot(div, [{x: pts.map(p => p.bpw), y: pts.map(p => p.kl), customdata: pts.map(p => p.trial),
      mode: "lines+markers", type: "scatter",
      text: pts.map(p => `trial ${p.trial}<br>${p.bytes} bytes<br>ppl ${p.ppl.toFixed(3)}, top1 ${p.top1.toFixed(3)}`),
      hovertemplate: "%{text}<br>KL %{y:.5f} at %{x:.3f} bpw<extra></extra>"}],
      {xaxis: {title: {text: "bits per weight"}}, yaxis: {title: {text: "KL to float"}}, margin: {t: 10}});
    div.on("plotly_click", ev => exportTrial(s.study, ev.points[0].customdata));
    const note = document.createElement("p"); note.textContent = "click a point to download its policy"; fronts.appendChild(note);
  }
}
load().catch(e => { document.body.insertAdjacentHTML("beforeend", `<p class="error">${e.message}</p>`); });
</script></body></html>
"""


def serve(host: str = "127.0.0.1", port: int = 8000, storage: str | None = None, token: str | None = None,
          ray_address: str | None = None) -> None:
    """Runs the service until interrupted. ``TURBOQUANT_TOKEN`` supplies the token when none is given."""
    import uvicorn

    from studies import DEFAULT_STORAGE

    token = token or os.environ.get("TURBOQUANT_TOKEN") or None
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        log.warning("serving on %s without a token: anyone who can reach it can launch searches", host)
    app = create_app(storage or DEFAULT_STORAGE, token=token, ray_address=ray_address)
    uvicorn.run(app, host=host, port=port, log_level="info")
