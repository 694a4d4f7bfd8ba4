"""Line charts drawn with Unicode braille: pure functions, no Textual, so they are cheap to test and benchmark.

A braille cell holds 2×4 dots, so a ``w×h`` cell plot area has ``2w×4h`` pixels. Traces are drawn as connected
lines: each pixel column gets the vertical span the line covers there, filled a cell at a time, so the cost follows
the plot size, not the number of points. Each cell takes the colour of the last solid trace that touched it; a cell touched
only by dotted traces (planned trajectories) is drawn dim. Vertical markers (phase starts) fill empty cells of
their column with a thin dashed line and get a label on the row above the plot.

:func:`render_chart` returns rows of ``(text, style)`` runs, where ``style`` is a Rich style string.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

BRAILLE = 0x2800
# dot bit for (row 0..3, column 0..1) inside a cell
_DOTS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))

PALETTE = ("#4fc3f7", "#ffb74d", "#81c784", "#e57373", "#ba68c8", "#fff176", "#4db6ac", "#f06292", "#a1887f", "#90a4ae")
AXIS_STYLE = "#808080"
MARKER_STYLE = "#9e9e9e"
LABEL_STYLE = "bold #bdbdbd"

Run = tuple[str, str]  # (text, rich style)


@dataclass
class Trace:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    color: str = PALETTE[0]
    dotted: bool = False


@dataclass
class Marker:
    x: float
    label: str


@dataclass
class ChartSpec:
    traces: list[Trace] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    log_y: bool = False
    y_format: str = "g"  # "lr" for 1.0e-05 style labels
    x_label: str = "step"
    empty_text: str = "no data yet"
    legend_prefix: str = ""  # said once before the legend when every label shares it (``lr-AdamW/``)
    x_max: float | None = None  # where the x axis ends, points beyond it left out (None: at the last point)


def color_for(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def fmt_tick(value: float, kind: str) -> str:
    if not math.isfinite(value):
        return ""
    if kind == "lr":
        return f"{value:.1e}"
    if kind == "int":
        if abs(value) >= 10_000:
            return f"{value / 1000:.0f}k"
        if abs(value) >= 1000:
            return f"{value / 1000:.1f}k"
        return f"{value:.0f}"
    return f"{value:.3g}"


def _transform(ys: Sequence[float], log_y: bool) -> list[float]:
    if not log_y:
        return [y if y is not None and math.isfinite(y) else math.nan for y in ys]
    return [math.log10(y) if y is not None and math.isfinite(y) and y > 0 else math.nan for y in ys]


def _extent(values: list[float]) -> tuple[float, float] | None:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    return min(finite), max(finite)


def _pad(lo: float, hi: float) -> tuple[float, float]:
    if hi == lo:
        d = abs(lo) * 0.1 or 1.0
        return lo - d, hi + d
    d = (hi - lo) * 0.05
    return lo - d, hi + d


def _cell_masks() -> list[list[list[int]]]:
    """``_MASKS[col][r0][r1]``: the dots of rows r0..r1 (inclusive) in column ``col`` of one braille cell."""
    masks = [[[0] * 4 for _ in range(4)] for _ in range(2)]
    for col in range(2):
        for r0 in range(4):
            for r1 in range(r0, 4):
                masks[col][r0][r1] = sum(_DOTS[r][col] for r in range(r0, r1 + 1))
    return masks


_MASKS = _cell_masks()


class Canvas:
    """A braille canvas of ``width × height`` cells (``2·width × 4·height`` pixels)."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.bits = [[0] * width for _ in range(height)]
        self.solid: list[list[str | None]] = [[None] * width for _ in range(height)]
        self.dotted: list[list[str | None]] = [[None] * width for _ in range(height)]

    def polyline(self, pts: list[tuple[int, int] | None], color: str, dotted: bool) -> None:
        """Draw connected points (x ascending; ``None`` breaks the line).

        Each pixel column gets the vertical span the line covers in it, filled a cell at a time, so the cost is
        about columns × cells spanned, whatever the number of points. Dotted lines skip every third column.
        """
        spans: dict[int, list[int]] = {}

        def cover(px: int, lo: int, hi: int) -> None:
            span = spans.get(px)
            if span is None:
                spans[px] = [lo, hi]
            else:
                span[0] = min(span[0], lo)
                span[1] = max(span[1], hi)

        prev: tuple[int, int] | None = None
        for p in pts:
            if p is None:
                prev = None
                continue
            if prev is None:
                cover(p[0], p[1], p[1])
            elif abs(p[0] - prev[0]) <= 1:  # dense data: neighbouring columns, split the step between them
                a, b = (prev, p) if prev[0] <= p[0] else (p, prev)
                if a[0] == b[0]:
                    cover(a[0], min(a[1], b[1]), max(a[1], b[1]))
                else:
                    mid = (a[1] + b[1]) / 2
                    cover(a[0], int(round(min(a[1], mid))), int(round(max(a[1], mid))))
                    cover(b[0], int(round(min(b[1], mid))), int(round(max(b[1], mid))))
            else:
                (x0, y0), (x1, y1) = prev, p
                if x1 < x0:
                    (x0, y0), (x1, y1) = (x1, y1), (x0, y0)
                slope = (y1 - y0) / (x1 - x0)
                for c in range(x0, x1 + 1):
                    ya = y0 + slope * (max(c - 0.5, x0) - x0)
                    yb = y0 + slope * (min(c + 0.5, x1) - x0)
                    cover(c, int(round(min(ya, yb))), int(round(max(ya, yb))))
            prev = p
        bits, colors = self.bits, (self.dotted if dotted else self.solid)
        max_py = self.height * 4 - 1
        for px, (lo, hi) in spans.items():
            cx = px >> 1
            if not 0 <= cx < self.width or (dotted and px % 3 == 2):
                continue
            lo, hi = max(lo, 0), min(hi, max_py)
            masks = _MASKS[px & 1]
            for cy in range(lo >> 2, (hi >> 2) + 1):
                r0 = lo - cy * 4 if cy == lo >> 2 else 0
                r1 = hi - cy * 4 if cy == hi >> 2 else 3
                bits[cy][cx] |= masks[r0][r1]
                colors[cy][cx] = color


def _pixels(xs: Sequence[float], ys: list[float], xlo: float, xhi: float, ylo: float, yhi: float, pw: int, ph: int) -> list[tuple[int, int] | None]:
    """Pixel coordinates of the points (``ys`` already transformed); ``None`` where a non-finite value breaks the
    line; consecutive duplicates dropped."""
    sx = (pw - 1) / (xhi - xlo) if xhi > xlo else 0.0
    sy = (ph - 1) / (yhi - ylo) if yhi > ylo else 0.0
    out: list[tuple[int, int] | None] = []
    append = out.append
    last: tuple[int, int] | None = None
    for x, y in zip(xs, ys):
        if y != y or x != x or y in (math.inf, -math.inf):  # NaN or infinite: a break in the line
            if last is not None:
                append(None)
            last = None
            continue
        p = (int((x - xlo) * sx + 0.5), int((yhi - y) * sy + 0.5))
        if p != last:
            append(p)
            last = p
    return out


def _merge_runs(cells: list[Run]) -> list[Run]:
    out: list[Run] = []
    for text, style in cells:
        if out and out[-1][1] == style:
            out[-1] = (out[-1][0] + text, style)
        else:
            out.append((text, style))
    return out


def _cut(trace: Trace, x_max: float) -> Trace:
    """``trace`` without its points beyond ``x_max`` (its steps ascend)."""
    if not len(trace.xs) or trace.xs[-1] <= x_max:
        return trace
    n = bisect_right(trace.xs, x_max)
    return replace(trace, xs=trace.xs[:n], ys=trace.ys[:n])


def render_chart(spec: ChartSpec, width: int, height: int) -> list[list[Run]]:
    """The chart as ``height`` rows of styled runs, each row ``width`` cells wide (legend not included)."""
    if width < 12 or height < 4:
        return [[(" " * width, "")] for _ in range(height)]
    # cut where the axis ends, so that the y range fits what is shown
    traces = spec.traces if spec.x_max is None else [_cut(t, spec.x_max) for t in spec.traces]
    ys_t = [_transform(t.ys, spec.log_y) for t in traces]
    y_ext = [e for e in (_extent(v) for v in ys_t) if e is not None]
    x_ext = [(min(t.xs), max(t.xs)) for t in traces if len(t.xs)]
    if not y_ext or not x_ext:
        msg = spec.empty_text[:width].center(width)
        blank = [(" " * width, "")]
        return [blank if i != height // 2 else [(msg, AXIS_STYLE)] for i in range(height)]
    ylo, yhi = _pad(min(e[0] for e in y_ext), max(e[1] for e in y_ext))
    xlo, xhi = min(e[0] for e in x_ext), max(e[1] for e in x_ext)
    if spec.x_max is not None and spec.x_max > xlo:
        xhi = spec.x_max  # the axis runs to where it was asked to end, even past the last point shown
    if xhi == xlo:
        xhi = xlo + 1
    plot_h = height - 2  # one row for marker labels, one for the x axis
    y_fmt = "lr" if spec.y_format == "lr" else "g"

    def y_value(row_center: float) -> float:
        v = yhi - (row_center / plot_h) * (yhi - ylo)
        return 10**v if spec.log_y else v

    label_rows = sorted({0, plot_h - 1, *range(0, plot_h - 2, 4)})
    labels = {r: fmt_tick(y_value(r + 0.5), y_fmt) for r in label_rows}
    gutter = max(len(s) for s in labels.values()) + 1
    plot_w = width - gutter
    canvas = Canvas(plot_w, plot_h)
    for trace, ys in sorted(zip(traces, ys_t), key=lambda p: not p[0].dotted):
        canvas.polyline(_pixels(trace.xs, ys, xlo, xhi, ylo, yhi, plot_w * 2, plot_h * 4), trace.color, trace.dotted)

    marker_cols: dict[int, str] = {}
    for m in spec.markers:
        if xlo <= m.x <= xhi:
            marker_cols[int(round((m.x - xlo) / (xhi - xlo) * (plot_w * 2 - 1))) >> 1] = m.label

    rows: list[list[Run]] = []
    # marker label row
    top = [" "] * plot_w
    for col, label in sorted(marker_cols.items()):
        for i, ch in enumerate(label[: max(plot_w - col, 0)]):
            top[col + i] = ch
    rows.append([(" " * gutter, ""), ("".join(top), MARKER_STYLE)])
    for r in range(plot_h):
        lab = labels.get(r)
        cells: list[Run] = [((lab.rjust(gutter - 1) + "┤") if lab else (" " * (gutter - 1) + "│"), AXIS_STYLE)]
        bits, solid, dotted = canvas.bits[r], canvas.solid[r], canvas.dotted[r]
        for c in range(plot_w):
            if bits[c]:
                color = solid[c]
                cells.append((chr(BRAILLE + bits[c]), color if color else f"dim {dotted[c]}"))
            elif c in marker_cols:
                cells.append(("┊", MARKER_STYLE))
            else:
                cells.append((" ", ""))
        rows.append(_merge_runs(cells))
    # x axis labels
    axis = [" "] * plot_w
    n_ticks = max(2, plot_w // 14)
    for i in range(n_ticks + 1):
        col = min(plot_w - 1, round(i * (plot_w - 1) / n_ticks))
        text = fmt_tick(xlo + (xhi - xlo) * col / max(plot_w - 1, 1), "int")
        start = min(max(col - len(text) // 2, 0), plot_w - len(text))
        if all(ch == " " for ch in axis[max(start - 1, 0) : start + len(text) + 1]):
            axis[start : start + len(text)] = list(text)
    rows.append([((spec.x_label[: gutter - 1]).rjust(gutter - 1) + "└", AXIS_STYLE), ("".join(axis), AXIS_STYLE)])
    return rows


def legend_rows(entries: Sequence[tuple[str, str, bool]], width: int, max_rows: int = 3, prefix: str = "") -> list[list[Run]]:
    """Legend entries ``(label, color, dotted)`` wrapped into at most ``max_rows`` rows (``prefix`` leads)."""
    rows: list[list[Run]] = []
    current: list[Run] = [(prefix + " ", LABEL_STYLE)] if prefix else []
    used = len(prefix) + 1 if prefix else 0
    for label, color, dotted in entries:
        piece = len(label) + 3
        if used and used + piece > width:
            rows.append(current)
            current, used = [], 0
            if len(rows) == max_rows:
                break
        current.append(("┈ " if dotted else "━ ", color))
        current.append((label + " ", ""))
        used += piece
    if current and len(rows) < max_rows:
        rows.append(current)
    return rows
