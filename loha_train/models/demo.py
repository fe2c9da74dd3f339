"""The demo model's world: drawing coloured shapes, their captions, and a measure of a concept in generated images."""

# The demo model (builtin:tiny-sd) is trained by scripts/build_demo_model.py on images drawn here: red, green,
# blue and yellow circles, squares and triangles on white, black or gray. The quickstart teaches it a concept it
# has never seen (a purple star). `concept_measure` scores generated images for such a concept without a neural
# network: the fraction of pixels in the target colour (a hue band) and a shape score from the geometry of the
# largest blob of that colour (how much of its bounding box and of its convex hull it fills).

from __future__ import annotations

import colorsys
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Caption words -> RGB. The first four (and the three shapes) are what the demo model was trained on.
RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (150, 40, 210),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
TRAIN_COLOURS = ("red", "green", "blue", "yellow")
TRAIN_SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("white", "black", "gray")
# Hue bands (degrees) that count as each colour, for pixels that are saturated and bright enough.
HUES: dict[str, tuple[float, float]] = {
    "red": (-20.0, 20.0),
    "yellow": (35.0, 70.0),
    "green": (90.0, 170.0),
    "blue": (200.0, 250.0),
    "purple": (255.0, 320.0),
}
# Ideal (extent, solidity): blob area / bounding-box area, blob area / convex-hull area.
SHAPE_FEATURES: dict[str, tuple[float, float]] = {
    "square": (1.0, 1.0),
    "circle": (math.pi / 4, 1.0),
    "triangle": (0.5, 1.0),
    "star": (0.38, 0.56),
}


def star_points(
    cx: float, cy: float, radius: float, inner: float = 0.45, angle: float = 0.0
) -> list[tuple[float, float]]:
    """A five-pointed star's ten corners, the first point up (rotated by `angle` radians)."""
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * inner
        a = angle - math.pi / 2 + k * math.pi / 5
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill: tuple[int, int, int]
) -> None:
    """Draw `shape` (circle, square, triangle, star) filling the square `box` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    elif shape == "star":
        draw.polygon(star_points((x0 + x1) / 2, (y0 + y1) / 2 + (y1 - y0) * 0.05, (x1 - x0) / 2), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def shape_image(
    colour: str | tuple[int, int, int],
    shape: str,
    background: str | tuple[int, int, int],
    side: int,
    rng: random.Random,
) -> Image.Image:
    """One `side` x `side` image of a shape of random size (40-80 % of the side) at a random position."""
    fill = RGB[colour] if isinstance(colour, str) else colour
    image = Image.new("RGB", (side, side), RGB[background] if isinstance(background, str) else background)
    size = rng.uniform(0.4, 0.8) * side
    x0, y0 = rng.uniform(1, side - size - 1), rng.uniform(1, side - size - 1)
    draw_shape(ImageDraw.Draw(image), shape, (x0, y0, x0 + size, y0 + size), fill)
    return image


def caption(colour: str, shape: str, background: str) -> str:
    """The demo captions' one form, as in builtin:shapes."""
    return f"a {colour} {shape} on a {background} background"


# ------------------------------------------------------------------------------------------------ measure
@dataclass(frozen=True)
class ConceptScore:
    """Mean over images: `colour` = fraction of pixels in the target colour, `shape` = shape score in [0, 1]."""

    colour: float
    shape: float

    @property
    def total(self) -> float:
        return (self.colour + self.shape) / 2


def colour_mask(image: Image.Image | np.ndarray, colour: str) -> np.ndarray:
    """Pixels whose hue lies in `colour`'s band, with saturation > 0.35 and value > 0.3."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32) / 255
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    top, low = pixels.max(axis=-1), pixels.min(axis=-1)
    span = np.maximum(top - low, 1e-6)
    hue = np.where(top == r, ((g - b) / span) % 6, np.where(top == g, (b - r) / span + 2, (r - g) / span + 4)) * 60
    lo, hi = HUES[colour]
    if lo < 0:  # a band across 0 degrees (red)
        hue = np.where(hue > 180, hue - 360, hue)
    sat = (top - low) / np.maximum(top, 1e-6)
    return (hue >= lo) & (hue <= hi) & (sat > 0.35) & (top > 0.3)


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask."""
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    height, width = mask.shape
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        blob, queue = [], deque([start])
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            blob.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(blob) > len(best):
            best = blob
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best, strict=True)
        out[list(ys), list(xs)] = True
    return out


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D points (Andrew's monotone chain, then the shoelace formula)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def half(seq: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        chain: list[tuple[float, float]] = []
        for p in seq:
            while len(chain) >= 2:
                (ax, ay), (bx, by) = chain[-2], chain[-1]
                if (bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax) > 0:
                    break
                chain.pop()
            chain.append(p)
        return chain

    hull = half(pts)[:-1] + half(pts[::-1])[:-1]
    xs, ys = np.array([p[0] for p in hull]), np.array([p[1] for p in hull])
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def shape_features(blob: np.ndarray) -> tuple[float, float]:
    """(extent, solidity) of a blob: its area over its bounding box's and over its convex hull's (pixel corners)."""
    ys, xs = np.nonzero(blob)
    area = float(len(ys))
    if area == 0:
        return 0.0, 0.0
    box = float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    corners = np.concatenate([np.stack([xs + dx, ys + dy], axis=1) for dx in (0, 1) for dy in (0, 1)])
    return area / box, min(1.0, area / max(_hull_area(corners), 1.0))


def shape_score(blob: np.ndarray, shape: str, min_pixels: int = 12) -> float:
    """1 at `shape`'s ideal (extent, solidity), falling linearly to 0 at distance 0.35; 0 for a blob under
    `min_pixels` pixels (nothing drawn is no shape)."""
    if blob.sum() < min_pixels:
        return 0.0
    extent, solidity = shape_features(blob)
    ideal = SHAPE_FEATURES[shape]
    return max(0.0, 1.0 - math.hypot(extent - ideal[0], solidity - ideal[1]) / 0.35)


def classify_shape(blob: np.ndarray) -> str:
    """The shape whose ideal features are nearest to the blob's."""
    extent, solidity = shape_features(blob)
    return min(SHAPE_FEATURES, key=lambda s: math.hypot(extent - SHAPE_FEATURES[s][0], solidity - SHAPE_FEATURES[s][1]))


def concept_measure(images: Sequence[Image.Image], colour: str, shape: str) -> ConceptScore:
    """The concept measure of `images` for "a `colour` `shape`" (means over the images)."""
    colours, shapes = [], []
    for image in images:
        mask = colour_mask(image, colour)
        colours.append(float(mask.mean()))
        shapes.append(shape_score(largest_blob(mask), shape))
    return ConceptScore(float(np.mean(colours)), float(np.mean(shapes)))


def hue_of(rgb: tuple[int, int, int]) -> float:
    """Hue in degrees of an RGB triple (for documentation and tests)."""
    return colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360
