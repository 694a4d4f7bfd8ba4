"""The schedule: one row per phase, updated cell by cell (stable row and column keys, no clear per tick)."""

from __future__ import annotations

from rich.text import Text
from textual.message import Message
from textual.widgets import DataTable

from fts_tui.state import RunState
from fts_tui.views import SCHEDULE_COLUMNS, Cell, schedule_rows


class ScheduleTable(DataTable):
    class PhaseChosen(Message):
        """Enter or a click on a phase row: show that phase in full."""

        def __init__(self, phase: int) -> None:
            super().__init__()
            self.phase = phase

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(cursor_type="row", zebra_stripes=False, id=id)
        self._cells: dict[int, list[Cell]] = {}
        self._order: list[int] = []

    def on_mount(self) -> None:
        for i, (name, width) in enumerate(SCHEDULE_COLUMNS):
            self.add_column(name, width=width, key=str(i))

    def update_from(self, state: RunState) -> None:
        rows = schedule_rows(state)
        order = [index for index, _ in rows]
        if order != self._order:
            keep = self.selected_phase()
            self.clear()
            for index, cells in rows:
                self.add_row(*(Text(t, style=s) for t, s in cells), key=str(index))
            self._order = order
            self._cells = dict(rows)
            if keep is not None and keep in order:
                self.move_cursor(row=order.index(keep))
            elif state.phase in order:
                self.move_cursor(row=order.index(state.phase))
            return
        for index, cells in rows:
            old = self._cells.get(index)
            for col, cell in enumerate(cells):
                if old is None or old[col] != cell:
                    self.update_cell(str(index), str(col), Text(cell[0], style=cell[1]), update_width=False)
            self._cells[index] = cells

    def selected_phase(self) -> int | None:
        if not self._order or self.cursor_row < 0 or self.cursor_row >= len(self._order):
            return None
        return self._order[self.cursor_row]

    def select_phase(self, phase: int) -> None:
        if phase in self._order:
            self.move_cursor(row=self._order.index(phase))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value is not None:
            self.post_message(self.PhaseChosen(int(event.row_key.value)))
