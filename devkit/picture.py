"""The README's picture: the demo's channel page, rendered by headless Chromium.

    ./dev.sh picture                  # runs the demo, then writes docs/img/channel.png
    python -m devkit.picture PAGE OUT # only the screenshot of an existing page

The page is screenshot tall and cut to its last ``height`` pixels of messages: the channel
as Slack shows it when opened, scrolled to the newest message. It is stored as a palette
PNG so the committed file stays small (the README's budget is 200 KB).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MAX_BYTES = 200_000
WIDTH, HEIGHT, TALL = 1000, 2400, 12000
SIDEBAR = 220   # the stand-in page's channel list, left of the messages (devkit/standin.py)
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars")


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise SystemExit("chromium is not installed: ./dev.sh setup installs Debian's chromium")
    return path


def browse(page: Path, profile: Path, *args: str, size: tuple[int, int] = (1200, 2400),
           timeout: float = 120) -> subprocess.CompletedProcess:
    """Headless Chromium on a local page with a fresh profile; raises on failure."""
    cmd = [chromium(), *FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
           *args, page.resolve().as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"chromium failed ({out.returncode}): {out.stderr[-2000:]}")
    return out


def picture(page: Path, out: Path, width: int = WIDTH, height: int = HEIGHT) -> int:
    """Screenshot ``page`` to ``out`` (its newest ``height`` pixels, palette PNG); returns
    its size in bytes."""
    from PIL import Image, ImageChops

    with tempfile.TemporaryDirectory(prefix="ct-picture-") as tmp:
        shot = Path(tmp) / "shot.png"
        browse(page, Path(tmp) / "profile", f"--screenshot={shot}", size=(width, TALL))
        img = Image.open(shot).convert("RGB")
    messages = img.crop((SIDEBAR, 0, img.width, img.height))
    background = Image.new("RGB", messages.size, messages.getpixel((messages.width - 1, messages.height - 1)))
    box = ImageChops.difference(messages, background).getbbox()
    if box is None:
        raise RuntimeError(f"{page}: the screenshot is blank")
    bottom = min(img.height, box[3] + 16)
    img = img.crop((0, max(0, bottom - height), img.width, bottom))
    out.parent.mkdir(parents=True, exist_ok=True)
    for colours in (128, 64, 32):
        img.quantize(colors=colours, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
        if out.stat().st_size <= MAX_BYTES:
            break
    return out.stat().st_size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page", type=Path, nargs="?", default=Path(".ctbot/demo/slack-channel.html"))
    ap.add_argument("out", type=Path, nargs="?", default=Path("docs/img/channel.png"))
    ap.add_argument("--width", type=int, default=WIDTH)
    ap.add_argument("--height", type=int, default=HEIGHT, help="pixels of the newest messages kept")
    args = ap.parse_args(argv)
    if not args.page.is_file():
        print(f"{args.page}: no such page; run ./dev.sh demo first", file=sys.stderr)
        return 2
    size = picture(args.page, args.out, args.width, args.height)
    print(f"{args.out}: {size / 1000:.0f} KB")
    return 0 if size <= MAX_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
