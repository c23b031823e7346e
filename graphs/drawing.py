"""Drawings of collaboration graphs: SVG (what the review page shows and ``allot graph export`` writes),
Graphviz DOT text, and PNG rendered from the same SVG.

Two kinds of graph are drawn, both left to right in layers (networkx's topological generations: a node
sits one layer right of its deepest input), nodes ordered within a layer by the mean position of their
inputs so edges cross less:

- a plan's ``StageGraph``: one box per node (role, model, samples ``n``, temperature, token cap), its
  edges, and a grey *decision* box fed by the answer nodes, labelled with the stage's decision rule;
- a ``ProbabilisticGraph``: one box per slot (role, model, inclusion probability, most likely sample
  count), faded by how unlikely the slot is; every candidate edge drawn with width and opacity growing
  with its probability, and the likeliest (or, given a diff, the changed) edges labelled with it. Given
  the previous version, edges that rose are green and edges that fell red.

Pure functions from values to text (PNG bytes through ``cairosvg``, imported on first use); no I/O.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape

import networkx as nx

from graphs.plan import Role, StageGraph
from graphs.probabilistic import GraphDiff, ProbabilisticGraph

__all__ = [
    "Drawing",
    "plan_stage_drawing",
    "probabilistic_dot",
    "probabilistic_drawing",
    "stack",
    "stage_graph_dot",
    "svg_to_png",
]

ROLE_COLORS: dict[str, str] = {
    Role.SOLVER.value: "#dbeafe",
    Role.REVIEWER.value: "#fce7f3",
    Role.REVISER.value: "#dcfce7",
    Role.AGGREGATOR.value: "#fef3c7",
    Role.VERIFIER.value: "#ede9fe",
    "decision": "#e5e7eb",
}
ROLE_STROKES: dict[str, str] = {
    Role.SOLVER.value: "#2563eb",
    Role.REVIEWER.value: "#db2777",
    Role.REVISER.value: "#16a34a",
    Role.AGGREGATOR.value: "#d97706",
    Role.VERIFIER.value: "#7c3aed",
    "decision": "#4b5563",
}
EDGE_COLORS = {"same": "#475569", "up": "#16a34a", "down": "#dc2626"}
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
BOX_W, BOX_H = 176, 54
GAP_X, GAP_Y = 84, 22
MARGIN = 16
MAX_LABELLED_EDGES = 24
"""Edge labels drawn at most (the likeliest or the most changed): more would hide the graph."""


@dataclass(frozen=True)
class _Box:
    key: str
    lines: tuple[str, ...]
    kind: str
    opacity: float = 1.0
    title: str = ""
    dashed: bool = False


@dataclass(frozen=True)
class _Arrow:
    source: str
    target: str
    width: float = 1.4
    opacity: float = 0.9
    color: str = "same"
    label: str = ""
    title: str = ""
    dashed: bool = False


@dataclass(frozen=True)
class Drawing:
    """A laid-out SVG fragment: ``body`` drawn in a ``width`` x ``height`` box at the origin."""

    width: float
    height: float
    body: str
    title: str = ""
    labels: tuple[str, ...] = field(default=())
    """Every node's label lines, for callers (and tests) that check what is drawn."""

    def svg(self, *, css_class: str = "allot-graph") -> str:
        """A standalone SVG document (also fine inline in HTML)."""
        return _document(self.width, self.height, self.body, css_class=css_class, title=self.title)


def _document(width: float, height: float, body: str, *, css_class: str, title: str) -> str:
    w, h = math.ceil(width), math.ceil(height)
    heading = f"<title>{escape(title)}</title>" if title else ""
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="{css_class}" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" font-family="{FONT}" font-size="12">{heading}{_defs()}'
        f'<rect width="{w}" height="{h}" fill="#ffffff"/>{body}</svg>'
    )


def _defs() -> str:
    markers = "".join(
        f'<marker id="allot-arrow-{name}" viewBox="0 0 10 10" refX="9" refY="5" markerUnits="userSpaceOnUse" '
        f'markerWidth="9" markerHeight="9" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{color}"/></marker>'
        for name, color in EDGE_COLORS.items()
    )
    return f"<defs>{markers}</defs>"


def stack(drawings: Sequence[Drawing], *, title: str = "", gap: float = 18) -> Drawing:
    """Drawings one below the other, each under its own title line (a whole plan or graph version)."""
    y, parts, labels = 0.0, [], []
    width = max((d.width for d in drawings), default=0.0)
    if title:
        parts.append(f'<text x="{MARGIN}" y="22" font-size="15" font-weight="bold">{escape(title)}</text>')
        y = 32.0
    for drawing in drawings:
        if drawing.title:
            parts.append(f'<text x="{MARGIN}" y="{y + 16:.1f}" font-size="13" font-weight="bold">{escape(drawing.title)}</text>')
            y += 22
        parts.append(f'<g transform="translate(0,{y:.1f})">{drawing.body}</g>')
        y += drawing.height + gap
        labels.extend(drawing.labels)
    return Drawing(width=width, height=max(y, 1.0), body="".join(parts), title=title, labels=tuple(labels))


# -- layout ---------------------------------------------------------------------------------------------------


def _layers(graph: nx.DiGraph, order: Sequence[str]) -> list[list[str]]:
    """Topological generations, each ordered by its nodes' mean input position (then by ``order``)."""
    rank = {node: i for i, node in enumerate(order)}
    layers: list[list[str]] = []
    position: dict[str, float] = {}
    for generation in nx.topological_generations(graph):

        def key(node: str) -> tuple[float, int]:
            inputs = [position[p] for p in graph.predecessors(node) if p in position]
            return (sum(inputs) / len(inputs) if inputs else -1.0, rank.get(node, len(rank)))

        layer = sorted(generation, key=lambda n: rank.get(n, len(rank)))
        if layers:
            layer = sorted(layer, key=key)
        for i, node in enumerate(layer):
            position[node] = i - (len(layer) - 1) / 2
        layers.append(layer)
    return layers


def _place(layers: list[list[str]]) -> tuple[dict[str, tuple[float, float]], float, float]:
    tallest = max((len(layer) for layer in layers), default=1)
    height = 2 * MARGIN + tallest * BOX_H + (tallest - 1) * GAP_Y
    width = 2 * MARGIN + len(layers) * BOX_W + (len(layers) - 1) * GAP_X
    coords = {}
    for column, layer in enumerate(layers):
        x = MARGIN + column * (BOX_W + GAP_X)
        span = len(layer) * BOX_H + (len(layer) - 1) * GAP_Y
        top = (height - span) / 2
        for row, node in enumerate(layer):
            coords[node] = (x, top + row * (BOX_H + GAP_Y))
    return coords, width, height


def _bezier(p0: tuple[float, float], p3: tuple[float, float], t: float) -> tuple[float, float]:
    dx = max(30.0, (p3[0] - p0[0]) / 2)
    p1, p2 = (p0[0] + dx, p0[1]), (p3[0] - dx, p3[1])
    u = 1 - t
    x = u**3 * p0[0] + 3 * u * u * t * p1[0] + 3 * u * t * t * p2[0] + t**3 * p3[0]
    y = u**3 * p0[1] + 3 * u * u * t * p1[1] + 3 * u * t * t * p2[1] + t**3 * p3[1]
    return x, y


def _clip_text(text: str, limit: int = 26) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _render(boxes: Sequence[_Box], arrows: Sequence[_Arrow], order: Sequence[str], title: str) -> Drawing:
    graph = nx.DiGraph()
    graph.add_nodes_from(box.key for box in boxes)
    graph.add_edges_from((a.source, a.target) for a in arrows)
    coords, width, height = _place(_layers(graph, order))
    parts: list[str] = []
    arrows = sorted(arrows, key=lambda a: (a.color != "same", a.width))  # changed and likelier edges on top
    for arrow in arrows:
        sx, sy = coords[arrow.source]
        tx, ty = coords[arrow.target]
        p0, p3 = (sx + BOX_W, sy + BOX_H / 2), (tx - 2, ty + BOX_H / 2)
        dx = max(30.0, (p3[0] - p0[0]) / 2)
        path = f"M{p0[0]:.1f},{p0[1]:.1f} C{p0[0] + dx:.1f},{p0[1]:.1f} {p3[0] - dx:.1f},{p3[1]:.1f} {p3[0]:.1f},{p3[1]:.1f}"
        dash = ' stroke-dasharray="5 4"' if arrow.dashed else ""
        color = EDGE_COLORS[arrow.color]
        parts.append(
            f'<g class="edge" data-source="{escape(arrow.source)}" data-target="{escape(arrow.target)}">'
            f"<title>{escape(arrow.title or f'{arrow.source} → {arrow.target}')}</title>"
            f'<path d="{path}" fill="none" stroke="{color}" stroke-width="{arrow.width:.2f}" '
            f'stroke-opacity="{arrow.opacity:.3f}"{dash} marker-end="url(#allot-arrow-{arrow.color})"/></g>'
        )
    for arrow in arrows:  # labels above every edge
        if not arrow.label:
            continue
        x, y = _bezier((coords[arrow.source][0] + BOX_W, coords[arrow.source][1] + BOX_H / 2),
                       (coords[arrow.target][0], coords[arrow.target][1] + BOX_H / 2), 0.5)  # fmt: skip
        w = 7 * len(arrow.label) + 6
        parts.append(
            f'<g class="edge-label"><rect x="{x - w / 2:.1f}" y="{y - 8:.1f}" width="{w}" height="15" rx="3" '
            f'fill="#ffffff" fill-opacity="0.85" stroke="{EDGE_COLORS[arrow.color]}" stroke-width="0.6"/>'
            f'<text x="{x:.1f}" y="{y + 3.5:.1f}" text-anchor="middle" font-size="10.5" '
            f'fill="{EDGE_COLORS[arrow.color]}">{escape(arrow.label)}</text></g>'
        )
    for box in boxes:
        x, y = coords[box.key]
        fill, stroke = ROLE_COLORS.get(box.kind, "#f3f4f6"), ROLE_STROKES.get(box.kind, "#6b7280")
        dash = ' stroke-dasharray="4 3"' if box.dashed else ""
        lines = []
        for i, line in enumerate(box.lines[:3]):
            weight = ' font-weight="bold"' if i == 0 else ""
            lines.append(
                f'<text x="{x + BOX_W / 2:.1f}" y="{y + 17 + 15 * i:.1f}" text-anchor="middle"{weight}>'
                f"{escape(_clip_text(line))}</text>"
            )
        parts.append(
            f'<g class="node role-{escape(box.kind)}" data-id="{escape(box.key)}">'
            f"<title>{escape(box.title or ' · '.join(box.lines))}</title>"
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{BOX_W}" height="{BOX_H}" rx="8" fill="#ffffff"/>'
            f'<g opacity="{box.opacity:.3f}"><rect x="{x:.1f}" y="{y:.1f}" width="{BOX_W}" height="{BOX_H}" rx="8" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="1.4"{dash}/>{"".join(lines)}</g></g>'
        )
    labels = tuple(" ".join(box.lines) for box in boxes)
    return Drawing(width=width, height=height, body="".join(parts), title=title, labels=labels)


# -- plans --------------------------------------------------------------------------------------------------


def _node_details(n: int, temperature: float | None, max_tokens: int | None) -> str:
    parts = [f"n = {n}"]
    if temperature is not None:
        parts.append(f"T {temperature:g}")
    if max_tokens is not None:
        parts.append(f"≤{max_tokens} tok")
    return " · ".join(parts)


def _decision_label(stage: StageGraph) -> str:
    label = stage.decision.value.replace("_", " ")
    if stage.early_stop is not None:
        label += f", stop@{stage.early_stop}"
    return label


def plan_stage_drawing(stage: StageGraph) -> Drawing:
    """One stage of a plan: its nodes and edges, and the decision its answer nodes feed."""
    decision = "decision"
    while any(node.id == decision for node in stage.nodes):
        decision += "_"
    boxes = [
        _Box(
            key=node.id,
            lines=(node.role.value, node.model, _node_details(node.n, node.temperature, node.max_tokens)),
            kind=node.role.value,
            title=f"{node.id}: {node.role.value} {node.model} x {node.n}",
        )
        for node in stage.nodes
    ]
    boxes.append(_Box(key=decision, lines=("decision", _decision_label(stage)), kind="decision"))
    arrows = [_Arrow(src, dst) for src, dst in stage.edges]
    feeders = list(stage.answer_nodes) + [n for n in stage.nodes if n.role is Role.VERIFIER]
    arrows += [_Arrow(node.id, decision, width=1.0, opacity=0.6, dashed=True) for node in feeders]
    order = [node.id for node in stage.nodes] + [decision]
    return _render(boxes, arrows, order, f"stage {stage.stage}")


# -- probabilistic graphs -------------------------------------------------------------------------------------


def _likeliest_count(counts: Mapping[int, float]) -> tuple[int, float]:
    n, p = max(counts.items(), key=lambda item: (item[1], -item[0]))
    return n, p


def probabilistic_drawing(
    graph: ProbabilisticGraph, *, previous: ProbabilisticGraph | None = None, labelled: int = MAX_LABELLED_EDGES
) -> Drawing:
    """A probabilistic graph: slots faded by inclusion probability, edges sized by probability.

    With ``previous`` (the version before), edges that rose are green, edges that fell red, and the most
    changed edges are labelled ``before → after``; otherwise the ``labelled`` edges that stand out most
    from the median edge probability show theirs (all of them in a small graph).
    """
    diff: GraphDiff | None = previous.diff(graph) if previous is not None else None
    moved = {(c.source, c.target): c for c in diff.edge_changes} if diff else {}
    added = set(diff.added_slots) if diff else set()
    boxes = []
    for slot in graph.slots:
        p = graph.inclusion_probability(slot.id)
        n, pn = _likeliest_count(slot.count_probabilities)
        inclusion = "always" if slot.required else f"p {p:.2f}"
        count = f"n {n}" if len(slot.counts) == 1 else f"n {n} ({pn:.0%})"
        role = slot.id.split("-", 1)[0] if slot.id.startswith(slot.role.value) else slot.role.value
        boxes.append(
            _Box(
                key=slot.id,
                lines=(role, slot.model, f"{inclusion} · {count}"),
                kind=slot.role.value,
                opacity=1.0 if slot.required else 0.35 + 0.65 * p,
                title=f"{slot.id}: included with p = {p:.3f}; counts "
                + ", ".join(f"{k}: {v:.2f}" for k, v in slot.count_probabilities.items()),
                dashed=slot.id in added,
            )
        )
    if previous is not None:  # label what changed, nothing else
        ranked = [key for key in sorted(moved, key=lambda key: -abs(moved[key].delta)) if abs(moved[key].delta) >= 5e-4]
    elif len(graph.edges) <= labelled:
        ranked = [e.key for e in graph.edges]
    else:  # label the edges that stand out from the typical one (none while all are alike)
        typical = statistics.median(e.probability for e in graph.edges)
        ranked = [
            e.key for e in sorted(graph.edges, key=lambda e: -abs(e.probability - typical)) if abs(e.probability - typical) > 5e-3
        ]
    shown = set(ranked[:labelled])
    dense = len(graph.edges) > 60  # thinner, fainter edges where there are many
    arrows = []
    for edge in graph.edges:
        p = edge.probability
        change = moved.get(edge.key)
        color = "same" if change is None or abs(change.delta) < 5e-4 else ("up" if change.delta > 0 else "down")
        label = ""
        if edge.key in shown:
            label = f"{change.before:.2f}→{p:.2f}" if change is not None else f"{p:.2f}"
        title = f"{edge.source} → {edge.target}: p = {p:.3f}" + (f" (was {change.before:.3f})" if change else "")
        width, opacity = (0.4 + 2.4 * p, 0.05 + 0.55 * p) if dense else (0.6 + 4.0 * p, 0.12 + 0.8 * p)
        if color != "same":
            opacity = max(opacity, 0.8)
        arrows.append(_Arrow(edge.source, edge.target, width=width, opacity=opacity, color=color, label=label, title=title))
    return _render(boxes, arrows, [slot.id for slot in graph.slots], f"stage {graph.stage}")


# -- DOT -------------------------------------------------------------------------------------------------------


def _dot_id(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dot_attrs(**attrs: str | float) -> str:
    return "[" + ", ".join(f"{k}={_dot_id(str(v))}" for k, v in attrs.items()) + "]"


def _dot_document(name: str, clusters: Iterable[tuple[str, list[str]]]) -> str:
    lines = [
        f"digraph {_dot_id(name)} {{",
        "  rankdir=LR;",
        f"  node {_dot_attrs(shape='box', style='rounded,filled', fontname='Helvetica')};",
        f"  edge {_dot_attrs(fontname='Helvetica', fontsize=10)};",
    ]
    for index, (label, body) in enumerate(clusters):
        lines.append(f"  subgraph {_dot_id(f'cluster_{index}')} {{")
        lines.append(f"    label={_dot_id(label)};")
        lines.extend(f"    {line}" for line in body)
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def stage_graph_dot(stages: Sequence[StageGraph], name: str = "plan") -> str:
    """Graphviz DOT text of a plan's stages, one cluster per stage (node ids prefixed by the stage)."""
    clusters = []
    for stage in stages:
        body = []
        for node in stage.nodes:
            label = f"{node.role.value}\n{node.model}\n{_node_details(node.n, node.temperature, node.max_tokens)}"
            attrs = _dot_attrs(label=label, fillcolor=ROLE_COLORS[node.role.value])
            body.append(f"{_dot_id(f'{stage.stage}/{node.id}')} {attrs};")
        decision = f"{stage.stage}/decision"
        attrs = _dot_attrs(label=f"decision: {_decision_label(stage)}", fillcolor=ROLE_COLORS["decision"])
        body.append(f"{_dot_id(decision)} {attrs};")
        body.extend(f"{_dot_id(f'{stage.stage}/{s}')} -> {_dot_id(f'{stage.stage}/{t}')};" for s, t in stage.edges)
        body.extend(f"{_dot_id(f'{stage.stage}/{n.id}')} -> {_dot_id(decision)} [style=dashed];" for n in stage.answer_nodes)
        clusters.append((f"stage {stage.stage}", body))
    return _dot_document(name, clusters)


def probabilistic_dot(graphs: Sequence[ProbabilisticGraph], name: str = "graph") -> str:
    """Graphviz DOT text of probabilistic graphs (one cluster per stage); edges labelled with their
    probability, pen width growing with it."""
    clusters = []
    for graph in graphs:
        body = []
        for slot in graph.slots:
            p = graph.inclusion_probability(slot.id)
            n, _ = _likeliest_count(slot.count_probabilities)
            label = f"{slot.role.value}\n{slot.model}\n{'always' if slot.required else f'p {p:.2f}'} · n {n}"
            attrs = _dot_attrs(label=label, fillcolor=ROLE_COLORS[slot.role.value])
            body.append(f"{_dot_id(f'{graph.stage}/{slot.id}')} {attrs};")
        for edge in graph.edges:
            attrs = _dot_attrs(label=f"{edge.probability:.2f}", penwidth=f"{0.5 + 3.5 * edge.probability:.2f}")
            body.append(f"{_dot_id(f'{graph.stage}/{edge.source}')} -> {_dot_id(f'{graph.stage}/{edge.target}')} {attrs};")
        clusters.append((f"stage {graph.stage}", body))
    return _dot_document(name, clusters)


# -- PNG --------------------------------------------------------------------------------------------------------


def svg_to_png(svg: str, *, scale: float = 1.5) -> bytes:
    """Render an SVG document (one of this module's) to PNG bytes with cairosvg."""
    import cairosvg

    png = cairosvg.svg2png(bytestring=svg.encode(), scale=scale)
    assert isinstance(png, bytes)
    return png
