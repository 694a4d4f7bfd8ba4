"""Modal screens: help, the edits list (cancel pending ones), one phase in full, and the metric chooser."""

from __future__ import annotations

import time
from dataclasses import replace

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Label, Markdown, SelectionList, Static
from textual.widgets.selection_list import Selection

from fts_tui.edits import yaml_block
from fts_tui.source import RequestError, Source
from fts_tui.state import EDITS, SCHEDULE, EditInfo, RunState, changes_summary, fmt_num

HELP = """\
# fts-tui

Follows one fine-tuning run: its schedule, per-group learning rates, metrics and events. In a live
session you can queue edits to phases that have not started; the daemon applies them when the phase begins.

| key | action |
|---|---|
| `↑` `↓` | choose a phase in the schedule |
| `enter` | the phase in full: all params, scheduler, groups, edits |
| `e` | edit the chosen phase (only phases that have not started) |
| `p` | edits: pending, applied, cancelled, rejected at their transition; `c` cancels a pending one (a send the daemon refused at once is in the event log) |
| `l` | LR chart: toggle log-y |
| `t` | LR chart: toggle the planned trajectory (dotted) |
| `m` | choose the metrics to chart |
| `o` | metric chart: overlay one metric across phases, aligned at phase start |
| `z` | zoom the focused panel (again to restore) |
| `tab` | move focus between panels |
| `ctrl+p` | command palette: every action, and "edit phase N" |
| `?` `f1` | this help |
| `q` | quit (training is not affected) |

In the edit form `ctrl+r` previews the planned LR curve with the edit, `ctrl+s` sends it, `esc` closes.

**Header**: run, model, status (*stopped*: ended by `fts-daemon stop`, resumable), phase (current/last), epoch,
step, steps/s (over the last 10 s; a finished run's average, marked *avg*); then the connection: *live*,
*resyncing* (a gap in the event sequence or a restarted daemon: a fresh snapshot is on its way), *lost*
(no heartbeat: it reconnects by itself when the daemon is back), *ended* (the run finished and its daemon exited),
or *replay* (read-only).

**Schedule**: `start plan/act` is the planned start epoch (`≤` when early stopping may come first) and the
actual one; `↳` marks a scheduler carried over from an earlier phase; `✎` marks queued edits.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark,f1", "close", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-dialog"):
            yield Markdown(HELP)
        yield Footer()

    def action_close(self) -> None:
        self.dismiss(None)


def _edit_outcome(edit: EditInfo) -> str:
    if edit.status == "applied":
        return "" if edit.applied_step is None else f"step {edit.applied_step}"
    if edit.status == "rejected":
        return edit.error or ""
    return ""


class EditsScreen(ModalScreen[None]):
    """Every edit this run has seen; pending ones can be cancelled until their phase starts."""

    BINDINGS = [
        Binding("escape,q", "close", "Close"),
        Binding("c,delete", "cancel_edit", "Cancel edit"),
        Binding("r", "refresh_list", "Refresh"),
    ]

    def __init__(self, source: Source) -> None:
        super().__init__()
        self.source = source
        self._ids: list[str] = []

    def compose(self) -> ComposeResult:
        with Vertical(id="edits-dialog"):
            yield Label("Edits", id="edits-title")
            yield DataTable(id="edits-table", cursor_type="row")
            yield Static("", id="edits-status")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("id", "phase", "status", "changes", "applied at / reason")
        self.update_from(self.source.state, {EDITS})
        if not self.source.read_only:
            self.action_refresh_list()

    def update_from(self, state: RunState, dirty: set[str]) -> None:
        if EDITS not in dirty:
            return
        table = self.query_one(DataTable)
        keep = table.cursor_row
        table.clear()
        edits = sorted(state.edits.values(), key=lambda e: (not e.pending, e.created or 0.0))
        self._ids = [e.id for e in edits]
        for e in edits:
            table.add_row(e.id, str(e.phase), ("✎ " if e.pending else "") + e.status, changes_summary(e.changes), _edit_outcome(e))
        if edits:
            table.move_cursor(row=min(max(keep, 0), len(edits) - 1))
        pending = sum(e.pending for e in edits)
        note = "read-only replay" if self.source.read_only else "c: cancel the selected pending edit"
        self.query_one("#edits-status", Static).update(f"{len(edits)} edits, {pending} pending — {note}")

    def selected(self) -> EditInfo | None:
        row = self.query_one(DataTable).cursor_row
        if 0 <= row < len(self._ids):
            return self.source.state.edits.get(self._ids[row])
        return None

    def action_cancel_edit(self) -> None:
        edit = self.selected()
        if edit is None:
            return
        if self.source.read_only:
            self.notify("a replay is read-only", severity="warning")
            return
        if not edit.pending:
            self.notify(f"edit {edit.id} is {edit.status}: only queued edits can be cancelled", severity="warning")
            return
        self._cancel(edit.id)

    @work(exclusive=True, group="edits", exit_on_error=False)
    async def _cancel(self, edit_id: str) -> None:
        try:
            result = await self.source.request("cancel_edit", edit_id=edit_id)
        except RequestError as err:
            # the whole reason (it may end with what to cancel first), and into the event log like a refused send
            self.query_one("#edits-status", Static).update(f"cancel {edit_id} refused: {err}")
            self.source.state.add_log("warning", "edit", f"cancel {edit_id} refused: {err}", time.time())
            return
        record = result.get("edit", result) if isinstance(result, dict) else None
        if isinstance(record, dict) and record.get("id") is not None:  # the daemon answers with the edit record
            self.source.state.store_edit(EditInfo.from_dict(record))
        elif (old := self.source.state.edits.get(edit_id)) is not None:
            self.source.state.store_edit(replace(old, status="cancelled"))
        self.notify(f"edit {edit_id} cancelled")

    @work(exclusive=True, group="edits-list", exit_on_error=False)
    async def action_refresh_list(self) -> None:
        try:
            result = await self.source.request("list_edits")
        except RequestError as err:
            self.query_one("#edits-status", Static).update(f"could not list edits: {err}")
            return
        items = result.get("edits", []) if isinstance(result, dict) else result or []
        for item in items:
            self.source.state.store_edit(EditInfo.from_dict(item))

    def action_close(self) -> None:
        self.dismiss(None)


def phase_markdown(state: RunState, phase: int) -> str:
    p = state.phase_info(phase)
    if p is None:
        return f"# Phase {phase}\n\nnot in the schedule"
    plan_epoch, exact = state.planned_start_epoch(phase)
    actual = state.actual_start_epoch(phase)
    sched, here = state.scheduler_in_force(phase)
    groups = state.groups_for(phase)
    lines = [
        f"# Phase {phase} — {state.phase_state(p)}",
        "",
        f"- **lr** (new groups): {'–' if p.lr is None else fmt_num(p.lr)}",
        f"- **max_transition_epoch**: {p.max_transition_epoch}",
        f"- **start**: planned {'–' if plan_epoch is None else ('' if exact else '≤ ') + str(plan_epoch)}, "
        f"actual {'–' if actual is None else actual}",
        f"- **scheduler in force**: {sched}" + ("" if here else " (carried over)"),
        f"- **param groups after it starts** ({len(groups)}): {', '.join(groups) or 'unknown'}",
    ]
    if p.new_lr_scheduler:
        lines += ["", "## new_lr_scheduler", "", "```yaml", yaml_block(p.new_lr_scheduler), "```"]
    if p.new_optimizer:
        lines += ["", "## new_optimizer", "", "```yaml", yaml_block(p.new_optimizer), "```"]
    edits = [e for e in state.edits.values() if e.phase == phase]
    if edits:
        lines += ["", "## Edits", ""] + [f"- `{e.id}` {e.status}: {changes_summary(e.changes)}" for e in edits]
    lines += ["", f"## Params ({len(p.params)})", ""] + [f"- `{name}`" for name in p.params]
    return "\n".join(lines)


class PhaseScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,enter", "close", "Close"), Binding("e", "edit", "Edit phase")]

    def __init__(self, source: Source, phase: int) -> None:
        super().__init__()
        self.source = source
        self.phase = phase

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="phase-dialog"):
            yield Markdown(phase_markdown(self.source.state, self.phase), id="phase-md")
        yield Footer()

    def update_from(self, state: RunState, dirty: set[str]) -> None:
        if dirty & {SCHEDULE, EDITS}:
            self.query_one("#phase-md", Markdown).update(phase_markdown(state, self.phase))

    def action_edit(self) -> None:
        self.dismiss(None)
        self.app.call_later(self.app.run_action, f"edit_phase({self.phase})")

    def action_close(self) -> None:
        self.dismiss(None)


class MetricPicker(ModalScreen[list[str] | None]):
    BINDINGS = [Binding("escape,enter", "done", "Done", priority=True)]  # space toggles

    def __init__(self, names: list[str], chosen: list[str], stages: dict[str, str]) -> None:
        super().__init__()
        self.names, self.chosen, self.stages = names, chosen, stages

    def compose(self) -> ComposeResult:
        with Vertical(id="metrics-dialog"):
            yield Label("Metrics to chart (space toggles, enter closes)")
            yield SelectionList[str](
                *(Selection(f"{n} ({self.stages.get(n, '?')})", n, n in self.chosen) for n in self.names), id="metrics-list"
            )
        yield Footer()

    def action_done(self) -> None:
        selected = set(self.query_one(SelectionList).selected)
        self.dismiss([n for n in self.names if n in selected])
