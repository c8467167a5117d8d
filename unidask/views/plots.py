"""What the live page (:mod:`dashboard`) and the report (:mod:`report`) draw alike: axes of counts
as k/M, one colour per node, labelled axes, tables without bokeh's index column (their words and
numbers from :mod:`fmt`)."""

from __future__ import annotations

from typing import Any, Sequence

# an axis of counts as people write them: 180000 -> 180k, 1.2e6 -> 1.2M, 3e9 -> 3G (bokeh's
# numbro formats would write 1.2m, milli)
COUNT_JS = """
const a = Math.abs(tick);
for (const [suffix, scale] of [["G", 1e9], ["M", 1e6], ["k", 1e3]]) {
    if (a >= scale) return +(tick / scale).toFixed(1) + suffix;
}
return String(+tick.toFixed(2));
"""
PLAN_COLOUR = "#999999"


def colours(nodes: Sequence[str]) -> dict[str, str]:
    from bokeh.palettes import Category10_10

    return {n: Category10_10[i % 10] for i, n in enumerate(sorted(nodes))}


def figure(title: str, x_label: str, y_label: str, *, counts: str = "", name: str, **kw: Any):
    """A bokeh figure with both axes labelled; ``counts="y"`` (or ``"x"``) writes that axis as
    k/M (bokeh's default would be ``1.800e+5``)."""
    from bokeh.models import CustomJSTickFormatter
    from bokeh.plotting import figure as bokeh_figure

    f = bokeh_figure(title=title, x_axis_label=x_label, y_axis_label=y_label, name=name,
                     sizing_mode="stretch_width", height=kw.pop("height", 260), **kw)
    for axis in counts:
        getattr(f, f"{axis}axis").formatter = CustomJSTickFormatter(code=COUNT_JS)
    f.toolbar.logo = None
    return f


def legend_below(f) -> None:
    """The figure's legend under its plot, in a row: never over the data."""
    legend = f.legend[0]
    legend.orientation = "horizontal"
    legend.location = "center"
    f.add_layout(legend, "below")


def table(source, columns: Sequence[tuple[str, str, str]], name: str, height: int = 200):
    """A plain table: ``(field, title, kind)`` with kind ``"count"`` (thousands separators),
    ``"float"`` or ``"text"``; no index column, no column reordering (that needs jquery-ui, which
    bokeh does not ship, and warns in the console)."""
    from bokeh.models import CustomJS, DataTable, NumberFormatter, StringFormatter, TableColumn

    formats = {"count": NumberFormatter(format="0,0", text_align="right"),
               "float": NumberFormatter(format="0,0.0", text_align="right"),
               "text": StringFormatter()}
    t = DataTable(source=source, name=name, height=height, sizing_mode="stretch_width",
                  index_position=None, reorderable=False,
                  columns=[TableColumn(field=f, title=t, formatter=formats[k]) for f, t, k in columns])
    # bokeh redraws a table when its rows change in number only: new data of as many rows stays
    # unseen until told (its view's change is what the table listens to)
    source.js_on_change("data", CustomJS(args={"table": t}, code="table.view.change.emit()"))
    return t


def fit(rng, values: Sequence[float], lo: float = 0.0, least: float = 1.0) -> None:
    """Set a ``Range1d`` to span ``lo`` to ``max(values)`` (at least ``least``) and a little room."""
    hi = max(max(values, default=lo), lo + least)
    rng.start, rng.end = lo, hi + 0.05 * (hi - lo)


def histogram(values: Sequence[float], bins: int = 30) -> dict[str, list[float]]:
    """A quad glyph's data: the counts of ``values`` in ``bins`` equal bins."""
    import numpy as np

    if not len(values):
        return {"top": [], "left": [], "right": []}
    lo, hi = min(values), max(values)
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi if hi > lo else lo + 1e-3))
    return {"top": hist.tolist(), "left": edges[:-1].tolist(), "right": edges[1:].tolist()}
