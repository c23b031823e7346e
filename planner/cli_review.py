"""Review commands of the ``allot`` CLI: ``allot serve`` (the review page) and ``allot graph ...``.

``allot graph list|show|diff|pin|rollback|export`` render what the review page shows of learned graphs in the
terminal with rich, or write it to a file (Graphviz DOT, JSON, SVG, or PNG of the page's drawing).
Registered on the main app by ``planner.cli``; errors end with one ``error:`` line and exit code 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from graphs.errors import AllotError
from graphs.probabilistic import ProbabilisticGraph
from planner import views
from planner.storage import BaseStorage, get_storage

__all__ = ["graph_app", "serve"]

graph_app = typer.Typer(help="Review learned probabilistic graphs and their versions.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)
EXPORT_FORMATS = ("dot", "json", "png", "svg")

DatabaseOption = Annotated[
    str | None,
    typer.Option("--database", envvar="ALLOT_DATABASE_URL", help="SQLAlchemy URL; default: a SQLite file allot.db."),
]


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


def _lookup(storage: BaseStorage, graph: str, version: int | None) -> Any:
    try:
        return views.graph_version(storage, graph, version)
    except KeyError as exc:
        known = ", ".join(storage.list_graphs()) or "none"
        message = str(exc.args[0]) if exc.args and version is not None else f"no learned graph named {graph!r}"
        raise _fail(f"{message}: known graphs are {known}") from None


def _stages(record: Any) -> tuple[ProbabilisticGraph, ...]:
    try:
        return views.graph_stages(record.definition)
    except AllotError as exc:
        raise _fail(f"{record.graph} v{record.version}: {exc}") from None


def _header(record: Any) -> str:
    pinned = " [magenta](pinned)[/]" if record.pinned else ""
    return (
        f"[bold]{escape(record.graph)}[/] version {record.version}{pinned}, "
        f"{record.created_at:%Y-%m-%d %H:%M:%S}\n[dim]why:[/] {escape(record.cause or '(no cause recorded)')}"
    )


# -- list / show ------------------------------------------------------------------------------------------------


@graph_app.command("list")
def graph_list(database: DatabaseOption = None) -> None:
    """List learned graphs with their version counts."""
    try:
        table = Table(title="Learned graphs")
        for col in ("graph", "versions", "pinned", "latest change"):
            table.add_column(col)
        for row in views.graph_list(get_storage(database)):
            pinned = ", ".join(f"v{v}" for v in row["pinned"]) or "-"
            table.add_row(row["graph"], str(row["versions"]), pinned, Text(row["latest"]["cause"][:100]))
        console.print(table)
    except AllotError as exc:
        raise _fail(str(exc)) from None


def graph_tree(graph: ProbabilisticGraph, *, edges: int = 30) -> Tree:
    """One stage as a terminal tree: slots by role with inclusion and sample-count probabilities, then
    the ``edges`` likeliest edges (all with ``edges=0``)."""
    tree = Tree(f"[bold cyan]stage {escape(graph.stage)}[/] ({len(graph.slots)} slots, {len(graph.edges)} candidate edges)")
    slots = tree.add("[bold]slots[/] (inclusion probability; samples n: probability)")
    for slot in graph.slots:
        p = "always" if slot.required else f"{graph.inclusion_probability(slot.id):.3f}"
        counts = ", ".join(f"{n}: {q:.2f}" for n, q in slot.count_probabilities.items())
        slots.add(f"{escape(slot.id)}: [green]{slot.role.value}[/] {escape(slot.model)}  p={p}  [dim]n {counts}[/]")
    ranked = sorted(graph.edges, key=lambda e: (-e.probability, e.source, e.target))
    shown = ranked if edges <= 0 else ranked[:edges]
    branch = tree.add(f"[bold]edges[/] (probability; {len(shown)} of {len(ranked)}, likeliest first)")
    for edge in shown:
        branch.add(f"{escape(edge.source)} → {escape(edge.target)}  p={edge.probability:.3f}")
    return tree


@graph_app.command("show")
def graph_show(
    graph: Annotated[str, typer.Argument(help="Graph name (a study's name for strategy-learned graphs).")],
    version: Annotated[int | None, typer.Option(help="Version number (default: the newest).")] = None,
    edges: Annotated[int, typer.Option(help="Edges listed per stage, likeliest first (0: all).")] = 30,
    database: DatabaseOption = None,
) -> None:
    """Show one version of a learned graph: slots, edges and their probabilities, per stage."""
    try:
        storage = get_storage(database)
        record = _lookup(storage, graph, version)
        stages = _stages(record)
        total = len(storage.get_graph_versions(graph))
        console.print(_header(record) + f"\n[dim]{total} version(s); diff with `allot graph diff {graph} V1 V2`[/]")
        for stage in stages:
            console.print(graph_tree(stage, edges=edges))
    except AllotError as exc:
        raise _fail(str(exc)) from None


# -- diff -----------------------------------------------------------------------------------------------------------


@graph_app.command("diff")
def graph_diff(
    graph: Annotated[str, typer.Argument(help="Graph name.")],
    first: Annotated[int, typer.Argument(metavar="V1", help="Version to compare from.")],
    second: Annotated[int, typer.Argument(metavar="V2", help="Version to compare to.")],
    database: DatabaseOption = None,
) -> None:
    """What changed between two versions of a learned graph, and the causes of the versions between."""
    try:
        storage = get_storage(database)
        _lookup(storage, graph, first)
        _lookup(storage, graph, second)
        try:
            diff = views.version_diff(storage, graph, first, second)
        except AllotError as exc:
            raise _fail(str(exc)) from None
        console.print(f"[bold]{escape(graph)}[/]: v{first} → v{second}")
        for record in diff["between"]:
            console.print(f"  v{record['version']}: {escape(record['cause'] or '(no cause recorded)')}", soft_wrap=True)
        for stage in diff["stages"]:
            _print_stage_diff(stage)
    except AllotError as exc:
        raise _fail(str(exc)) from None


def _print_stage_diff(stage: dict[str, Any]) -> None:
    name = escape(stage["stage"])
    if stage.get("added_stage") or stage.get("removed_stage"):
        console.print(f"[bold cyan]stage {name}[/]: {'added' if stage.get('added_stage') else 'removed'}")
        return
    if stage["empty"]:
        console.print(f"[bold cyan]stage {name}[/]: no change")
        return
    console.print(f"[bold cyan]stage {name}[/]")
    for slot in stage["added_slots"]:
        console.print(f"  [green]+ slot {escape(slot)}[/]")
    for slot in stage["removed_slots"]:
        console.print(f"  [red]- slot {escape(slot)}[/]")
    if stage["slot_changes"]:
        table = Table(title=f"stage {name}: slots (largest change first)")
        for col in ("slot", "inclusion before", "after", "sample counts that moved"):
            table.add_column(col)
        shown = [c for c in stage["slot_changes"] if c["listed"]]
        for change in shown:
            moved = [
                f"{n}: {change['counts_before'].get(n, 0.0):.3f}→{p:.3f}"
                for n, p in change["counts_after"].items()
                if abs(p - change["counts_before"].get(n, 0.0)) >= views.SHOWN_CHANGE
            ]
            table.add_row(
                change["id"], f"{change['inclusion_before']:.3f}", f"{change['inclusion_after']:.3f}", ", ".join(moved) or "-"
            )
        if shown:
            console.print(table)
        hidden = len(stage["slot_changes"]) - len(shown)
        if hidden:
            console.print(f"  [dim]{hidden} slot(s) moved by less than {views.SHOWN_CHANGE:g}: not listed[/]")
    edges = [e for e in stage["edge_changes"] if e["listed"]]
    if edges:
        table = Table(title=f"stage {name}: edges (largest change first)")
        for col in ("edge", "before", "after", "change"):
            table.add_column(col, justify="left" if col == "edge" else "right")
        for edge in edges:
            color = "green" if edge["delta"] > 0 else "red"
            table.add_row(
                f"{edge['source']} → {edge['target']}",
                f"{edge['before']:.3f}",
                f"{edge['after']:.3f}",
                f"[{color}]{edge['delta']:+.3f}[/]",
            )
        console.print(table)
    hidden = len(stage["edge_changes"]) - len(edges)
    if hidden:
        console.print(f"  [dim]{hidden} edge(s) moved by less than {views.SHOWN_CHANGE:g}: not listed[/]")


# -- pin / rollback -------------------------------------------------------------------------------------------------


@graph_app.command("pin")
def graph_pin(
    graph: Annotated[str, typer.Argument(help="Graph name.")],
    version: Annotated[int, typer.Argument(help="Version to pin.")],
    unpin: Annotated[bool, typer.Option("--unpin", help="Unpin it instead.")] = False,
    database: DatabaseOption = None,
) -> None:
    """Pin a version: new jobs follow the newest pinned version instead of the newest one."""
    try:
        storage = get_storage(database)
        _lookup(storage, graph, version)
        record = views.set_pinned(storage, graph, version, not unpin)
        console.print(f"{escape(graph)} v{record.version} {'pinned' if record.pinned else 'unpinned'}")
    except AllotError as exc:
        raise _fail(str(exc)) from None


@graph_app.command("rollback")
def graph_rollback(
    graph: Annotated[str, typer.Argument(help="Graph name.")],
    version: Annotated[int, typer.Argument(help="Version to make current again.")],
    database: DatabaseOption = None,
) -> None:
    """Make an older version current again, as a new version copying it (history is never rewritten)."""
    try:
        storage = get_storage(database)
        _lookup(storage, graph, version)
        record = views.rollback(storage, graph, version)
        console.print(f"{escape(graph)} v{record.version}: {escape(record.cause or '')}")
    except AllotError as exc:
        raise _fail(str(exc)) from None


# -- export ---------------------------------------------------------------------------------------------------------


@graph_app.command("export")
def graph_export(
    graph: Annotated[str, typer.Argument(help="Graph name.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write.")],
    fmt: Annotated[str, typer.Option("--format", help="dot (Graphviz), json, png or svg (the review page's drawing).")] = "dot",
    version: Annotated[int | None, typer.Option(help="Version number (default: the newest).")] = None,
    database: DatabaseOption = None,
) -> None:
    """Write one version of a learned graph to a file."""
    from graphs.drawing import probabilistic_dot, probabilistic_drawing, stack, svg_to_png

    if fmt not in EXPORT_FORMATS:
        raise _fail(f"unknown format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    try:
        storage = get_storage(database)
        record = _lookup(storage, graph, version)
        stages = _stages(record)
        title = f"{graph} v{record.version}"
        if fmt == "dot":
            data: bytes = probabilistic_dot(stages, name=title).encode()
        elif fmt == "json":
            body = views.version_record(record, definition=True)
            body["stages"] = [stage.to_probabilities() for stage in stages]
            data = (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()
        else:
            svg = stack([probabilistic_drawing(stage) for stage in stages], title=title).svg()
            data = svg.encode() if fmt == "svg" else svg_to_png(svg)
        try:
            output.write_bytes(data)
        except OSError as exc:
            raise _fail(f"cannot write {output}: {exc.strerror or exc}") from None
        console.print(f"Wrote {title} ({fmt}, {len(data)} bytes) to {output}")
    except AllotError as exc:
        raise _fail(str(exc)) from None


# -- serve ----------------------------------------------------------------------------------------------------------


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8765,
    write_token: Annotated[
        str | None,
        typer.Option(
            envvar="ALLOT_WRITE_TOKEN",
            help="A secret that may pin and roll back graph versions (as may write-scope API tokens).",
        ),
    ] = None,
    broker: Annotated[
        str | None, typer.Option(envvar="ALLOT_BROKER_URL", help="Broker for submitted jobs' messages; default: embedded.")
    ] = None,
    queue: Annotated[str | None, typer.Option(envvar="ALLOT_QUEUE", help="Queue name; default: allot.")] = None,
    max_body_bytes: Annotated[
        int, typer.Option(min=1024, envvar="ALLOT_MAX_BODY_BYTES", help="Larger request bodies are refused (413).")
    ] = 64 * 1024,
    database: DatabaseOption = None,
) -> None:
    """Serve the review pages and the REST API (jobs, tasks, studies, learned graphs; docs at /docs)."""
    import uvicorn

    from workers.review import create_review_app

    try:
        storage = get_storage(database)
    except AllotError as exc:
        raise _fail(str(exc)) from None
    app = create_review_app(storage, write_token, broker_url=broker, queue=queue, max_body_bytes=max_body_bytes)
    writes = "pin and rollback need a write token" if write_token else "pin and rollback need a write-scope API token"
    shown = f"[{host}]" if ":" in host else host
    console.print(
        f"Allot review on http://{shown}:{port}/ ({writes}); REST API under /api/v1 (docs: /docs). Ctrl-C stops it.",
        highlight=False,
    )
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    except (OSError, SystemExit) as exc:
        raise _fail(f"cannot serve on {host}:{port}: {exc}") from None
    finally:
        storage.close()
