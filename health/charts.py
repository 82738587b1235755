"""Bar charts computed on the server and drawn as inline SVG by the template (no script,
no CDN: the page keeps a strict Content-Security-Policy)."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    title: str
    secondary_y: float | None = None  # top of the stacked part (e.g. cached requests)
    secondary_height: float = 0.0


@dataclass(frozen=True, slots=True)
class Tick:
    position: float
    label: str


@dataclass(frozen=True, slots=True)
class Chart:
    title: str
    width: int
    height: int
    plot_left: int
    plot_bottom: float
    plot_right: int
    bars: list[Bar]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    legend: str = ""


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is at least `value` (0 -> 1)."""
    if value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        candidate = step * 10.0**exponent
        if candidate >= value:
            return candidate
    return 10.0 ** (exponent + 1)


def count_label(value: float) -> str:
    """1,234 for whole numbers, 2.5 for a half tick."""
    return f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"


def bar_chart(
    *,
    title: str,
    days: Sequence[dt.date],
    values: Sequence[float | int | Decimal],
    secondary: Sequence[float | int | Decimal] | None = None,
    fmt: Callable[[float], str] | None = None,
    legend: str = "",
    width: int = 720,
    height: int = 200,
) -> Chart:
    """One bar per day; `secondary` (at most the value) is drawn as the bar's lower part."""
    fmt = fmt or count_label
    left, right, top, bottom = 64, 12, 12, 28
    plot_w = width - left - right
    plot_h = height - top - bottom
    numbers = [float(v) for v in values]
    ceiling = nice_ceiling(max(numbers, default=0.0))
    slot = plot_w / max(1, len(numbers))
    gap = max(1.0, slot * 0.2)
    bars = []
    for i, (day, value) in enumerate(zip(days, numbers, strict=True)):
        bar_h = plot_h * value / ceiling
        x = left + i * slot + gap / 2
        second_h = 0.0
        second_y = None
        label = f"{day.isoformat()}: {fmt(value)}"
        if secondary is not None:
            part = float(secondary[i])
            second_h = plot_h * min(part, value) / ceiling
            second_y = top + plot_h - second_h
            label += f" ({fmt(part)} {legend})" if legend else ""
        bars.append(
            Bar(
                x=round(x, 2),
                y=round(top + plot_h - bar_h, 2),
                width=round(slot - gap, 2),
                height=round(bar_h, 2),
                title=label,
                secondary_y=round(second_y, 2) if second_y is not None else None,
                secondary_height=round(second_h, 2),
            )
        )
    x_ticks = [
        Tick(position=round(left + i * slot + slot / 2, 2), label=day.strftime("%d %b"))
        for i, day in enumerate(days)
        if i % 7 == (len(days) - 1) % 7
    ]
    y_ticks = [
        Tick(position=round(top + plot_h - plot_h * f, 2), label=fmt(ceiling * f))
        for f in (0.0, 0.5, 1.0)
    ]
    return Chart(
        title=title,
        width=width,
        height=height,
        plot_left=left,
        plot_bottom=top + plot_h,
        plot_right=width - right,
        bars=bars,
        x_ticks=x_ticks,
        y_ticks=y_ticks,
        legend=legend,
    )
