"""Text renderers of a `Chart`: Mermaid (stateDiagram-v2), Graphviz DOT and PlantUML."""

from __future__ import annotations

from ..sealing.graph import EdgeKind
from .model import (
    ANY,
    ANY_FILL,
    DEVIATION,
    FAILED_FILL,
    FAILED_LINE,
    FAILED_TEXT,
    FINAL_FILL,
    GENERATED,
    LEGEND,
    LINE,
    MUTED,
    PATH,
    RUNTIME_KINDS,
    TEXT,
    TITLE,
    Arrow,
    Chart,
    StateView,
)

# Pseudo-node ids (Mermaid and PlantUML share the first); none is a state name.
_ANY_ID = "anyState"
_DOT_ANY = "__any"
_DOT_START = "__start"


def _any_id(name: str, any_id: str) -> str:
    return any_id if name == ANY else name


# -- Mermaid ---------------------------------------------------------------------------------


def _mermaid_class(state: StateView) -> tuple[str, str] | None:
    """`(class name, style)`: one class per state, as Mermaid has no reliable way to combine."""
    parts = [p for p, on in (("failed", state.failed), ("final", state.final)) if on]
    if state.visited:
        parts.append("visited")
    if not parts:
        return None
    name = parts[0] + "".join(p.capitalize() for p in parts[1:])
    fill, colour = (
        (FAILED_FILL, FAILED_TEXT)
        if state.failed
        else (FINAL_FILL, TEXT)
        if state.final
        else ("#ffffff", TEXT)
    )
    stroke = PATH if state.visited else FAILED_LINE if state.failed else TEXT
    width = "4px" if state.visited else "3px" if state.final else "1px"
    return name, f"fill:{fill},stroke:{stroke},color:{colour},stroke-width:{width}"


def to_mermaid(chart: Chart) -> str:
    """The chart as a Mermaid `stateDiagram-v2` (GitHub renders it in Markdown)."""
    out = ["stateDiagram-v2", f"    %% {TITLE}.", f"    %% {GENERATED} Do not edit."]
    # Mermaid cannot style single transitions: only the state legend applies.
    out += [f"    %% {line}" for line in LEGEND if line.startswith(("red", "double"))]
    if chart.highlighted:
        out.append("    %% blue: the highlighted path; [n] are its steps")
    classes = {s.name: c for s in chart.states if (c := _mermaid_class(s)) is not None}
    for name, style in sorted(set(classes.values())):
        out.append(f"    classDef {name} {style}")
    out.append(f'    state "any state" as {_ANY_ID}')
    out.append(f"    note right of {_ANY_ID}")
    out += [f"        {line}" for line in chart.global_notes()]
    out.append("    end note")
    out += [f"    {s.name}" for s in chart.states]
    out.append(f"    [*] --> {chart.states[0].name}")
    for a in chart.drawn():
        source, dest = _any_id(a.source, _ANY_ID), _any_id(a.dest, _ANY_ID)
        out.append(f"    {source} --> {dest}: {a.label()}")
    by_class: dict[str, list[str]] = {}
    for state, (cls, _) in classes.items():
        by_class.setdefault(cls, []).append(state)
    for cls, names in sorted(by_class.items()):
        out.append(f"    class {','.join(names)} {cls}")
    return "\n".join(out) + "\n"


# -- Graphviz DOT ----------------------------------------------------------------------------


def _attrs(**attrs: str | float) -> str:
    body = ", ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in attrs.items())
    return f" [{body}]" if body else ""


def _dot_node(state: StateView) -> str:
    attrs: dict[str, str | float] = {}
    if state.failed:
        attrs.update(fillcolor=FAILED_FILL, color=FAILED_LINE, fontcolor=FAILED_TEXT)
    elif state.final:
        attrs.update(fillcolor=FINAL_FILL, color=TEXT)
    if state.final:
        attrs["peripheries"] = 2
    if state.visited:
        attrs.update(color=PATH, penwidth=2.5)
    return f'    "{state.name}"{_attrs(**attrs)};'


def _dot_edge(chart: Chart, a: Arrow) -> str:
    attrs: dict[str, str | float] = {"label": a.label()}
    if a.kind in RUNTIME_KINDS:
        attrs["style"] = "dashed"
    elif a.source == a.dest and a.kind == EdgeKind.APPLY:
        attrs["style"] = "dotted"
    if a.steps:
        attrs.update(color=PATH, fontcolor=PATH, penwidth=2.5)
    elif chart.highlighted:
        attrs.update(color=MUTED, fontcolor=MUTED)
    elif a.deviation is not None:
        attrs.update(color=DEVIATION, fontcolor=DEVIATION)
    source, dest = _any_id(a.source, _DOT_ANY), _any_id(a.dest, _DOT_ANY)
    return f'    "{source}" -> "{dest}"{_attrs(**attrs)};'


def to_dot(chart: Chart) -> str:
    """The chart as a Graphviz DOT digraph."""
    legend = list(LEGEND)
    if chart.highlighted:
        legend.append("blue: the highlighted path; [n] are its steps")
    label = "\\n".join([TITLE, *legend])
    any_attrs = _attrs(
        shape="note",
        style="filled,dashed",
        fillcolor=ANY_FILL,
        label="\\n".join(["any state", *chart.global_notes()]),
    )
    out = [
        f"// {TITLE}.",
        f"// {GENERATED} Do not edit.",
        "digraph sector_lifecycle {",
        f'    graph [rankdir=TB, fontname="Helvetica", fontsize=12, labelloc=t, nodesep=0.35,'
        f' ranksep=0.5, label="{label}"];',
        f'    node [shape=box, style="rounded,filled", fillcolor="#ffffff", color="{LINE}",'
        f' fontcolor="{TEXT}", fontname="Helvetica", fontsize=11];',
        f'    edge [fontname="Helvetica", fontsize=9, color="{LINE}", fontcolor="{TEXT}",'
        " arrowsize=0.7];",
        f'    "{_DOT_START}" [shape=point, width=0.15, label="", fillcolor="{TEXT}"];',
        f'    "{_DOT_ANY}"{any_attrs};',
    ]
    # No clusters by group: with them Graphviz 2.43 fails ("trouble in init_rank") and
    # the layout gets much wider.
    out += [_dot_node(s) for s in chart.states]
    out.append(f'    "{_DOT_START}" -> "{chart.states[0].name}";')
    out += [_dot_edge(chart, a) for a in chart.drawn()]
    out.append("}")
    return "\n".join(out) + "\n"


# -- PlantUML --------------------------------------------------------------------------------


def _puml_colour(state: StateView) -> str:
    fill = FAILED_FILL if state.failed else FINAL_FILL if state.final else ""
    spec = [fill.upper()] if fill else []
    line = PATH if state.visited else FAILED_LINE if state.failed else ""
    if line:
        spec.append("line:" + line[1:].upper())
    if state.final or state.visited:
        spec.append("line.bold")
    if state.failed:
        spec.append("text:" + FAILED_TEXT[1:].upper())
    if not spec:
        return ""
    return " " + ("" if fill else "#") + ";".join(spec)


def _puml_arrow(chart: Chart, a: Arrow) -> str:
    style: list[str] = []
    if a.steps:
        style += [PATH.upper(), "bold"]
    elif chart.highlighted:
        style.append(MUTED.upper())
    elif a.deviation is not None:
        style.append(DEVIATION.upper())
    if a.kind in RUNTIME_KINDS:
        style.append("dashed")
    elif a.source == a.dest and a.kind == EdgeKind.APPLY:
        style.append("dotted")
    arrow = f"-[{','.join(style)}]->" if style else "-->"
    source, dest = _any_id(a.source, _ANY_ID), _any_id(a.dest, _ANY_ID)
    return f"{source} {arrow} {dest} : {a.label()}"


def to_plantuml(chart: Chart) -> str:
    """The chart as a PlantUML state diagram (`@startuml` ... `@enduml`)."""
    legend = list(LEGEND)
    if chart.highlighted:
        legend.append("blue: the highlighted path; [n] are its steps")
    out = [
        "@startuml",
        f"' {GENERATED} Do not edit.",
        f"title {TITLE}",
        "hide empty description",
        "skinparam state {",
        "  BackgroundColor #FFFFFF",
        f"  BorderColor {LINE.upper()}",
        f"  ArrowColor {LINE.upper()}",
        "}",
        "legend top left",
        *legend,
        "endlegend",
        f'state "any state" as {_ANY_ID} {ANY_FILL.upper()};line.dashed',
        f"note right of {_ANY_ID}",
        *chart.global_notes(),
        "end note",
    ]
    out += [f"state {s.name}{_puml_colour(s)}" for s in chart.states]
    out.append(f"[*] --> {chart.states[0].name}")
    out += [_puml_arrow(chart, a) for a in chart.drawn()]
    out.append("@enduml")
    return "\n".join(out) + "\n"
