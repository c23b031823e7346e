"""The review app: routes, the write-token check, and rendering.

Pages (HTML, Jinja2 templates in ``templates/``, client-side sorting and plots in ``static/``)::

    /                                   studies, learned graphs, recent jobs
    /studies/{name}                     trials table, best-so-far curve, score vs cost with the Pareto
                                        front, per-stage allocation of the best plans, planner cost
    /plans/{plan_id}                    each stage's collaboration graph, drawn
    /graphs                             learned graphs
    /graphs/{graph}[/versions/{n}]      a version drawn with edge probabilities; prev/next; pin, roll back
    /graphs/{graph}/diff?a=&b=          what changed between two versions, and why
    /jobs, /jobs/{id}                   recent jobs; one job's per-stage outputs

JSON: the REST API (``workers.api``) under ``/api/v1`` and ``/api``: jobs, tasks, studies, trials, plans,
learned graphs, pin and roll back; it needs an API token (``allot token create``). Its OpenAPI spec is
``/openapi.json`` (also ``/api/openapi.json``), shown at ``/docs``.

The pages need no token (bind the server to loopback, or put it behind a proxy that authenticates).
The HTML forms post pin and roll back to the API's actions without ``/api`` and are redirected back to
the graph page. They need, in the ``token`` form field or ``Authorization: Bearer``, the app's legacy
write token or a write-scope API token: none given is 401, a wrong one or a read-scope token is 403
(also when the server has neither a write token nor a token table), and nothing changes.
"""

from __future__ import annotations

import hmac
import json
import statistics
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from starlette.exceptions import HTTPException

from graphs.drawing import plan_stage_drawing, probabilistic_drawing
from graphs.errors import AllotError
from planner import views
from planner.storage import BaseStorage, SQLStorage
from workers.api import API_VERSION, DEFAULT_MAX_BODY_BYTES, describe_operations, install_api
from workers.tokens import TokenScope, TokenStore

__all__ = ["create_review_app", "plotly_js_path"]

_STATIC = {"review.css": "text/css", "review.js": "text/javascript"}


def plotly_js_path() -> Path:
    """The ``plotly.min.js`` bundled in the installed ``plotly`` Python package (never a CDN)."""
    return Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.{digits}g}"


def _score(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def _templates() -> Environment:
    env = Environment(loader=PackageLoader("workers.review", "templates"), autoescape=select_autoescape(["html"]))
    env.filters["q"] = lambda text: quote(str(text), safe="")
    env.filters["num"] = _num
    env.filters["score"] = _score
    env.filters["pretty"] = lambda value: json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
    return env


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def create_review_app(
    storage: BaseStorage,
    write_token: str | None = None,
    *,
    broker_url: str | None = None,
    queue: str | None = None,
    dispatcher: Any | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The review app over ``storage``, with the REST API (``workers.api``).

    Args:
        storage: where studies, plans, graph versions and jobs are read (and pins and rollbacks written).
        write_token: a legacy secret that may pin and roll back (as may write-scope API tokens).
        broker_url, queue: where submitted jobs' messages go (default ``ALLOT_BROKER_URL``, else embedded).
        dispatcher: a ``workers.dispatch.Dispatcher`` to use instead (tests).
        max_body_bytes: larger request bodies are refused with 413.

    Returns:
        A FastAPI app; serve it with ``uvicorn.run(app)`` (``allot serve`` does).
    """
    # /docs is rendered here, not by Swagger UI: that loads its scripts from a CDN, and this app must work offline
    app = FastAPI(
        title="Allot",
        version=API_VERSION,
        summary="Run learned compute-allocation plans as jobs; review studies and learned graphs.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    templates = _templates()
    token = write_token or None
    tokens = TokenStore(storage) if isinstance(storage, SQLStorage) else None

    def page(name: str, request: Request, status_code: int = 200, **context: Any) -> HTMLResponse:
        writes = token is not None or tokens is not None
        html = templates.get_template(name).render(request=request, writes=writes, **context)
        return HTMLResponse(html, status_code=status_code)

    def authorize(request: Request, given: str | None) -> None:
        """The form actions: the legacy write token or a write-scope API token (the form's field first)."""
        given = given or _bearer(request)
        if token is None and tokens is None:
            raise HTTPException(403, "writes are disabled: start `allot serve` with --write-token (or ALLOT_WRITE_TOKEN)")
        if not given:
            raise HTTPException(401, "a write token is required (the form's token field, or Authorization: Bearer <token>)")
        if token is not None and hmac.compare_digest(given.encode(), token.encode()):
            return
        api_token = tokens.verify(given) if tokens is not None else None
        if api_token is None:
            raise HTTPException(403, "wrong write token")
        if not api_token.scope.allows(TokenScope.WRITE):
            raise HTTPException(403, f"token {api_token.name!r} is read-only: pin and roll back need a write-scope token")

    def found(call: Any, *args: Any, **kwargs: Any) -> Any:
        """Storage lookups: an unknown name or id is a 404 with the lookup's message."""
        try:
            return call(*args, **kwargs)
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0]) if exc.args else "not found") from None
        except AllotError as exc:
            raise HTTPException(422, str(exc)) from None

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        headers = dict(exc.headers or {})
        if exc.status_code == 401:
            headers.setdefault("WWW-Authenticate", "Bearer")
        if request.url.path.startswith("/api"):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)
        response = page("error.html", request, status_code=exc.status_code, status=exc.status_code, detail=exc.detail)
        if headers:
            response.headers.update(headers)
        return response

    # -- static files ------------------------------------------------------------------------------------

    @app.get("/static/plotly.min.js", include_in_schema=False)
    def plotly_js() -> FileResponse:
        return FileResponse(plotly_js_path(), media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in _STATIC:
            raise HTTPException(404, f"no static file {name!r}")
        text = (resources.files("workers.review") / "static" / name).read_text()
        return Response(text, media_type=_STATIC[name], headers={"Cache-Control": "max-age=300"})

    # -- pages -------------------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index(request: Request) -> HTMLResponse:
        return page(
            "index.html",
            request,
            studies=views.study_summaries(storage),
            graphs=views.graph_list(storage),
            jobs=views.recent_jobs(storage, limit=10),
        )

    @app.get("/studies/{name}", response_class=HTMLResponse, include_in_schema=False)
    def study_page(request: Request, name: str) -> HTMLResponse:
        detail = found(views.study_detail, storage, name)
        return page("study.html", request, d=detail, s=detail["study"], plots=_study_plots(detail))

    @app.get("/plans/{plan_id}", response_class=HTMLResponse, include_in_schema=False)
    def plan_page(request: Request, plan_id: str, study: str | None = None) -> HTMLResponse:
        plan = found(storage.get_plan, plan_id)
        drawings = [Markup(plan_stage_drawing(stage).svg()) for stage in plan.stages]
        return page("plan.html", request, p=views.plan_view(storage, plan.plan_id), drawings=drawings, study=study)

    @app.get("/graphs", response_class=HTMLResponse, include_in_schema=False)
    def graphs_page(request: Request) -> HTMLResponse:
        return page("graphs.html", request, graphs=views.graph_list(storage))

    @app.get("/graphs/{graph}", response_class=HTMLResponse, include_in_schema=False)
    def graph_latest(request: Request, graph: str) -> HTMLResponse:
        return _graph_page(request, graph, None)

    @app.get("/graphs/{graph}/versions/{version}", response_class=HTMLResponse, include_in_schema=False)
    def graph_page(request: Request, graph: str, version: int) -> HTMLResponse:
        return _graph_page(request, graph, version)

    def _graph_page(request: Request, graph: str, version: int | None) -> HTMLResponse:
        versions = found(storage.get_graph_versions, graph)
        record = found(views.graph_version, storage, graph, version)
        invalid = None
        try:
            current: tuple[Any, ...] = views.graph_stages(record.definition)
        except AllotError as exc:  # a version some other writer stored: show it raw
            current, invalid = (), str(exc)
        previous_record = versions[record.version - 2] if record.version > 1 else None
        previous = {}
        if previous_record is not None:
            try:
                previous = {g.stage: g for g in views.graph_stages(previous_record.definition)}
            except AllotError:
                previous = {}
        stages = [
            {
                "graph": g.to_probabilities(),
                "svg": Markup(probabilistic_drawing(g, previous=previous.get(g.stage)).svg()),
                "edge_range": _spread([e.probability for e in g.edges]),
            }
            for g in current
        ]
        return page(
            "graph.html",
            request,
            graph=graph,
            v=views.version_record(record),
            definition=record.definition,
            update=record.definition.get("update"),
            invalid=invalid,
            versions=[views.version_record(v) for v in versions],
            stages=stages,
            latest=versions[-1].version,
        )

    @app.get("/graphs/{graph}/diff", response_class=HTMLResponse, include_in_schema=False)
    def diff_page(request: Request, graph: str, a: int | None = None, b: int | None = None) -> HTMLResponse:
        versions = found(storage.get_graph_versions, graph)
        b = versions[-1].version if b is None else b
        a = max(1, b - 1) if a is None else a
        diff = found(views.version_diff, storage, graph, a, b)
        first = found(views.graph_stages, views.graph_version(storage, graph, a).definition)
        second = found(views.graph_stages, views.graph_version(storage, graph, b).definition)
        before = {g.stage: g for g in first}
        drawings = {g.stage: Markup(probabilistic_drawing(g, previous=before.get(g.stage)).svg()) for g in second}
        return page(
            "diff.html",
            request,
            graph=graph,
            diff=diff,
            drawings=drawings,
            versions=[views.version_record(v) for v in versions],
        )

    async def _form(request: Request) -> dict[str, str]:
        body = (await request.body()).decode(errors="replace")
        if "json" in request.headers.get("content-type", ""):
            try:
                data = json.loads(body or "{}")
            except json.JSONDecodeError:
                raise HTTPException(422, "the request body is not JSON") from None
            return {str(k): v for k, v in data.items()} if isinstance(data, dict) else {}
        return {k: v[-1] for k, v in parse_qs(body).items()}

    def _truthy(value: Any, default: bool = True) -> bool:
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        return str(value).strip().lower() in ("1", "true", "yes", "on", "pin")

    async def _pin(request: Request, graph: str, version: int) -> Any:
        form = await _form(request)
        await run_in_threadpool(authorize, request, form.get("token"))
        return await run_in_threadpool(found, views.set_pinned, storage, graph, version, _truthy(form.get("pinned")))

    async def _rollback(request: Request, graph: str, version: int) -> Any:
        form = await _form(request)
        await run_in_threadpool(authorize, request, form.get("token"))
        return await run_in_threadpool(found, views.rollback, storage, graph, version)

    @app.post("/graphs/{graph}/versions/{version}/pin", include_in_schema=False)
    async def pin_form(request: Request, graph: str, version: int) -> RedirectResponse:
        record = await _pin(request, graph, version)
        return RedirectResponse(f"/graphs/{quote(graph, safe='')}/versions/{record.version}", status_code=303)

    @app.post("/graphs/{graph}/versions/{version}/rollback", include_in_schema=False)
    async def rollback_form(request: Request, graph: str, version: int) -> RedirectResponse:
        record = await _rollback(request, graph, version)
        return RedirectResponse(f"/graphs/{quote(graph, safe='')}/versions/{record.version}", status_code=303)

    @app.get("/jobs", response_class=HTMLResponse, include_in_schema=False)
    def jobs_page(request: Request) -> HTMLResponse:
        return page("jobs.html", request, jobs=views.recent_jobs(storage, limit=200))

    @app.get("/jobs/{job_id}", response_class=HTMLResponse, include_in_schema=False)
    def job_page(request: Request, job_id: int) -> HTMLResponse:
        return page("job.html", request, job=found(views.job_view, storage, job_id))

    # -- the REST API (workers/api.py) and its docs ---------------------------------------------------------

    install_api(
        app,
        storage,
        write_token=token,
        dispatcher=dispatcher,
        broker_url=broker_url,
        queue=queue,
        max_body_bytes=max_body_bytes,
    )

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def api_docs(request: Request) -> HTMLResponse:
        spec = app.openapi()
        schemas = sorted(spec.get("components", {}).get("schemas", {}).items())
        return page("api.html", request, spec=spec, operations=describe_operations(spec), schemas=schemas)

    return app


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


# -- plots -------------------------------------------------------------------------------------------------------


def _study_plots(detail: dict[str, Any]) -> dict[str, Any]:
    """Plotly figures (data and layout) of the study page; ``static/review.js`` draws them."""
    unit = detail["study"]["budget"]["unit"]
    rows = [r for r in detail["trials"] if r["state"] == "complete" and r["score"] is not None]
    pareto = set(detail["pareto"])
    best = detail["study"]["best"]
    base_layout = {
        "margin": {"l": 60, "r": 20, "t": 40, "b": 50},
        "height": 360,
        "legend": {"orientation": "h", "y": -0.22},
        "paper_bgcolor": "#ffffff",
        "plot_bgcolor": "#fafafa",
        "font": {"family": "DejaVu Sans, Helvetica, Arial, sans-serif", "size": 12},
    }
    hover = [f"trial {r['number']}<br>{r['plan_summary']}" for r in rows]
    history = {
        "data": [
            {
                "type": "scatter",
                "mode": "markers",
                "name": "trial score",
                "x": [r["number"] for r in rows],
                "y": [r["score"] for r in rows],
                "text": hover,
                "hoverinfo": "text+y",
                "marker": {"color": "#94a3b8", "size": 7},
            },
            {
                "type": "scatter",
                "mode": "lines",
                "name": "best so far",
                "x": [p["number"] for p in detail["best_so_far"]],
                "y": [p["best"] for p in detail["best_so_far"]],
                "line": {"shape": "hv", "color": "#2563eb", "width": 2.5},
            },
        ],
        "layout": {
            **base_layout,
            "title": {"text": "Best score so far", "x": 0.02, "xanchor": "left"},
            "xaxis": {"title": {"text": "trial"}},
            "yaxis": {"title": {"text": "score"}},
        },
    }
    front = sorted((r for r in rows if r["number"] in pareto), key=lambda r: r["cost"] or 0.0)
    costs = [r["cost"] for r in rows if r["cost"]]
    log_x = bool(costs) and min(costs) > 0 and max(costs) / min(costs) > 50
    scatter_data: list[dict[str, Any]] = [
        {
            "type": "scatter",
            "mode": "markers",
            "name": "trials",
            "x": [r["cost"] for r in rows],
            "y": [r["score"] for r in rows],
            "text": hover,
            "hoverinfo": "text+x+y",
            "marker": {"color": "#94a3b8", "size": 7},
        },
        {
            "type": "scatter",
            "mode": "lines+markers",
            "name": "Pareto front",
            "x": [r["cost"] for r in front],
            "y": [r["score"] for r in front],
            "text": [f"trial {r['number']}<br>{r['plan_summary']}" for r in front],
            "hoverinfo": "text+x+y",
            "line": {"shape": "hv", "color": "#ea580c", "width": 2},
            "marker": {"color": "#ea580c", "size": 9},
        },
    ]
    scores = [r["score"] for r in rows]
    if scores:
        limit = detail["study"]["budget"]["limit"]
        scatter_data.append(
            {
                "type": "scatter",
                "mode": "lines",
                "name": f"budget ({_num(limit)})",
                "x": [limit, limit],
                "y": [min(scores), max(scores)],
                "hoverinfo": "name",
                "line": {"color": "#dc2626", "dash": "dot", "width": 1.5},
            }
        )
    if best is not None:
        scatter_data.append(
            {
                "type": "scatter",
                "mode": "markers",
                "name": f"best (trial {best['number']})",
                "x": [best["cost"]],
                "y": [best["score"]],
                "text": [best["plan_summary"]],
                "hoverinfo": "text+x+y",
                "marker": {"color": "#2563eb", "size": 15, "symbol": "star"},
            }
        )
    scatter = {
        "data": scatter_data,
        "layout": {
            **base_layout,
            "title": {"text": "Score vs cost, Pareto front", "x": 0.02, "xanchor": "left"},
            "xaxis": {"title": {"text": f"cost per input ({unit})"}, "type": "log" if log_x else "linear"},
            "yaxis": {"title": {"text": "score"}},
        },
    }
    return {"history": history, "scatter": scatter}
