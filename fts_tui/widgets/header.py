"""Two header rows: run, model, status, phase, epoch, step, steps/s; then connection and pending edits."""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

from fts_tui.views import Cell


class RunHeader(Widget):
    DEFAULT_CSS = """
    RunHeader { height: 2; padding: 0 1; text-wrap: nowrap; text-overflow: ellipsis; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._lines: list[list[Cell]] = [[("fts", "bold")], []]

    def show(self, lines: list[list[Cell]]) -> None:
        if lines != self._lines:
            self._lines = lines
            self.refresh()

    def render(self) -> Text:
        # each row is cut at the edge (text-wrap: nowrap), never wrapped: a wrapped first row would push the
        # connection row out of sight on a narrow terminal
        return Text("\n").join(Text.assemble(*line) for line in self._lines)

    @property
    def plain(self) -> str:
        return "\n".join("".join(text for text, _ in line) for line in self._lines)
