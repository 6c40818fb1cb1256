"""Real GroceryStore photos for tests, read from ``../shared`` beside the repository; a missing
file is an error (not a skip), so a run without the data cannot pass silently."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

GROCERY = Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery-store" / "dataset"


def grocery_rgb(rel: str) -> np.ndarray:
    """uint8 (H, W, 3) RGB pixels of ``GROCERY / rel`` (e.g. ``train/Fruit/Kiwi/Kiwi_013.jpg``).

    Raises:
        FileNotFoundError: the photo is not there.
    """
    path = GROCERY / rel
    if not path.is_file():
        raise FileNotFoundError(f"test data missing: {path} (expected ../shared beside the repository)")
    return np.asarray(Image.open(path).convert("RGB"))
