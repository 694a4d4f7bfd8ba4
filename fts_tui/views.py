"""What each panel shows, computed from a :class:`~fts_tui.state.RunState` (pure: no Textual, testable alone)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from fts_tui.edits import effective_phase
from fts_tui.plot import ChartSpec, Marker, Trace, color_for, live_axis_end
from fts_tui.state import PhaseInfo, PlanData, RunState, fmt_num, scheduler_summary, summarize_params

Cell = tuple[str, str]  # (text, rich style)

EDIT_STYLE = "bold #ffb74d"
STATE_STYLE = {"done": "#9e9e9e", "current": "bold #81c784", "pending": "", "skipped": "dim"}
STATUS_STYLE = {
    "starting": "#fff176",
    "training": "bold #81c784",
    "transition": "bold #ffb74d",
    "stopping": "#ffb74d",
    "finished": "bold #4fc3f7",
    "failed": "bold #e57373",
    "dead": "bold #e57373",  # its daemon exited without recording an end (killed)
}
CONNECTION_STYLE = {
    "live": "bold #81c784",
    "connecting": "#fff176",
    "resyncing": "bold #ffb74d",
    "lost": "bold #e57373",
    "replay": "bold #4fc3f7",
    "ended": "bold #4fc3f7",
}

# (title, width): fixed widths keep a 4-phase schedule readable at 150 columns; the table scrolls when narrower
SCHEDULE_COLUMNS = (
    ("#", 2),
    ("state", 10),
    ("params", 28),
    ("lr", 7),
    ("max ep", 6),
    ("scheduler", 30),
    ("init_pg_lrs", 20),
    ("start plan/act", 14),
    ("edits", 16),
)


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


@dataclass
class LegendEntry:
    label: str
    color: str
    dotted: bool = False

    def as_tuple(self) -> tuple[str, str, bool]:
        return self.label, self.color, self.dotted


def config_names(config: Any) -> str:
    """The config file names a run was started with (the daemon sends absolute paths: one or a list)."""
    paths = [config] if isinstance(config, str) else config if isinstance(config, list) else []
    return ", ".join(PurePath(str(p)).name for p in paths if p)


def header_lines(state: RunState, now: float, source: str, throttled: float | None = None) -> list[list[Cell]]:
    """Two rows: the run, then where the data comes from and how fresh it is (``throttled``: the time between
    frames, where the CPU budget has lengthened it)."""
    run = state.run or "(no run yet)"
    model = state.info.get("model") or state.info.get("module") or ""
    first: list[Cell] = [("fts ", "bold"), (run, "bold #4fc3f7")]
    if model:
        first += [("  ", ""), (str(model), "")]
    configs = config_names(state.info.get("config"))
    if configs:
        first += [(" ", ""), (f"({configs})", "dim")]
    # a stopped run ended "finished" with reason "stopped": it is the one a user may resume
    status = "stopped" if state.status == "finished" and state.end_reason == "stopped" else state.status
    first += [("  ● ", STATUS_STYLE.get(state.status, "")), (status, STATUS_STYLE.get(state.status, ""))]
    if state.phases:
        top = state.max_depth if state.max_depth is not None else state.n_phases - 1
        first += [("  phase ", "dim"), (str(state.phase), "bold"), (f" of 0–{top}", "dim")]
    first += [("  epoch ", "dim"), ("–" if state.epoch is None else str(state.epoch), "bold")]
    first += [("  step ", "dim"), ("–" if state.step is None else str(state.step), "bold")]
    average = state.finished and state.run_rate is not None
    # while the daemon is not heard from, the last window's rate is no longer the run's: show none
    rate = state.steps_per_second() if average or state.connection not in ("lost", "ended") else None
    first += [("  ", ""), ("–" if rate is None else f"{rate:.1f}", "bold"),
              (" steps/s avg" if average else " steps/s", "dim")]
    if state.status == "failed" and state.error:
        first += [("  ", ""), (state.error[:80], "#e57373")]

    conn = state.connection
    style = CONNECTION_STYLE.get(conn, "")
    second: list[Cell] = [("◆ " if conn in ("replay", "ended") else "● ", style), (conn, style)]
    if conn == "lost":
        since = None if state.last_heard is None else max(0.0, now - state.last_heard)
        second.append((" — no heartbeat" + (f" for {since:.0f}s" if since is not None else ""), style))
    if state.connection_note:
        second.append((f" ({state.connection_note})", "dim"))
    if state.needs_resync and state.resync_reason:
        second.append((f"  resync: {state.resync_reason}", "#ffb74d"))
    second += [("  ", ""), (source, "dim")]
    if throttled is not None:
        second += [("  ", ""), (f"drawing every {throttled:.1f}s: cores busy", "dim")]
    pending = len(state.pending_edits())
    if pending:
        second += [("  ", ""), (f"✎ {pending} pending edit{'s' if pending != 1 else ''}", "bold #ffb74d")]
    return [first, second]


def init_pg_lrs_text(state: RunState, phase: PhaseInfo) -> str:
    values = (phase.new_lr_scheduler or {}).get("init_pg_lrs")
    if not values:
        return ""
    n = len(state.groups_for(phase.index))
    body = ", ".join(fmt_num(v) for v in values)
    return f"[{body}]" + (f" ({len(values)}/{n})" if n and n != len(values) else "")


def _scheduler_text(state: RunState, phase: PhaseInfo) -> tuple[str, bool]:
    """(summary, reinit in this phase) for ``phase`` as given (it may carry queued edits)."""
    if phase.index == 0 or state.reinit_lr_cfg is not None:
        return state.scheduler_in_force(phase.index)
    if phase.new_lr_scheduler:
        return scheduler_summary(phase.new_lr_scheduler), True
    return state.scheduler_in_force(phase.index - 1)[0], False


def _cell(now: str, then: str, width: int, style: str = "") -> Cell:
    """A schedule cell; ``now→then`` in the edit colour when queued edits change it."""
    if now == then:
        return clip(now, width), style
    both = f"{now}→{then}"
    if len(both) > width:
        # the edited value matters most: the current one gives up its tail first, then goes
        room = width - len(then) - 1
        both = f"{clip(now, room)}→{then}" if room >= 4 else f"→{then}"
    return clip(both, width), EDIT_STYLE


def schedule_rows(state: RunState) -> list[tuple[int, list[Cell]]]:
    """One row per phase; where queued edits change a value, the cell shows ``current→edited``."""
    rows = []
    widths = [w for _, w in SCHEDULE_COLUMNS]
    for p in state.phases:
        plan_epoch, exact = state.planned_start_epoch(p.index)
        actual = state.actual_start_epoch(p.index)
        plan_text = "–" if plan_epoch is None else (str(plan_epoch) if exact else f"≤{plan_epoch}")
        start = f"{plan_text} / {'–' if actual is None else actual}"
        pending = state.pending_edits(p.index)
        eff = (effective_phase(state, p.index) or p) if pending else p
        applied = [e for e in state.edits.values() if e.phase == p.index and e.status == "applied"]
        if pending:
            edits: Cell = (f"✎ {len(pending)} queued", EDIT_STYLE)
        elif applied:
            edits = (f"✓ applied @{applied[-1].applied_step}", "#81c784")
        else:
            edits = ("", "")
        shown = state.phase_state(p)
        sched, here = _scheduler_text(state, p)
        sched_eff, here_eff = _scheduler_text(state, eff)
        rows.append(
            (
                p.index,
                [
                    (str(p.index), "bold" if shown == "current" else ""),
                    (("▶ " if shown == "current" else "") + shown, STATE_STYLE.get(shown, "")),
                    _cell(summarize_params(p.params, widths[2]), summarize_params(eff.params, widths[2]), widths[2]),
                    _cell("–" if p.lr is None else fmt_num(p.lr), "–" if eff.lr is None else fmt_num(eff.lr), widths[3]),
                    _cell(str(p.max_transition_epoch), str(eff.max_transition_epoch), widths[4]),
                    _cell(sched if here else f"↳ {sched}", sched_eff if here_eff else f"↳ {sched_eff}", widths[5],
                          "" if here else "dim"),
                    _cell(init_pg_lrs_text(state, p), init_pg_lrs_text(state, eff), widths[6]),
                    (start, ""),
                    edits,
                ],
            )
        )
    return rows


def _markers(state: RunState, planned: bool) -> list[Marker]:
    markers = [Marker(step, f"P{phase}") for phase, step in state.phase_start_steps()]
    if planned and state.plan is not None:
        started = {phase for phase, _ in state.phase_start_steps()}
        for p in state.plan.phase_starts:
            if p.get("phase") not in started and p.get("phase") and p.get("step") is not None:
                markers.append(Marker(float(p["step"]), f"P{p['phase']}?"))
    return markers


def lr_chart(state: RunState, log_y: bool, show_plan: bool) -> tuple[ChartSpec, list[LegendEntry]]:
    traces: list[Trace] = []
    legend: list[LegendEntry] = []
    colors: dict[str, str] = {}
    for i, (tag, series) in enumerate(state.lr.items()):
        colors[tag] = color_for(i)
        xs, ys = series.points()
        traces.append(Trace(tag, xs, ys, colors[tag]))
        legend.append(LegendEntry(tag, colors[tag]))
    plan = state.plan if show_plan else None
    if plan is not None and plan.steps:
        for tag, (steps, values) in plan.chart_series().items():
            if tag not in colors:
                colors[tag] = color_for(len(colors))
                legend.append(LegendEntry(tag, colors[tag], True))
            traces.append(Trace(f"{tag} (plan)", steps, values, colors[tag], dotted=True))
        legend.append(LegendEntry("planned", "#9e9e9e", True))
    # with the plan drawn the axis is set by the plan (it does not move as the run grows); without it, it grows
    x_max = _lr_axis_end(state, plan) if plan is not None and plan.steps else _growing_axis_end(state, traces)
    spec = ChartSpec(traces=traces, markers=_markers(state, plan is not None), log_y=log_y, y_format="lr",
                     x_max=x_max)
    return spec, _shared_prefix_once(spec, legend)


def _growing_axis_end(state: RunState, traces: Sequence[Trace]) -> float | None:
    """While a live run adds points, the x axis ends at a round value past the newest (``live_axis_end``), so that
    it does not move with every frame; at the newest point (None) otherwise."""
    if state.connection != "live" or state.finished:
        return None
    ends = [t.xs[-1] for t in traces if len(t.xs) and not t.dotted]
    return live_axis_end(max(ends)) if ends else None


# how far past the next planned transition the LR chart's axis runs (so that its marker is not on the edge)
LR_AXIS_MARGIN = 1.25


def _lr_axis_end(state: RunState, plan: PlanData | None) -> float | None:
    """Where the LR chart's x axis ends while the plan is drawn: a quarter past the next planned transition (or the
    current step, if the plan has it behind), so that the run so far and the phase ahead fill the chart; a whole
    plan of many epochs would leave the steps run so far a sliver at its left edge. None (the whole plan) once no
    transition is ahead, or where that would reach the plan's end anyway."""
    if plan is None:
        return None
    ahead = [float(p["step"]) for p in plan.phase_starts
             if isinstance(p.get("phase"), int) and p["phase"] > state.phase and p.get("step") is not None]
    if not ahead:
        return None
    now = float(state.step or 0)
    end = max(now, min(ahead)) * LR_AXIS_MARGIN
    last = max(plan.steps[-1] if plan.steps else 0.0, now)
    return end if 0 < end < last else None


def _shared_prefix_once(spec: ChartSpec, legend: list[LegendEntry]) -> list[LegendEntry]:
    """When every LR tag (at least two) starts with the same ``base/``, the legend says it once, then group names."""
    tags = [e.label for e in legend if not e.label.startswith(("planned", "as planned"))]
    heads = {t.rsplit("/", 1)[0] + "/" if "/" in t else "" for t in tags}
    if len(tags) < 2 or len(heads) != 1 or not (prefix := heads.pop()):
        return legend
    spec.legend_prefix = prefix
    for e in legend:
        if e.label.startswith(prefix):
            e.label = e.label[len(prefix) :]
    return legend


def plan_preview_chart(preview: PlanData | None, current: PlanData | None, log_y: bool = True) -> tuple[ChartSpec, list[LegendEntry]]:
    """The edit form's chart: the plan with the edit (solid) over the plan as it stands (dotted)."""
    traces: list[Trace] = []
    legend: list[LegendEntry] = []
    colors: dict[str, str] = {}
    for plan, dotted in ((current, True), (preview, False)):
        if plan is None:
            continue
        for tag, (steps, values) in plan.chart_series().items():
            color = colors.setdefault(tag, color_for(len(colors)))
            traces.append(Trace(tag, steps, values, color, dotted=dotted))
            if not dotted:
                legend.append(LegendEntry(tag, color))
    if current is not None:
        legend.append(LegendEntry("as planned now", "#9e9e9e", True))
    starts = (preview or current).phase_starts if (preview or current) is not None else []
    markers = [Marker(float(p["step"]), f"P{p['phase']}") for p in starts if p.get("phase") and p.get("step") is not None]
    spec = ChartSpec(traces=traces, markers=markers, log_y=log_y, y_format="lr", empty_text="no plan yet")
    return spec, _shared_prefix_once(spec, legend)


def default_metrics(state: RunState) -> list[str]:
    names = state.metric_names()
    train = [n for n in names if state.metric_stage.get(n) == "train"][:1]
    val = [n for n in names if state.metric_stage.get(n) == "val" and "loss" in n][:1]
    return (train + val) or names[:2]


def metric_chart(state: RunState, names: Sequence[str], overlay: bool) -> tuple[ChartSpec, list[LegendEntry]]:
    names = [n for n in names if n in state.metrics]
    traces: list[Trace] = []
    legend: list[LegendEntry] = []
    if overlay:
        if not names:
            return ChartSpec(empty_text="no metrics yet"), legend
        name = names[0]
        for phase, xs, ys in state.phase_segments(state.metrics[name]):
            color = color_for(phase)
            traces.append(Trace(f"phase {phase}", xs, ys, color))
            legend.append(LegendEntry(f"{name} · phase {phase}", color))
        return ChartSpec(traces=traces, x_label="+step", empty_text="no metrics yet",
                         x_max=_growing_axis_end(state, traces)), legend
    all_names = state.metric_names()
    for name in names:
        color = color_for(all_names.index(name))
        xs, ys = state.metrics[name].points()
        traces.append(Trace(name, xs, ys, color))
        legend.append(LegendEntry(f"{name} ({state.metric_stage.get(name, '?')})", color))
    return ChartSpec(traces=traces, markers=_markers(state, False), empty_text="no metrics yet",
                     x_max=_growing_axis_end(state, traces)), legend


LEVEL_STYLE = {"info": "", "warning": "#ffb74d", "error": "bold #e57373"}
KIND_ICON = {"transition": "⇢", "scheduler": "↻", "edit": "✎", "log": "·", "state": "●", "connection": "⚡"}


def log_line(entry_ts: float | None, step: int | None, level: str, kind: str, text: str) -> list[Cell]:
    when = time.strftime("%H:%M:%S", time.localtime(entry_ts)) if entry_ts is not None else "--:--:--"
    where = f"{step:>6}" if step is not None else "      "
    return [
        (when, "dim"),
        (" ", ""),
        (where, "dim"),
        (f" {KIND_ICON.get(kind, '·')} ", LEVEL_STYLE.get(level, "")),
        (text, LEVEL_STYLE.get(level, "")),
    ]
