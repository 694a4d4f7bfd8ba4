"""A braille line chart (legend on top) drawn with the line API from :func:`fts_tui.plot.render_chart`.

Following a fast run, a chart gets new data every frame (about ten a second), but most frames change a row or two
of it: one more dot at the line's end, a tick label. A chart on screen therefore renders the new data at once,
compares the rows with those it shows, and asks Textual to repaint only the rows that differ (none, often), rather
than the whole widget: repainting every row of both charts was most of the TUI's CPU while following a run.
"""

from __future__ import annotations

from functools import lru_cache

from rich.segment import Segment
from rich.style import Style
from textual.geometry import Region
from textual.strip import Strip
from textual.widget import Widget

from fts_tui.plot import ChartSpec, Run, TraceSpans, legend_rows, render_chart
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
        self._runs: list[list[Run]] = []  # what the rows show, as render_chart's styled runs (compared on updates)
        self._kept: dict[tuple[str, str, bool], TraceSpans] = {}  # long traces' pixel spans from the last build
        self._rows: list[Strip] | None = None
        self._rows_size: tuple[int, int] = (0, 0)
        self._base = Style()  # the widget's style the rows were built with
        self.builds = 0  # how often the rows were rebuilt (tests and the bench read it)
        self.repainted_rows = 0  # rows handed to Textual to repaint after an update (tests and the bench read it)

    @property
    def spec(self) -> ChartSpec:
        return self._spec

    @property
    def legend(self) -> list[LegendEntry]:
        return self._legend

    def set_chart(self, spec: ChartSpec, legend: list[LegendEntry]) -> None:
        self._spec, self._legend = spec, legend
        size = (self.size.width, self.size.height)
        screen = self.screen if self._rows is not None else None
        if (screen is None or self._rows_size != size or not screen.is_active
                or screen.maximized not in (None, self) or self.rich_style != self._base):
            # not drawn yet, resized, under a dialog, hidden by a zoomed panel, or restyled (a theme): drawn whole
            # when Textual next asks
            self._rows = None
            self.refresh()
            return
        runs = self._render_runs()
        old_runs, rows = self._runs, self._rows
        changed = [y for y in range(len(runs)) if y >= len(old_runs) or runs[y] != old_runs[y]]
        if len(runs) != len(rows):
            changed.extend(range(len(runs), len(rows)))  # rows no longer drawn (render_line blanks them)
        base, styles = self._base, {}
        strips = [*rows[: len(runs)], *[Strip.blank(size[0], base)] * (len(runs) - len(rows))]  # the same length
        for y in changed:
            if y < len(runs):
                strips[y] = self._strip(runs[y], base, styles)
        self._runs, self._rows = runs, strips
        if changed:
            self.repainted_rows += len(changed)
            self.refresh(*(Region(0, y, size[0], 1) for y in changed))

    def _render_runs(self) -> list[list[Run]]:
        width, height = self.size
        legend = legend_rows([e.as_tuple() for e in self._legend], width, self._legend_max, self._spec.legend_prefix)
        body = render_chart(self._spec, width, max(height - len(legend), 0), self._kept)
        self.builds += 1
        return legend + body

    def _strip(self, row: list[Run], base: Style, styles: dict[str, Style]) -> Strip:
        segments = []
        for text, style in row:
            combined = styles.get(style)
            if combined is None:
                combined = styles[style] = base + _style(style)
            segments.append(Segment(text, combined))
        return Strip(segments).adjust_cell_length(self.size.width, base)

    def _build(self) -> list[Strip]:
        self._runs = self._render_runs()
        # the widget's style walks the DOM, and a chart holds a few colours over dozens of rows: both once per build
        self._base = base = self.rich_style
        styles: dict[str, Style] = {}
        return [self._strip(row, base, styles) for row in self._runs]

    def render_line(self, y: int) -> Strip:
        size = (self.size.width, self.size.height)
        if self._rows is None or self._rows_size != size:
            self._rows, self._rows_size = self._build(), size
        if y < len(self._rows):
            return self._rows[y]
        return Strip.blank(self.size.width, self.rich_style)

    def text_rows(self) -> list[str]:
        """The chart as plain text (tests)."""
        if self._rows is None or self._rows_size != (self.size.width, self.size.height):
            self._rows, self._rows_size = self._build(), (self.size.width, self.size.height)
        return [strip.text for strip in self._rows]
