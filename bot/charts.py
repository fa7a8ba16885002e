"""A bar chart as a PNG, in plain Python (zlib): the sweep's validation top-1 by trial,
posted in the run's thread. The bot process has no plotting library (matplotlib is in
the train extra), and a few bars need none."""
from __future__ import annotations

import struct
import zlib

BACKGROUND, AXIS, BAR, WINNER, MISSING = (255, 255, 255), (97, 96, 97), (54, 197, 240), (46, 182, 125), (221, 221, 221)


def _png(pixels: list[bytearray], width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def bar_chart_png(values: list[float | None], winner: int | None = None, *, height: int = 240,
                  bar: int = 48, gap: int = 24) -> bytes:
    """One bar per value, left to right; the axis starts just under the lowest value so
    small differences show. ``winner`` (an index) is drawn green; a missing value is a
    short grey stub."""
    n = max(len(values), 1)
    width = gap + n * (bar + gap)
    pixels = [bytearray(BACKGROUND * width) for _ in range(height)]
    known = [v for v in values if v is not None]
    lo, hi = (min(known), max(known)) if known else (0.0, 1.0)
    span = max(hi - lo, 1e-6)
    floor = lo - span * 0.25          # the lowest bar still has a quarter of the height above the axis
    top, base = 12, height - 12
    for i, v in enumerate(values):
        h = 4 if v is None else max(4, int((base - top) * (v - floor) / (hi - floor + 1e-12)))
        colour = MISSING if v is None else WINNER if i == winner else BAR
        x0 = gap + i * (bar + gap)
        for y in range(base - h, base):
            pixels[y][3 * x0:3 * (x0 + bar)] = bytes(colour) * bar
    for x in range(width):
        pixels[base][3 * x:3 * x + 3] = bytes(AXIS)
    return _png(pixels, width, height)
