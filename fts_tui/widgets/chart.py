"""A braille line chart (legend on top) drawn with the line API from :func:`fts_tui.plot.render_chart`."""

from __future__ import annotations

from functools import lru_cache

from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip
from textual.widget import Widget

from fts_tui.plot import ChartSpec, legend_rows, render_chart
from fts_tui.views import LegendEntry


@lru_cache(maxsize=256)
def _style(text: str) -> Style:
    return Style.parse(text) if text else Style()


class Chart(Widget, can_focus=True):
    """Holds one :class:`ChartSpec`; rebuilds its rows only when the spec or the size changes."""

    DEFAULT_CSS = """
    Chart { height: 1fr; min-height: 8; }
    """

    def __init__(self, *, legend_rows: int = 2, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._spec = ChartSpec()
        self._legend: list[LegendEntry] = []
        self._legend_max = legend_rows
        self._rows: list[Strip] | None = None
        self._rows_size: tuple[int, int] = (0, 0)
        self.builds = 0  # how often the rows were rebuilt (tests and the bench read it)

    @property
    def spec(self) -> ChartSpec:
        return self._spec

    @property
    def legend(self) -> list[LegendEntry]:
        return self._legend

    def set_chart(self, spec: ChartSpec, legend: list[LegendEntry]) -> None:
        self._spec, self._legend = spec, legend
        self._rows = None
        self.refresh()

    def _build(self) -> list[Strip]:
        width, height = self.size
        legend = legend_rows([e.as_tuple() for e in self._legend], width, self._legend_max, self._spec.legend_prefix)
        body = render_chart(self._spec, width, max(height - len(legend), 0))
        self.builds += 1
        # the widget's style walks the DOM, and a chart holds a few colours over dozens of rows: both once per build
        base = self.rich_style
        styles: dict[str, Style] = {}
        strips = []
        for row in legend + body:
            segments = []
            for text, style in row:
                combined = styles.get(style)
                if combined is None:
                    combined = styles[style] = base + _style(style)
                segments.append(Segment(text, combined))
            strips.append(Strip(segments).adjust_cell_length(width, base))
        return strips

    def render_line(self, y: int) -> Strip:
        size = (self.size.width, self.size.height)
        if self._rows is None or self._rows_size != size:
            self._rows, self._rows_size = self._build(), size
        if y < len(self._rows):
            return self._rows[y]
        return Strip.blank(self.size.width, self.rich_style)

    def on_resize(self) -> None:
        self._rows = None

    def text_rows(self) -> list[str]:
        """The chart as plain text (tests)."""
        if self._rows is None or self._rows_size != (self.size.width, self.size.height):
            self._rows, self._rows_size = self._build(), (self.size.width, self.size.height)
        return [strip.text for strip in self._rows]
