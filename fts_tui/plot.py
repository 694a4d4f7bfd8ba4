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
import operator
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from itertools import islice

BRAILLE = 0x2800
# dot bit for (row 0..3, column 0..1) inside a cell
_DOTS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))

PALETTE = ("#4fc3f7", "#ffb74d", "#81c784", "#e57373", "#ba68c8", "#fff176", "#4db6ac", "#f06292", "#a1887f", "#90a4ae")
AXIS_STYLE = "#808080"
MARKER_STYLE = "#9e9e9e"
LABEL_STYLE = "bold #bdbdbd"

Run = tuple[str, str]  # (text, rich style)
# traces longer than this are reduced to a few points per pixel column before drawing (see _reduce)
REDUCE_OVER = 64


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


# the ends a growing x axis takes (see live_axis_end), in tenths of a power of ten: ~10% apart, at most 17%
_AXIS_ENDS = (10, 11, 12, 13, 14, 15, 16, 18, 20, 22, 25, 28, 30, 35, 40, 45, 50, 55, 60, 70, 80, 90, 100)


def live_axis_end(last: float) -> float | None:
    """Where the x axis of a chart that is still growing ends: the first round value at or past ``last`` (``1.1``,
    ``1.2`` … ``9``, ``10`` times a power of ten), None for ``last <= 0``. An axis that ended at the newest point
    would move every point of the chart with every frame; this one stays put until the run passes its end, so a
    frame changes only the dots at the line's end (and the chart widget repaints only those rows)."""
    if not last > 0 or not math.isfinite(last):
        return None
    power = 10.0 ** math.floor(math.log10(last))
    for tenths in _AXIS_ENDS:
        end = tenths * power / 10  # exact for steps (power >= 1)
        if end >= last:
            return end
    return 10 * power  # log10 rounding put ``last`` just past 10 × power


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


# linear charts draw values beyond ±LINEAR_LIMIT at it: the span between two float64 extremes (±1.7e308) overflows
# to infinity, and the pixel scale with it
LINEAR_LIMIT = 1e300


def _transform(ys: Sequence[float], log_y: bool) -> list[float]:
    if not log_y:
        return [min(max(y, -LINEAR_LIMIT), LINEAR_LIMIT) if y is not None and math.isfinite(y) else math.nan
                for y in ys]
    return [math.log10(y) if y is not None and math.isfinite(y) and y > 0 else math.nan for y in ys]


def _extent(values: list[float]) -> tuple[float, float] | None:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    return min(finite), max(finite)


def _pad(lo: float, hi: float) -> tuple[float, float]:
    # a span too small for the pixel scale (1e-308 apart overflows it to infinity) is drawn as a flat line
    if hi - lo < 1e-200 or hi - lo <= 1e-12 * max(abs(lo), abs(hi)):
        d = abs(lo) * 0.1
        if d < 1e-200:
            d = 1.0
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
        span_lo, span_hi = _no_spans(self.width * 2)
        _cover(pts, span_lo, span_hi, None)
        self.fill(span_lo, span_hi, color, dotted)

    def fill(self, span_lo: list[int], span_hi: list[int], color: str, dotted: bool) -> None:
        """Set the dots of each pixel column's span (from :func:`_cover`)."""
        bits, colors = self.bits, (self.dotted if dotted else self.solid)
        max_py = self.height * 4 - 1
        for px in range(len(span_lo)):
            lo, hi = span_lo[px], span_hi[px]
            if lo > hi or (dotted and px % 3 == 2):
                continue
            cx = px >> 1
            lo, hi = max(lo, 0), min(hi, max_py)
            masks = _MASKS[px & 1]
            for cy in range(lo >> 2, (hi >> 2) + 1):
                r0 = lo - cy * 4 if cy == lo >> 2 else 0
                r1 = hi - cy * 4 if cy == hi >> 2 else 3
                bits[cy][cx] |= masks[r0][r1]
                colors[cy][cx] = color


def _no_spans(n_px: int) -> tuple[list[int], list[int]]:
    """Per pixel column, the lowest and highest pixel row covered: none yet (lo > hi)."""
    return [1 << 30] * n_px, [-1] * n_px


def _cover(pts: list[tuple[int, int] | None], span_lo: list[int], span_hi: list[int],
           prev: tuple[int, int] | None) -> tuple[int, int] | None:
    """Widen the spans by the line through ``pts`` (joined to ``prev``, the point drawn before them, if any); returns
    the last point. Plain lists and inline comparisons: this runs for every point drawn, every frame."""
    n_px = len(span_lo)
    for p in pts:
        if p is None:
            prev = None
            continue
        px, py = p
        if prev is None:
            if 0 <= px < n_px:
                if py < span_lo[px]:
                    span_lo[px] = py
                if py > span_hi[px]:
                    span_hi[px] = py
            prev = p
            continue
        qx, qy = prev
        prev = p
        if qx == px:
            if 0 <= px < n_px:
                lo, hi = (qy, py) if qy <= py else (py, qy)
                if lo < span_lo[px]:
                    span_lo[px] = lo
                if hi > span_hi[px]:
                    span_hi[px] = hi
            continue
        if qx > px:
            qx, qy, px, py = px, py, qx, qy
        if px - qx == 1:  # dense data: neighbouring columns, split the step between them
            mid = (qy + py) / 2
            for cx, cy in ((qx, qy), (px, py)):
                if 0 <= cx < n_px:
                    lo, hi = (round(cy), round(mid)) if cy <= mid else (round(mid), round(cy))
                    if lo < span_lo[cx]:
                        span_lo[cx] = lo
                    if hi > span_hi[cx]:
                        span_hi[cx] = hi
            continue
        slope = (py - qy) / (px - qx)
        for c in range(max(qx, 0), min(px, n_px - 1) + 1):
            ya = qy + slope * (max(c - 0.5, qx) - qx)
            yb = qy + slope * (min(c + 0.5, px) - qx)
            lo, hi = (round(ya), round(yb)) if ya <= yb else (round(yb), round(ya))
            if lo < span_lo[c]:
                span_lo[c] = lo
            if hi > span_hi[c]:
                span_hi[c] = hi
    return prev


def _pixels(xs: Sequence[float], ys: list[float], xlo: float, xhi: float, ylo: float, yhi: float, pw: int, ph: int,
            last: tuple[int, int] | None = None) -> list[tuple[int, int] | None]:
    """Pixel coordinates of the points (``ys`` already transformed); ``None`` where a non-finite value breaks the
    line; consecutive duplicates dropped (``last``: the point drawn just before these)."""
    sx = (pw - 1) / (xhi - xlo) if xhi > xlo else 0.0
    sy = (ph - 1) / (yhi - ylo) if yhi > ylo else 0.0
    out: list[tuple[int, int] | None] = []
    append = out.append
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


def _column_of(x: float, xlo: float, sx: float) -> int:
    return int((x - xlo) * sx + 0.5)  # the same rounding as _pixels


def _reducible(xs: Sequence[float], ys: Sequence[float], log_y: bool) -> bool:
    """Whether :func:`_reduce` draws this trace exactly as it is: steps finite and ascending, values all finite (and
    positive on a log axis, where the others would break the line). Checked at C speed (``sum``, ``map``)."""
    if len(xs) != len(ys) or not xs:
        return False
    try:
        if not (math.isfinite(sum(ys)) and math.isfinite(xs[0]) and math.isfinite(xs[-1])):
            return False
    except TypeError:  # None among the values
        return False
    if log_y and min(ys) <= 0:
        return False
    return all(map(operator.le, xs, islice(xs, 1, None)))


def _reduce(xs: Sequence[float], ys: Sequence[float], xlo: float, sx: float, start: int = 0,
            stop: int | None = None) -> tuple[list[float], list[float]]:
    """The points of a dense trace that decide its drawing: per pixel column, its first and last points (which join
    it to its neighbours) and its lowest and highest (its vertical span), in step order; the rest lie between and
    change no dot. A live series holds thousands of points for a few hundred columns, and the per-point work in
    :func:`_pixels` and :meth:`Canvas.polyline` was most of the TUI's CPU while following a fast run. The column
    ends are found by bisection and the extremes by ``min``/``max`` over slices, so the Python-level work follows
    the columns, not the points. Needs :func:`_reducible`. ``start`` and ``stop`` (column boundaries) take a part of
    the trace."""
    n = len(xs) if stop is None else stop
    out_x: list[float] = []
    out_y: list[float] = []
    i = start
    while i < n:
        col = _column_of(xs[i], xlo, sx)
        j = bisect_left(xs, xlo + (col + 0.5) / sx, i + 1, n)
        # the bisection's boundary is computed in floating point: settle it with the rounding _pixels uses
        while j > i + 1 and _column_of(xs[j - 1], xlo, sx) > col:
            j -= 1
        while j < n and _column_of(xs[j], xlo, sx) <= col:
            j += 1
        if j - i <= 4:
            out_x.extend(xs[i:j])
            out_y.extend(ys[i:j])
        else:
            seg = ys[i:j]
            for k in sorted({0, seg.index(min(seg)), seg.index(max(seg)), j - i - 1}):
                out_x.append(xs[i + k])
                out_y.append(seg[k])
        i = j
    return out_x, out_y


def _last_column_start(xs: Sequence[float], xlo: float, sx: float) -> int:
    """The index of the first point in the pixel column of the last one."""
    n = len(xs)
    col = _column_of(xs[-1], xlo, sx)
    i = bisect_left(xs, xlo + (col - 0.5) / sx, 0, n)
    while i > 0 and _column_of(xs[i - 1], xlo, sx) >= col:
        i -= 1
    while i < n - 1 and _column_of(xs[i], xlo, sx) < col:
        i += 1
    return i


@dataclass
class TraceSpans:
    """What :func:`_trace_spans` keeps of a trace for the next frame: the pixel spans of its points before
    ``resume`` (the start of its last pixel column), drawn on the plot ``geometry``, and the last of those points."""

    geometry: tuple[float, float, float, float, int, int, bool]
    xs: Sequence[float]
    ys: Sequence[float]
    resume: int
    lo: list[int]
    hi: list[int]
    prev: tuple[int, int] | None


def _trace_spans(xs: Sequence[float], ys: Sequence[float], geometry: tuple[float, float, float, float, int, int, bool],
                 kept: TraceSpans | None) -> tuple[list[int], list[int], TraceSpans]:
    """The pixel spans of a reducible trace (see :func:`_reduce`), and what to keep for the next frame.

    A live trace gains a few points a frame and a plan's not at all: when the plot's geometry (axes, size) is the
    same and the trace starts with the points ``kept`` was drawn from, only the points from ``kept.resume`` on are
    drawn again. Splitting a trace anywhere draws the same dots (each part keeps its columns' ends and extremes, and
    the parts are joined as neighbours), so the result equals drawing it whole. The split is kept at the start of
    the last pixel column rather than at the last point because a live Series rewrites its newest few points (they
    become a min/max pair as its stride fills): that rewrite then falls in the part drawn again, and the rest
    matches next frame."""
    xlo, xhi, ylo, yhi, pw, ph, log_y = geometry
    sx = (pw - 1) / (xhi - xlo)
    start, prev = 0, None
    if (kept is not None and kept.geometry == geometry and kept.resume <= len(xs)
            and (kept.xs is xs or (xs[: kept.resume] == kept.xs[: kept.resume]
                                   and ys[: kept.resume] == kept.ys[: kept.resume]))):
        lo, hi, start, prev = kept.lo[:], kept.hi[:], kept.resume, kept.prev
    else:
        lo, hi = _no_spans(pw)

    def draw(a: int, b: int, prev: tuple[int, int] | None) -> tuple[int, int] | None:
        rx, ry = _reduce(xs, ys, xlo, sx, a, b)
        return _cover(_pixels(rx, _transform(ry, log_y), xlo, xhi, ylo, yhi, pw, ph, last=prev), lo, hi, prev)

    resume = max(_last_column_start(xs, xlo, sx), start)
    prev = draw(start, resume, prev)
    keep = TraceSpans(geometry, xs, ys, resume, lo[:], hi[:], prev)
    draw(resume, len(xs), prev)
    return lo, hi, keep


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


def render_chart(spec: ChartSpec, width: int, height: int, kept: dict[tuple[str, str, bool], TraceSpans] | None = None
                 ) -> list[list[Run]]:
    """The chart as ``height`` rows of styled runs, each row ``width`` cells wide (legend not included).

    ``kept``: a dict the caller holds from one frame to the next; long traces leave their pixel spans in it, and
    draw only their new points next time (see :func:`_trace_spans`). The rows are the same with or without it."""
    if width < 12 or height < 4:
        return [[(" " * width, "")] for _ in range(height)]
    # cut where the axis ends, so that the y range fits what is shown
    traces = spec.traces if spec.x_max is None else [_cut(t, spec.x_max) for t in spec.traces]
    # a long trace of finite values has its extent read at C speed and is reduced to what its columns need once the
    # plot's width is known (that width depends on the y labels, hence on the extent); the others are drawn point
    # by point
    ys_t: list[list[float] | None] = []
    y_ext: list[tuple[float, float]] = []
    for t in traces:
        if len(t.xs) > REDUCE_OVER and _reducible(t.xs, t.ys, spec.log_y):
            lo, hi = min(t.ys), max(t.ys)
            y_ext.append((math.log10(lo), math.log10(hi)) if spec.log_y else (lo, hi))
            ys_t.append(None)
        else:
            ys_t.append(_transform(t.ys, spec.log_y))
            ext = _extent(ys_t[-1])
            if ext is not None:
                y_ext.append(ext)
    x_ext = [(min(t.xs), max(t.xs)) for t in traces if len(t.xs)]
    if not y_ext or not x_ext:
        msg = spec.empty_text[:width].center(width)
        blank = [(" " * width, "")]
        return [blank if i != height // 2 else [(msg, AXIS_STYLE)] for i in range(height)]
    data_lo = min(e[0] for e in y_ext)
    ylo, yhi = _pad(data_lo, max(e[1] for e in y_ext))
    if not spec.log_y and data_lo >= 0 > ylo:
        ylo = 0.0  # no room below zero for values that are never negative (LRs, losses): no negative tick labels
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
    geometry = (xlo, xhi, ylo, yhi, plot_w * 2, plot_h * 4, spec.log_y)
    drawn: dict[tuple[str, str, bool], TraceSpans] = {}
    for trace, ys in sorted(zip(traces, ys_t), key=lambda p: not p[0].dotted):
        if ys is None:
            key = (trace.label, trace.color, trace.dotted)
            lo, hi, drawn[key] = _trace_spans(trace.xs, trace.ys, geometry, None if kept is None else kept.get(key))
            canvas.fill(lo, hi, trace.color, trace.dotted)
        else:
            canvas.polyline(_pixels(trace.xs, ys, xlo, xhi, ylo, yhi, plot_w * 2, plot_h * 4), trace.color, trace.dotted)
    if kept is not None:
        kept.clear()
        kept.update(drawn)

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
