"""The review page: studies, plans, learned graphs and jobs as server-rendered HTML, plus the REST API.

``create_review_app(storage, write_token)`` returns a FastAPI app; ``allot serve`` runs it with uvicorn.
Everything it serves comes from this package and the installed ``plotly`` package (its bundled
``plotly.min.js``), so the page works with the network off. The pages need nothing; the two writes (pin or
unpin a graph version, roll back to one) need the write token or a write-scope API token. The REST API
(``workers.api``, under ``/api/v1`` and ``/api``) needs an API token (``workers.tokens``).
"""

from __future__ import annotations

from workers.review._app import create_review_app

__all__ = ["create_review_app"]
