"""The HTTP service: launch searches, watch their progress, read fronts, export policies.

``turboquant serve`` runs :func:`create_app` under uvicorn. The parts: the request bodies
(:mod:`._schemas`), the searches running in background threads (:mod:`._jobs`), the routes
(:mod:`._app`) and the web page (``templates/index.html``, packaged with the code).
"""

from __future__ import annotations

import logging
import os

from search.service._app import create_app
from search.service._schemas import ExportRequest, StudyRequest

__all__ = ["StudyRequest", "ExportRequest", "create_app", "serve"]

log = logging.getLogger(__name__)


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
