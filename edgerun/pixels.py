"""The one pixel normaliser: training, calibration, the benchmarks and the bundle's runtime all call it.

uint8 NCHW -> float32 NCHW: scaled to [0, 1] (``scale`` = 1/255), then standardised per channel,
``(x - mean) / std``, float32 throughout. The scale is applied as a division by ``1 / scale``
(255 for 1/255), not as a multiplication: x * float32(1/255) differs from x / 255 in the last bit
for 126 of the 256 pixel values, and training has always divided, so a model deployed sees the
bit-identical input it was trained, calibrated and checked on. (float32(1 / scale) is exactly 255
for the 1/255 a manifest stores: the double's error is far below float32's rounding.)
"""
from __future__ import annotations

import numpy as np

DEFAULT_SCALE = 1 / 255


def normalise(images: np.ndarray, mean, std, scale: float = DEFAULT_SCALE) -> np.ndarray:
    """uint8 NCHW -> float32 NCHW: ``images / (1 / scale)``, then ``(x - mean) / std`` per channel."""
    x = np.asarray(images).astype(np.float32) / np.float32(1.0 / scale)
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return (x - m) / s
