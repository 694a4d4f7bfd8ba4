"""The fts cockpit: one screen with the run header, the schedule, LR and metric charts, and the event log.

Data flow: a :class:`~fts_tui.source.Source` (live daemon or replay) runs in an async worker and fills a
:class:`~fts_tui.state.RunState`. When the source has applied a burst of events it calls ``on_update``; the app then
asks the state what changed and redraws only those panels, inside one ``batch_update``, once the news pauses for
``COALESCE_S`` (the rest of the burst comes meanwhile; see :meth:`FtsApp.data_arrived`), or later still if the
previous frame is less than ``1/redraw_hz`` old. Nothing redraws per event, so a burst costs one frame, and it is
on screen a render after it arrived rather than after a fixed tick (a daemon sends its events in batches about
100 ms apart: about one frame per batch). A slow tick keeps the header's clock moving and serves sources that never
call ``on_update``. While the host's cores are all busy, a CPU budget spaces frames further apart
(:mod:`fts_tui.pacing`): what the cockpit computes, training loses.

Importing this module never imports torch or Lightning (tests check it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from textual import on
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.timer import Timer
from textual.widget import Widget
from textual.widgets import Footer
from textual.worker import Worker, WorkerState

from fts_tui.pacing import FramePacer, HostLoad
from fts_tui.screens import EditsScreen, HelpScreen, MetricPicker, PhaseScreen
from fts_tui.source import Source
from fts_tui.state import EDITS, LOG, LR, METRICS, PLAN, PLANNING, SCHEDULE, EditInfo, RunState
from fts_tui.views import default_metrics, header_lines, lr_chart, metric_chart
from fts_tui.widgets import Chart, EventLog, RunHeader, ScheduleTable
from fts_tui.widgets.edit_form import EditForm

# a frame waits for a burst's news to pause this long, but at most MAX_COALESCE_S after the first (see data_arrived)
COALESCE_S = 0.008
MAX_COALESCE_S = 0.04
# the header's clock (connection age, steps/s) and sources without on_update: frames come with data, not ticks
TICK_S = 0.1
MAIN_ACTIONS = {"edit_phase", "edits", "toggle_log_y", "toggle_plan", "pick_metrics", "toggle_overlay", "zoom", "help"}


class FtsApp(App[None]):
    CSS_PATH = "app.tcss"
    DEFAULT_REDRAW_HZ = 20.0  # the most frames a second (bursts of events are drawn as they arrive, not on a tick)
    TITLE = "fts-tui"
    BINDINGS = [
        Binding("e", "edit_phase", "Edit phase"),
        Binding("p", "edits", "Edits"),
        Binding("l", "toggle_log_y", "Log-y"),
        Binding("t", "toggle_plan", "Plan"),
        Binding("m", "pick_metrics", "Metrics"),
        Binding("o", "toggle_overlay", "Overlay"),
        Binding("z", "zoom", "Zoom"),
        Binding("question_mark,f1", "help", "Help", key_display="?"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(
        self,
        source: Source,
        *,
        clock: Callable[[], float] = time.monotonic,
        redraw_hz: float = DEFAULT_REDRAW_HZ,
        cpu_budget: float | None = None,
        busy: Callable[[], bool] | None = None,
    ) -> None:
        """``cpu_budget``: the share of one core to stay under while ``busy()`` (default: a :class:`HostLoad` of this
        host; ``fts-tui`` passes 3%); None draws at ``redraw_hz`` whatever the host's load."""
        super().__init__()
        self.source = source
        self.clock = clock
        self.pacer = FramePacer(1.0 / redraw_hz, cpu_budget, busy=busy or HostLoad())
        self.log_y = True
        self.show_plan = True
        self.overlay = False
        self.metric_names: list[str] | None = None  # None: the defaults, until the user chooses
        self.frames = 0  # redraws that changed something (the bench reads it)
        self._frame_at = -1e9  # time.monotonic() of the last redraw that changed something
        self._frame_timer: Timer | None = None  # a redraw scheduled by data_arrived, not yet run
        self._frame_due = 0.0  # when that redraw is due (time.monotonic())
        self._shown_titles: dict[str | None, tuple[str, str]] = {}  # per panel id: its border title and subtitle
        self._news_since: float | None = None  # time.monotonic() of the first news the scheduled frame will show
        self.after_redraw: Callable[[FtsApp], None] | None = None  # bench hook

    @property
    def redraw_interval(self) -> float:
        """The shortest time between two frames now."""
        return self.pacer.interval()

    @property
    def state(self) -> RunState:
        return self.source.state

    # ------------------------------------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        # kept as attributes: the redraw tick uses them without querying (and still works while the app closes)
        self.header = RunHeader(id="header")
        self.schedule = ScheduleTable(id="schedule")
        self.lr_chart = Chart(id="lr-chart")
        self.metric_chart = Chart(id="metric-chart")
        self.event_log = EventLog(id="log")
        yield self.header
        with Vertical(id="body"):
            yield self.schedule
            with Horizontal(id="charts"):
                yield self.lr_chart
                yield self.metric_chart
            yield self.event_log
        yield Footer()

    def on_mount(self) -> None:
        self.schedule.border_title = "schedule"
        self.event_log.border_title = "events"
        self._titles()
        self.source.on_update = self.data_arrived  # a burst of events gets its frame as soon as it is in
        self.source.pace = self.pacer.throttled
        self.run_worker(self.source.run(), name="source", group="source", exclusive=True, exit_on_error=False)
        self.set_interval(max(self.pacer.min_interval, TICK_S), self._tick)
        self.redraw()
        self.schedule.focus()

    def _titles(self) -> None:
        lr = self.lr_chart
        plan = self.state.plan
        if not self.show_plan:
            lr_subtitle = "plan hidden (t)"
        elif plan is not None:
            # a long run's plan stops at a horizon; after an edit the dotted curves are the old plan's until the
            # new one is in (tens of seconds for a long run)
            lr_subtitle = "┈ planned" + (f" to epoch {plan.horizon_epochs}" if plan.horizon_epochs is not None else "")
            lr_subtitle += " · re-planning…" if self.state.planning else " (t)"
        elif self.state.planning:
            lr_subtitle = "┈ planning…"  # the daemon simulates up to 500,000 steps: tens of seconds
        else:
            error = self.state.plan_error or ""
            lr_subtitle = error if error.startswith("no plan") or not error else f"no plan: {error}"
        self._set_titles(lr, "learning rate" + (" · log-y" if self.log_y else " · linear"), lr_subtitle)
        names = self.chosen_metrics()
        if self.overlay:
            title = f"{names[0] if names else 'metric'} by phase (aligned at phase start)"
        else:
            title = "metrics"
        self._set_titles(self.metric_chart, title, "m: choose · o: overlay")

    def _set_titles(self, widget: Widget, title: str, subtitle: str) -> None:
        """Set a panel's border title and subtitle if they changed: Textual repaints the whole widget on every
        assignment, and this runs with every frame that brings metrics."""
        if self._shown_titles.get(widget.id) != (title, subtitle):
            self._shown_titles[widget.id] = (title, subtitle)
            widget.border_title, widget.border_subtitle = title, subtitle

    def chosen_metrics(self) -> list[str]:
        return self.metric_names if self.metric_names is not None else default_metrics(self.state)

    # ------------------------------------------------------------------------------------------------ redraw

    def data_arrived(self) -> None:
        """The source applied a burst of events: draw once the burst is in, as the frame rate allows.

        A daemon's batch arrives in pieces (its I/O thread shares the GIL with training, and the source applies
        events in 10 ms slices): the frame waits until no news came for COALESCE_S, but no longer than
        MAX_COALESCE_S after the first, so that one frame shows the whole batch.
        """
        now = time.monotonic()
        if self._news_since is None:
            self._news_since = now
        due = max(min(now + COALESCE_S, self._news_since + MAX_COALESCE_S), self._frame_at + self.redraw_interval)
        if self._frame_timer is not None:
            if abs(due - self._frame_due) < 0.001:
                return  # the frame rate sets the time, not this burst (a throttled frame): the timer stands
            self._frame_timer.stop()
        self._frame_due = due
        self._frame_timer = self.set_timer(max(due - now, 0.001), self._scheduled_frame)  # Textual refuses 0

    def _scheduled_frame(self) -> None:
        self._frame_timer = None
        self._news_since = None
        self.redraw()

    def _tick(self) -> None:
        """The header's clock (connection age, rates) every tick; the panels only when no frame drew them lately
        (a source without ``on_update``, or changes that did not come as events). While the CPU budget spaces
        frames out, the header waits for them too: it shows the step, which moves with every event."""
        since_frame = time.monotonic() - self._frame_at
        if self._frame_timer is None and since_frame >= self.redraw_interval:
            self.redraw()
        elif self.pacer.throttled() is None:
            self.header.show(header_lines(self.state, self.clock(), self.source.label))

    def redraw(self, dirty: Iterable[str] | None = None) -> None:
        """Redraw the panels whose data changed since the last redraw (and those named in ``dirty``)."""
        state = self.state
        changed = state.take_dirty() | set(dirty or ())
        with self.batch_update():
            self.header.show(header_lines(state, self.clock(), self.source.label, self.pacer.throttled()))
            if changed & {SCHEDULE, EDITS, PLAN}:
                self.schedule.update_from(state)
            if changed & {LR, PLAN}:
                self.lr_chart.set_chart(*lr_chart(state, self.log_y, self.show_plan))
            if changed & {METRICS, SCHEDULE}:
                self.metric_chart.set_chart(*metric_chart(state, self.chosen_metrics(), self.overlay))
            if LOG in changed:
                self.event_log.update_from(state)
            if changed & {PLAN, PLANNING, METRICS}:
                self._titles()
            for screen in self.screen_stack[1:]:
                update = getattr(screen, "update_from", None)
                if update is not None and changed:
                    update(state, changed)
        if changed:
            self.frames += 1
            self.pacer.frame()
            self._frame_at = time.monotonic()  # frame pacing is real time, whatever clock the header shows
        if self.after_redraw is not None:
            self.after_redraw(self)

    # ------------------------------------------------------------------------------------------------ actions

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in MAIN_ACTIONS and len(self.screen_stack) > 1:
            return False  # a dialog is open: its own keys apply
        return True

    def selected_phase(self) -> int | None:
        return self.schedule.selected_phase()

    def action_edit_phase(self, phase: int | None = None) -> None:
        phase = self.selected_phase() if phase is None else phase
        if phase is None:
            self.notify("no schedule yet", severity="warning")
            return
        if self.source.read_only:
            self.notify("a replay is read-only: attach to a live run to queue edits", severity="warning")
            return
        if not self.state.editable(phase):
            info = self.state.phase_info(phase)
            what = info.state if info else "unknown"
            if self.state.finished:
                what = f"{what}, and the run is {self.state.status}"
            upcoming = [p.index for p in self.state.phases if self.state.editable(p.index)]
            hint = f" (select phase {upcoming[0]} with ↓)" if upcoming else ""
            self.notify(f"phase {phase} is {what}: only phases that have not started can be edited{hint}",
                        severity="warning")
            return
        self.push_screen(EditForm(self.source, phase), self._edit_done)

    def _edit_done(self, edit: EditInfo | None) -> None:
        if edit is not None:
            self.notify(f"edit {edit.id} queued for phase {edit.phase}")
            self.redraw()

    def action_edits(self) -> None:
        self.push_screen(EditsScreen(self.source))

    def action_toggle_log_y(self) -> None:
        self.log_y = not self.log_y
        self._titles()
        self.redraw({LR})

    def action_toggle_plan(self) -> None:
        self.show_plan = not self.show_plan
        self._titles()
        self.redraw({LR})

    def action_toggle_overlay(self) -> None:
        self.overlay = not self.overlay
        self._titles()
        self.redraw({METRICS})

    def action_pick_metrics(self) -> None:
        names = self.state.metric_names()
        if not names:
            self.notify("no metrics logged yet", severity="warning")
            return

        def chosen(result: list[str] | None) -> None:
            if result is not None:
                self.metric_names = result
                self._titles()
                self.redraw({METRICS})

        self.push_screen(MetricPicker(names, self.chosen_metrics(), dict(self.state.metric_stage)), chosen)

    def action_zoom(self) -> None:
        screen = self.screen
        if screen.maximized is not None:
            screen.minimize()
            return
        target = screen.focused or self.lr_chart
        while target is not None and target.parent is not None and not target.allow_maximize:
            target = target.parent  # type: ignore[assignment]
        if target is not None:
            screen.maximize(target)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def show_phase(self, phase: int) -> None:
        self.push_screen(PhaseScreen(self.source, phase))

    @on(ScheduleTable.PhaseChosen)
    def _phase_chosen(self, event: ScheduleTable.PhaseChosen) -> None:
        self.show_phase(event.phase)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if screen is not self.screen_stack[0]:
            return  # opened from a dialog: only the dialog's own keys apply
        yield SystemCommand("Edits", "List queued, applied, cancelled and rejected edits (cancel pending ones)", self.action_edits)
        yield SystemCommand("Toggle log-y", "Switch the LR chart between log and linear y", self.action_toggle_log_y)
        yield SystemCommand("Toggle planned trajectory", "Show or hide the planner's LR curves", self.action_toggle_plan)
        yield SystemCommand("Choose metrics", "Pick the metrics the metric chart shows", self.action_pick_metrics)
        yield SystemCommand("Overlay metric by phase", "Align one metric at each phase start", self.action_toggle_overlay)
        yield SystemCommand("Help", "Keys and what the panels show", self.action_help)
        for p in self.state.phases:
            yield SystemCommand(f"Phase {p.index} details", f"{self.state.phase_state(p)}: params, scheduler, groups, edits", _bind(self.show_phase, p.index))
            if not self.source.read_only and self.state.editable(p.index):
                yield SystemCommand(f"Edit phase {p.index}", "Queue an edit for this upcoming phase", _bind(self.action_edit_phase, p.index))

    @on(Worker.StateChanged)
    def _worker_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.name == "source" and event.state == WorkerState.ERROR:
            err = event.worker.error
            self.state.add_log("error", "connection", f"event source stopped: {type(err).__name__}: {err}")
            self.state.set_connection("lost", "source stopped")


def _bind(fn: Callable[[int], Any], arg: int) -> Callable[[], Any]:
    return lambda: fn(arg)
