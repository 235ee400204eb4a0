"""The chart as a W3C SCXML document (https://www.w3.org/TR/scxml/, null data model).

All states are children of one compound state, `sector`, which holds the global events, so
they apply in every state without 43 copies. Encodings worth knowing:

* `SectorForceState` carries its target, so it is one event per target:
  `SectorForceState.<State>` (SCXML's dotted event descriptors: a transition on
  `SectorForceState` would match them all).
* The final planner states are `<final>`, which may hold no transition. FailedUnrecoverable's
  `SectorRetryNow` (resume) therefore sits on `sector`, guarded by `In('FailedUnrecoverable')`.
* Targets decided at run time (RecoverDealIDs' return, FailedUnrecoverable's resume) are one
  transition per possible target; an SCXML interpreter takes the first in document order.
* `apply` edges are targetless transitions (the event is consumed, the state is not left).

Our annotations (group, failed, kind, deviation, path steps) are attributes in the `sfsm`
namespace, which SCXML processors ignore.
"""

from __future__ import annotations

from xml.sax.saxutils import quoteattr

from ..sealing.graph import EdgeKind
from .model import ANY, FORCE_STATE, GENERATED, TITLE, Arrow, Chart, StateView

SCXML_NS = "http://www.w3.org/2005/07/scxml"
SFSM_NS = "urn:sectorfsm:statechart"
#: Id of the compound state wrapping every sector state (not a state name: those are CamelCase).
ROOT_ID = "sector"


def _tag(name: str, attrs: dict[str, str], *, close: bool = True) -> str:
    body = "".join(f" {k}={quoteattr(v)}" for k, v in attrs.items())
    return f"<{name}{body}{'/' if close else ''}>"


def _steps(steps: list[int] | tuple[int, ...]) -> dict[str, str]:
    return {"sfsm:steps": " ".join(str(s) for s in sorted(steps))} if steps else {}


def _transition(a: Arrow, *, target: str | None, extra: dict[str, str] | None = None) -> str:
    attrs = {"event": a.event}
    attrs.update(extra or {})
    if target is not None:
        attrs["target"] = target
    if a.kind not in (EdgeKind.ON, EdgeKind.GLOBAL):
        attrs["sfsm:kind"] = a.kind
    if a.deviation is not None:
        attrs["sfsm:deviation"] = a.deviation
    attrs.update(_steps(a.steps))
    return _tag("transition", attrs)


def _state_attrs(state: StateView) -> dict[str, str]:
    attrs = {"id": state.name, "sfsm:group": state.group}
    if state.failed:
        attrs["sfsm:failed"] = "true"
    if state.visited:
        attrs["sfsm:visited"] = "true"
    return attrs


def _global_steps(chart: Chart) -> dict[tuple[str, str | None], list[int]]:
    """Path steps of global events taken from a state, keyed as the `sector` transitions."""
    steps: dict[tuple[str, str | None], list[int]] = {}
    fixed = {a.event: a.dest for a in chart.globals}
    for a in chart.arrows:
        if a.taken_global:
            key_dest = a.dest if a.event == FORCE_STATE or fixed.get(a.event) != ANY else None
            steps.setdefault((a.event, key_dest), []).extend(a.steps)
    return steps


def _global_transitions(chart: Chart) -> list[str]:
    steps = _global_steps(chart)
    out = ["<!-- Global events: accepted in every state. -->"]
    for a in chart.globals:
        if a.event == FORCE_STATE:
            out.append(f"<!-- {FORCE_STATE}.<State> moves the sector to <State>. -->")
            for state in chart.states:
                extra = {"event": f"{FORCE_STATE}.{state.name}"}
                extra.update(_steps(steps.get((a.event, state.name), [])))
                out.append(_transition(a, target=state.name, extra=extra))
        else:
            target = None if a.dest == ANY else a.dest  # no fixed target: stay
            out.append(
                _transition(a, target=target, extra=_steps(steps.get((a.event, target), [])))
            )
    return out


def to_scxml(chart: Chart) -> str:
    """The chart as an SCXML document (unique ids, every target an existing state)."""
    by_source: dict[str, list[Arrow]] = {}
    for a in chart.arrows:
        if not a.taken_global:  # drawn on `sector`'s global transitions instead
            by_source.setdefault(a.source, []).append(a)
    root_attrs = {
        "xmlns": SCXML_NS,
        "xmlns:sfsm": SFSM_NS,
        "version": "1.0",
        "datamodel": "null",
        "name": "sector_lifecycle",
        "initial": ROOT_ID,
    }
    body = [_tag("state", {"id": ROOT_ID, "initial": chart.states[0].name}, close=False)]
    inner = _global_transitions(chart)
    for state in chart.states:
        guarded = by_source.get(state.name, []) if state.final else []
        if guarded:
            inner.append(f"<!-- {state.name} is a <final>: its own events are guarded here. -->")
        for a in guarded:
            target = None if a.kind == EdgeKind.APPLY else a.dest
            inner.append(_transition(a, target=target, extra={"cond": f"In('{state.name}')"}))
    for state in chart.states:
        attrs = _state_attrs(state)
        arrows = by_source.get(state.name, [])
        if state.final:
            inner.append(_tag("final", attrs))
            continue
        if not arrows:
            inner.append(_tag("state", attrs))
            continue
        inner.append(_tag("state", attrs, close=False))
        if any(a.kind == EdgeKind.RETURN for a in arrows):
            inner.append(
                "  <!-- The engine returns to the state SectorInvalidDealIDs stored"
                " (return_state). -->"
            )
        for a in arrows:
            target = None if a.kind == EdgeKind.APPLY else a.dest
            inner.append("  " + _transition(a, target=target))
        inner.append("</state>")
    body += ["  " + line for line in inner]
    body.append("</state>")
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f"<!-- {TITLE}. {GENERATED} Do not edit. -->",
        _tag("scxml", root_attrs, close=False),
        *("  " + line for line in body),
        "</scxml>",
    ]
    return "\n".join(out) + "\n"
