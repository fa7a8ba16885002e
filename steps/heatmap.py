"""The confusion matrix as a PNG heatmap, drawn with Pillow.

Each cell is shaded by its share of the true class (ColorBrewer's nine-step Blues, as in
matplotlib's "Blues") and shows its count; a count off the diagonal is red on a light cell.
Pillow rather than matplotlib: the picture is a grid of boxes and numbers, and a step's
fresh process paid about 0.8 s to import matplotlib and render one with it, most of a
refresh's evaluate step (bench/bench_ct.py). Pillow draws this in a few milliseconds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# ColorBrewer Blues, 9 classes: light to dark (matplotlib's "Blues" is made of the same)
BLUES = ((247, 251, 255), (222, 235, 247), (198, 219, 239), (158, 202, 225), (107, 174, 214),
         (66, 146, 198), (33, 113, 181), (8, 81, 156), (8, 48, 107))
INK, GRID, OFF_DIAGONAL, ON_DARK = (30, 30, 30), (120, 120, 120), (176, 0, 32), (255, 255, 255)
CELL, LEFT, TOP, GAP, BAR_W = 58, 78, 52, 28, 22


def blues(share: float) -> tuple[int, int, int]:
    """The colour of a share in [0, 1], linear between the nine steps."""
    x = min(max(float(share), 0.0), 1.0) * (len(BLUES) - 1)
    i = min(int(x), len(BLUES) - 2)
    t = x - i
    return tuple(round(a + (b - a) * t) for a, b in zip(BLUES[i], BLUES[i + 1], strict=True))


def _font(size: int):
    from PIL import ImageFont
    return ImageFont.load_default(size=size)   # bundled with Pillow: no system font needed


def draw_confusion(cm: np.ndarray, title: str, path: str | Path) -> None:
    """Write ``cm`` (true class by row, predicted by column) as a labelled heatmap."""
    from PIL import Image, ImageDraw

    n = cm.shape[0]
    row = cm.sum(1, keepdims=True)
    share = np.divide(cm, row, out=np.zeros(cm.shape, float), where=row > 0)
    grid = n * CELL
    bar_x = LEFT + grid + GAP
    width, height = bar_x + BAR_W + 90, TOP + grid + 62
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    small, normal, big = _font(13), _font(15), _font(17)

    d.text((LEFT + grid / 2, TOP / 2), title, fill=INK, font=big, anchor="mm")
    for i in range(n):
        for j in range(n):
            x, y = LEFT + j * CELL, TOP + i * CELL
            d.rectangle((x, y, x + CELL, y + CELL), fill=blues(share[i, j]))
            if cm[i, j]:
                colour = ON_DARK if share[i, j] > 0.5 else (OFF_DIAGONAL if i != j else INK)
                d.text((x + CELL / 2, y + CELL / 2), str(int(cm[i, j])), fill=colour, font=small, anchor="mm")
    d.rectangle((LEFT, TOP, LEFT + grid, TOP + grid), outline=GRID)
    for k in range(n):   # tick labels: predicted along the bottom, true down the left
        centre = k * CELL + CELL / 2
        d.text((LEFT + centre, TOP + grid + 6), str(k), fill=INK, font=normal, anchor="mt")
        d.text((LEFT - 8, TOP + centre), str(k), fill=INK, font=normal, anchor="rm")
    d.text((LEFT + grid / 2, TOP + grid + 34), "predicted digit", fill=INK, font=normal, anchor="mt")
    _vertical_text(img, (18, TOP + grid / 2), "true digit", normal)

    for y in range(grid):   # the colour bar: 1.0 at the top
        d.line((bar_x, TOP + y, bar_x + BAR_W, TOP + y), fill=blues(1 - y / (grid - 1)))
    d.rectangle((bar_x, TOP, bar_x + BAR_W, TOP + grid), outline=GRID)
    for tick in range(6):
        y = TOP + grid - tick * grid / 5
        d.line((bar_x + BAR_W, y, bar_x + BAR_W + 4, y), fill=GRID)
        d.text((bar_x + BAR_W + 8, y), f"{tick / 5:.1f}", fill=INK, font=small, anchor="lm")
    _vertical_text(img, (bar_x + BAR_W + 56, TOP + grid / 2), "share of the true class", normal)
    img.save(path, optimize=False)


def _vertical_text(img, centre: tuple[float, float], text: str, font) -> None:
    """``text`` read bottom to top, centred on ``centre``."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(text)
    label = Image.new("RGBA", (right - left + 4, bottom - top + 4), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((2 - left, 2 - top), text, fill=INK, font=font)
    label = label.rotate(90, expand=True)
    img.paste(label, (round(centre[0] - label.width / 2), round(centre[1] - label.height / 2)), label)
