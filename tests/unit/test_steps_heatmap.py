"""What a person sees in confusion.png: the shading, the counts and their colours."""
import numpy as np
from PIL import Image

from steps.heatmap import BLUES, CELL, LEFT, OFF_DIAGONAL, ON_DARK, TOP, blues, draw_confusion


def cell(img, i, j):
    """The pixels inside cell (true i, predicted j), its border left out."""
    x, y = LEFT + j * CELL, TOP + i * CELL
    return np.asarray(img.crop((x + 2, y + 2, x + CELL - 2, y + CELL - 2)))


def colours(pixels) -> set:
    return {tuple(int(v) for v in p) for p in pixels.reshape(-1, 3)}


def test_blues_runs_light_to_dark_and_clamps():
    assert blues(0.0) == BLUES[0] and blues(1.0) == BLUES[-1]
    assert blues(-3) == BLUES[0] and blues(7) == BLUES[-1]
    assert sum(blues(0.5)) < sum(blues(0.25)) < sum(blues(0.0))


def test_cells_are_shaded_by_share_and_counts_coloured_by_place(tmp_path):
    cm = np.diag([50, 40, 0, 30, 30, 30, 30, 30, 30, 30])
    cm[1, 7] = 10          # a fifth of class 1 taken for 7: a light cell with a red count
    cm[2, 2], cm[2, 5] = 3, 9   # class 2 mostly wrong: its diagonal is light with a dark count
    path = tmp_path / "confusion.png"
    draw_confusion(cm, "kNN top-1 test", path)
    img = Image.open(path).convert("RGB")
    assert img.size[0] >= 600 and img.size[1] >= 500

    full = colours(cell(img, 0, 0))          # 50 of 50 right: the darkest blue, white digits
    assert tuple(BLUES[-1]) in full and ON_DARK in full
    assert colours(cell(img, 0, 1)) == {blues(0.0)}    # nothing there: light, no text
    taken = colours(cell(img, 1, 7))
    assert blues(0.2) in taken and OFF_DIAGONAL in taken
    wrong = colours(cell(img, 2, 2))
    assert blues(0.25) in wrong and OFF_DIAGONAL not in wrong and ON_DARK not in wrong
    assert any(sum(c) < 150 for c in wrong)  # its count is drawn in dark ink
