"""The event log: transitions, scheduler reinits, edits and their fate, warnings, errors, connection changes."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import RichLog

from fts_tui.state import RunState
from fts_tui.views import log_line


class EventLog(RichLog):
    def __init__(self, *, max_lines: int = 1000, id: str | None = None) -> None:
        super().__init__(max_lines=max_lines, wrap=True, markup=False, highlight=False, auto_scroll=True, id=id)
        self._shown_total = 0
        self._shown_epoch = -1
        self.entries: list[str] = []  # plain text of what is shown (tests)

    def update_from(self, state: RunState) -> None:
        if state.log_epoch != self._shown_epoch:
            self.clear()
            self.entries.clear()
            self._shown_epoch, self._shown_total = state.log_epoch, state.log_total - len(state.log)
        new = state.log_total - self._shown_total
        if new <= 0:
            return
        for entry in list(state.log)[-min(new, len(state.log)) :]:
            line = Text.assemble(*log_line(entry.ts, entry.step, entry.level, entry.kind, entry.text))
            self.write(line)
            self.entries.append(line.plain)
        if self.max_lines and len(self.entries) > self.max_lines:
            del self.entries[: -self.max_lines]
        self._shown_total = state.log_total
