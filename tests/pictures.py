"""Reading back a PNG the library drew, to assert what it shows (import as ``from pictures import ...``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# matplotlib's default colour cycle: the first, second, ... series of a figure
SERIES_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def pixels(path: Path) -> np.ndarray:
    """The image as [height, width, 3] uint8 (a valid PNG, or the test fails)."""
    from matplotlib.image import imread

    assert Path(path).read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    img = imread(str(path))
    return np.round(img[..., :3] * 255).astype(np.uint8)


def colour_pixels(img: np.ndarray, hex_colour: str, tolerance: int = 8) -> int:
    """How many pixels of ``img`` have ``hex_colour`` (within ``tolerance`` per channel)."""
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
    return int((np.abs(img.astype(np.int16) - rgb).max(axis=-1) <= tolerance).sum())


def assert_draws_series(path: Path, n: int, min_pixels: int = 40) -> None:
    """The figure at ``path`` draws ``n`` series in the first ``n`` colours of the cycle, and no more."""
    img = pixels(path)
    counts = [colour_pixels(img, c) for c in SERIES_COLOURS]
    assert all(c >= min_pixels for c in counts[:n]), (path, counts)
    assert all(c < min_pixels for c in counts[n:]), (path, counts)
