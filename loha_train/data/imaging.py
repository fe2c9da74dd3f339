"""Images as 8-bit RGB: high-bit-depth modes (16-bit PNG/TIFF, 32-bit int and float) scaled, not clipped; first frames.

Pillow opens a 16-bit greyscale PNG or TIFF as mode "I;16" (or "I"), whose values run to 65535; its own
`convert("RGB")` clips every value above 255 to white. Here such images are scaled to 8 bits first. Animated GIFs
and multi-page TIFFs give their first frame (Pillow opens frame 0).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Pillow modes with more than 8 bits per sample, and the value that means full white in them.
_HIGH_BIT_DEPTH = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def is_high_bit_depth(image: Image.Image) -> bool:
    """True for modes that `convert("RGB")` would clip rather than scale."""
    return image.mode in _HIGH_BIT_DEPTH


def to_8bit(image: Image.Image) -> Image.Image:
    """`image` with 8 bits per sample ("L") when its mode has more; other modes are returned unchanged.

    16-bit samples are divided by 257 (65535 -> 255). Mode "I" (32-bit int) is read as 16-bit, its usual source,
    unless its values exceed 65535, then as the full unsigned 32-bit range. Mode "F" (float) is read as [0, 1]
    unless its values exceed 1, then as [0, 255]; anything outside the range is clipped.
    """
    if not is_high_bit_depth(image):
        return image
    values = np.asarray(image, dtype=np.float64)
    white = float(_HIGH_BIT_DEPTH[image.mode])
    peak = float(values.max()) if values.size else 0.0
    if image.mode == "I" and peak > 65535:
        white = float(2**32 - 1)
    elif image.mode == "F" and peak > 1.0:
        white = 255.0
    scaled = np.clip(np.rint(values * (255.0 / white)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)  # uint8 (H, W): mode "L"
