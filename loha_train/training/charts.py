"""loss.png: training loss (raw and smoothed) and validation loss over steps, and the learning rate below them.

Drawn with Pillow (no plotting library at run time): each panel has ticked, labelled axes, and the legend sits
in a strip above the plot, where it cannot cover the curves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from loha_train.training.metrics import read_metrics, save_png

RAW, SMOOTH, VALIDATION, LR = (150, 170, 230), (20, 60, 200), (220, 80, 20), (40, 140, 60)
Series = list[tuple[float, float]]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round values (1, 2 or 5 x 10^k apart) covering [lo, hi]."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 5, 10)), key=lambda c: abs(math.log(c / raw)))
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _series(rows: Sequence[dict], key: str) -> Series:
    return [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), int | float) and math.isfinite(r[key])]


def _moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


class _Panel:
    """One plot area: data -> pixel mapping, axes with ticks, lines and a legend strip above it."""

    def __init__(self, draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], x: tuple[float, float],
                 y: tuple[float, float]) -> None:  # fmt: skip
        self.draw, self.box = draw, box
        self.x0, self.x1 = x if x[1] > x[0] else (x[0], x[0] + 1)
        self.y0, self.y1 = y if y[1] > y[0] else (y[0] - 0.5 * abs(y[0] or 1), y[0] + 0.5 * abs(y[0] or 1))

    def xy(self, s: float, v: float) -> tuple[float, float]:
        left, top, right, bottom = self.box
        return (left + (s - self.x0) / (self.x1 - self.x0) * (right - left),
                bottom - (v - self.y0) / (self.y1 - self.y0) * (bottom - top))  # fmt: skip

    def axes(self, y_format: str, x_labels: bool) -> None:
        left, _, right, bottom = self.box
        self.draw.rectangle(self.box, outline="black")
        for v in nice_ticks(self.y0, self.y1):
            _, y = self.xy(self.x0, v)
            self.draw.line([(left - 4, y), (left, y)], fill="black")
            self.draw.line([(left + 1, y), (right - 1, y)], fill=(235, 235, 235))
            self.draw.text((4, y - 6), format(v, y_format), fill="black")
        for s in nice_ticks(self.x0, self.x1, 6):
            x, _ = self.xy(s, self.y0)
            self.draw.line([(x, bottom), (x, bottom + 4)], fill="black")
            if x_labels:
                self.draw.text((x - 10, bottom + 6), f"{s:g}", fill="black")

    def line(self, points: Series, colour: tuple[int, int, int], width: int = 1, markers: bool = False) -> None:
        pixels = [self.xy(s, v) for s, v in points]
        if len(pixels) > 1:
            self.draw.line(pixels, fill=colour, width=width)
        if markers or len(pixels) == 1:
            for x, y in pixels:
                self.draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)

    def legend(self, entries: Sequence[tuple[str, tuple[int, int, int]]]) -> None:
        x, y = self.box[0], self.box[1] - 16
        for label, colour in entries:
            self.draw.rectangle([x, y + 3, x + 14, y + 9], fill=colour)
            self.draw.text((x + 18, y), label, fill="black")
            x += 26 + 6 * len(label)


def loss_curve_png(metrics_path: Path, out_path: Path, size: tuple[int, int] = (720, 480)) -> Path:
    """Write loss.png from the run's metrics.jsonl: loss and val_loss (top panel), lr (bottom panel)."""
    rows = read_metrics(metrics_path)
    loss, val, lr = _series(rows, "loss"), _series(rows, "val_loss"), _series(rows, "lr")
    w, h = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    steps = [s for s, _ in loss + val + lr] or [0.0, 1.0]
    x = (min(steps), max(steps))
    values = [v for _, v in loss + val] or [0.0, 1.0]
    top = _Panel(draw, (70, 28, w - 20, int(h * 0.62)), x, (min(values), max(values)))
    top.axes(".3g", x_labels=False)
    legend = []
    if loss:
        top.line(loss, RAW)
        smooth = _moving_average([v for _, v in loss], max(1, len(loss) // 20))
        top.line([(s, v) for (s, _), v in zip(loss, smooth, strict=True)], SMOOTH, width=2)
        legend += [("loss", RAW), ("loss (moving average)", SMOOTH)]
    if val:
        top.line(val, VALIDATION, width=2, markers=True)
        legend.append(("validation loss", VALIDATION))
    top.legend(legend or [("no loss logged yet", (0, 0, 0))])
    lrs = [v for _, v in lr] or [0.0, 1.0]
    bottom = _Panel(draw, (70, int(h * 0.62) + 30, w - 20, h - 36), x, (min(lrs), max(lrs)))
    bottom.axes(".1e", x_labels=True)
    bottom.line(lr, LR, width=2)
    bottom.legend([("learning rate", LR)])
    draw.text((w // 2 - 12, h - 16), "step", fill="black")
    save_png(image, out_path)
    return out_path
