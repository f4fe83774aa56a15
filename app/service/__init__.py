"""The HTTP service: launch searches, watch their progress, read fronts, export policies.

``turboquant serve`` runs :func:`create_app` under uvicorn. The parts: the request bodies
(:mod:`._schemas`), the searches running in background threads (:mod:`._jobs`), the routes
(:mod:`._app`) and the web page (``templates/index.html``, packaged with the code).
"""

from __future__ import annotations

import logging
import os

from app.service._app import create_app
from app.service._limits import ServiceLimits
from app.service._schemas import ExportRequest, StudyRequest

__all__ = ["StudyRequest", "ExportRequest", "ServiceLimits", "create_app", "serve"]

log = logging.getLogger(__name__)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(host: str = "127.0.0.1", port: int = 8000, storage: str | None = None, token: str | None = None,
          ray_address: str | None = None, limits: ServiceLimits | None = None) -> None:
    """Runs the service until interrupted. ``TURBOQUANT_TOKEN`` supplies the token when none is given.

    Raises:
        UserError: a host other than loopback without a token (anyone reaching it could run searches).
    """
    import uvicorn

    from evaluators import UserError
    from studies import DEFAULT_STORAGE

    token = token or os.environ.get("TURBOQUANT_TOKEN") or None
    if host not in LOOPBACK and not token:
        raise UserError(f"serving on {host} needs a token (--token or TURBOQUANT_TOKEN): anyone who can reach it "
                        "could launch searches; without one, serve on 127.0.0.1")
    app = create_app(storage or DEFAULT_STORAGE, token=token, ray_address=ray_address, limits=limits)
    uvicorn.run(app, host=host, port=port, log_level="info")
