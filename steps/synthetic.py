"""Synthetic seven-segment digits: tiny labelled 28x28 data for tests and smoke runs
(no download, learnable in one epoch, deterministic for a seed)."""
from __future__ import annotations

import numpy as np

# segments: a top, b top-right, c bottom-right, d bottom, e bottom-left, f top-left, g middle
_SEGMENTS = {0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc", 5: "afgcd",
             6: "afgedc", 7: "abc", 8: "abcdefg", 9: "abcdfg"}


def make_digits(n: int, seed: int = 0, classes=range(10)) -> tuple[np.ndarray, np.ndarray]:
    """x uint8 (n,28,28), y uint8 (n,): balanced over `classes`, random position, size,
    stroke width, brightness and noise."""
    rng = np.random.default_rng(seed)
    classes = list(classes)
    y = np.array([classes[i % len(classes)] for i in range(n)], np.uint8)
    rng.shuffle(y)
    x = np.zeros((n, 28, 28), np.float32)
    for i, label in enumerate(y):
        h, w, t = rng.integers(14, 21), rng.integers(9, 15), rng.integers(2, 4)
        r, c = rng.integers(1, 28 - h), rng.integers(1, 28 - w)
        mid = r + h // 2
        boxes = {"a": (r, r + t, c, c + w), "d": (r + h - t, r + h, c, c + w),
                 "g": (mid - t // 2, mid - t // 2 + t, c, c + w),
                 "f": (r, mid + 1, c, c + t), "b": (r, mid + 1, c + w - t, c + w),
                 "e": (mid, r + h, c, c + t), "c": (mid, r + h, c + w - t, c + w)}
        for s in _SEGMENTS[int(label)]:
            r0, r1, c0, c1 = boxes[s]
            x[i, r0:r1, c0:c1] = rng.uniform(170, 255)
    x += rng.normal(0, 12, x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8), y
