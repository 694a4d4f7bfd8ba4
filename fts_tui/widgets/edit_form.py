"""The edit form: change an upcoming phase, preview the planned LRs with the change, send it to the daemon."""

from __future__ import annotations

import asyncio
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.timer import Timer
from textual.widget import Widget
from textual.widgets import Button, Footer, Input, Label, Select, Static, TextArea

from fts_tui.edits import (
    NO_SCHEDULER,
    FormError,
    FormFields,
    build_changes,
    default_init_args,
    effective_phase,
    fields_from_phase,
    group_hint,
)
from fts_tui.source import PLAN_TIMEOUT_S, RequestError, Source
from fts_tui.state import EditInfo, PlanData, RunState, changes_summary, plan_args
from fts_tui.views import plan_preview_chart
from fts_tui.widgets.chart import Chart


def _field(label: str, widget: Widget) -> Horizontal:
    """One labelled form row."""
    return Horizontal(Label(label, classes="field-label"), widget, classes="field")


class EditForm(ModalScreen[EditInfo | None]):
    """Dismisses with the queued :class:`EditInfo`, or ``None`` when closed without sending."""

    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("ctrl+s", "send", "Send", priority=True),
        Binding("ctrl+r", "preview", "Preview", priority=True),
    ]

    def __init__(self, source: Source, phase: int) -> None:
        super().__init__()
        self.source = source
        self.phase = phase
        info = effective_phase(source.state, phase)
        if info is None:
            raise ValueError(f"no phase {phase} in the schedule")
        self.phase_info = info
        self.initial = fields_from_phase(info)
        self._preview_timer: Timer | None = None
        self.preview: PlanData | None = None
        self.last_error = ""
        self.sending = False
        self.closed_reason = ""  # set once the phase has started or the run ended: nothing more can be sent

    # ------------------------------------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        state = self.source.state
        f = self.initial
        epoch, exact = state.planned_start_epoch(self.phase)
        when = "start unknown (early stopping)" if epoch is None else f"starts {'at' if exact else 'by'} epoch {epoch}"
        classes = list(self.source.schedulers())
        if f.scheduler != NO_SCHEDULER and f.scheduler not in classes:
            classes.append(f.scheduler)
        options = [(NO_SCHEDULER, NO_SCHEDULER)] + [(c.rsplit(".", 1)[-1], c) for c in classes]
        with Vertical(id="edit-dialog"):
            yield Label(f"Edit phase {self.phase} — pending, {when}", id="edit-title")
            with Horizontal(id="edit-body"):
                with VerticalScroll(id="edit-fields"):  # on a small terminal, the focused field scrolls into view
                    yield _field("lr", Input(f.lr, id="edit-lr", compact=True, placeholder="lr for the groups this phase adds"))
                    yield _field("max_transition_epoch", Input(f.max_transition_epoch, id="edit-mte", compact=True, type="integer"))
                    yield _field("scheduler class", Select(options, value=f.scheduler, allow_blank=False, id="edit-class", compact=True))
                    yield Label("init_args (YAML)", classes="field-label")
                    yield TextArea(f.init_args, id="edit-init-args", language=None, soft_wrap=True)
                    yield _field("pl_lrs_cfg (YAML)", Input(f.pl_lrs_cfg, id="edit-pl-lrs", compact=True, placeholder="{interval: epoch, name: ...}"))
                    yield _field("init_pg_lrs", Input(f.init_pg_lrs, id="edit-init-pg-lrs", compact=True, placeholder="[1e-6, 2e-6, ...]"))
                    yield Static(group_hint(state.groups_for(self.phase), f.init_pg_lrs), id="edit-groups")
                    yield Label("params (one name or regex per line)", classes="field-label")
                    yield TextArea(f.params, id="edit-params", language=None, soft_wrap=False)
                with Vertical(id="edit-side"):
                    yield Chart(id="edit-preview", legend_rows=2)
                    yield Static("", id="edit-changes")
            yield Static("", id="edit-error")
            with Horizontal(id="edit-buttons"):
                yield Button("Preview ^r", id="edit-preview-btn", compact=True)
                yield Button("Send ^s", id="edit-send", variant="primary", compact=True)
                yield Button("Cancel esc", id="edit-cancel", compact=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#edit-preview", Chart).border_title = "planned LR with this edit"
        self.query_one("#edit-lr", Input).focus()
        self._show_preview()
        self.action_preview()

    # ------------------------------------------------------------------------------------------------ fields

    def fields(self) -> FormFields:
        cls = self.query_one("#edit-class", Select).value
        return FormFields(
            lr=self.query_one("#edit-lr", Input).value,
            max_transition_epoch=self.query_one("#edit-mte", Input).value,
            scheduler=str(cls) if isinstance(cls, str) else NO_SCHEDULER,
            init_args=self.query_one("#edit-init-args", TextArea).text,
            pl_lrs_cfg=self.query_one("#edit-pl-lrs", Input).value,
            init_pg_lrs=self.query_one("#edit-init-pg-lrs", Input).value,
            params=self.query_one("#edit-params", TextArea).text,
        )

    def changes(self) -> dict[str, Any]:
        return build_changes(self.fields(), self.phase_info)

    def update_from(self, state: RunState, dirty: set[str]) -> None:
        """The app's redraw: say so at once if the phase starts (or the run ends) while the form is open."""
        if self.closed_reason or state.editable(self.phase):
            return
        why = "the run has ended" if state.finished else f"phase {self.phase} has started"
        self.closed_reason = f"{why}: it can no longer be edited (esc closes the form)"
        self.query_one("#edit-title", Label).update(f"Edit phase {self.phase} — {why}")
        self.set_error(self.closed_reason)

    def set_error(self, text: str) -> None:
        text = text or self.closed_reason  # a field becoming valid does not hide that nothing can be sent
        self.last_error = text
        self.query_one("#edit-error", Static).update(text)
        self.query_one("#edit-error").set_class(bool(text), "-shown")

    @on(Select.Changed, "#edit-class")
    def _class_changed(self, event: Select.Changed) -> None:
        area = self.query_one("#edit-init-args", TextArea)
        value = str(event.value)
        if value != NO_SCHEDULER and value != self.initial.scheduler:
            area.text = default_init_args(value)
        elif value == self.initial.scheduler:
            area.text = self.initial.init_args
        elif value == NO_SCHEDULER:
            area.text = ""
            self.query_one("#edit-pl-lrs", Input).value = ""
            self.query_one("#edit-init-pg-lrs", Input).value = ""
        self._fields_changed()

    @on(Input.Changed)
    @on(TextArea.Changed)
    def _fields_changed(self) -> None:
        self.query_one("#edit-groups", Static).update(
            group_hint(self.source.state.groups_for(self.phase), self.query_one("#edit-init-pg-lrs", Input).value)
        )
        try:
            changes = self.changes()
        except FormError as err:
            self.set_error(str(err))
            self.query_one("#edit-changes", Static).update("")
            return
        self.set_error("")
        self.query_one("#edit-changes", Static).update(f"changes: {changes_summary(changes)}")
        if self._preview_timer is not None:
            self._preview_timer.stop()
        self._preview_timer = self.set_timer(0.4, self.action_preview)

    # ------------------------------------------------------------------------------------------------ preview

    def _show_preview(self, note: str = "") -> None:
        chart = self.query_one("#edit-preview", Chart)
        spec, legend = plan_preview_chart(self.preview, self.source.state.plan)
        if note:
            spec.empty_text = note
        chart.set_chart(spec, legend)
        chart.border_subtitle = note

    def action_preview(self) -> None:
        try:
            changes = self.changes()
        except FormError as err:
            self.set_error(str(err))
            return
        self._request_preview(changes)

    @work(exclusive=True, group="edit-preview", exit_on_error=False)
    async def _request_preview(self, changes: dict[str, Any]) -> None:
        args = plan_args(self.source.state)
        if changes:
            args.update(phase=self.phase, changes=changes)
        try:
            result = await self.source.request("plan", timeout=PLAN_TIMEOUT_S, **args)
        except RequestError as err:
            self.preview = None
            # the whole reason on the error line (it wraps); the chart's border has room for a few words only
            self._show_preview("preview unavailable: the reason is below")
            self.set_error(f"preview: {err}")
            return
        self.preview = await asyncio.to_thread(PlanData.for_charts, result or {})  # off the event loop: see for_charts
        self._show_preview("" if changes else "no changes: the plan as it stands")
        if self.last_error.startswith("preview: "):  # an earlier preview's refusal no longer applies
            self.set_error("")

    # ------------------------------------------------------------------------------------------------ send

    @on(Button.Pressed, "#edit-send")
    def action_send(self) -> None:
        if self.sending:
            return
        if self.closed_reason:
            self.set_error(self.closed_reason)
            return
        try:
            changes = self.changes()
        except FormError as err:
            self.set_error(str(err))
            return
        if not changes:
            self.set_error("nothing changed: edit a field first")
            return
        self._send(changes)

    @work(exclusive=True, group="edit-send", exit_on_error=False)
    async def _send(self, changes: dict[str, Any]) -> None:
        self.sending = True
        self.set_error("sending…")
        try:
            result = await self.source.request("queue_edit", phase=self.phase, changes=changes)
        except RequestError as err:
            self.set_error(f"rejected: {err}")
            return
        except Exception as err:  # never leave the form saying "sending…" over an edit that went nowhere
            self.set_error(f"not sent: {type(err).__name__}: {err}")
            return
        except asyncio.CancelledError:  # the form closing, or (Python 3.10) the connection lost under the send
            self.set_error("not sent: the request was cancelled (connection lost?)")
            raise
        finally:
            self.sending = False
        edit = EditInfo.from_dict((result or {}).get("edit", result) or {})
        self.source.state.store_edit(edit)
        self.dismiss(edit)

    @on(Button.Pressed, "#edit-preview-btn")
    def _preview_pressed(self) -> None:
        self.action_preview()

    @on(Button.Pressed, "#edit-cancel")
    def action_close(self) -> None:
        self.dismiss(None)
