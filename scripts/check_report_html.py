"""Render a `lowvram bench` report.html in headless Chromium and save a PNG screenshot of it.

    python scripts/check_report_html.py REPORT/report.html [--out shot.png] [--width 1400] [--height 4000]

Needs a Chromium binary (Debian: `apt-get install -y chromium`; or set CHROMIUM=/path/to/chrome). Besides the
screenshot it checks the page itself: the summary tables are there and every figure is an inline PNG that decodes,
so a pass means the HTML is self-contained. Exit code 0 on success, 1 when a check fails, 2 without a browser.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_browser() -> str | None:
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def check_page(html: str) -> list[str]:
    """Problems with the page: missing summary tables, external images, images that don't decode."""
    from PIL import Image

    problems = []
    for tid in ("summary-speed", "summary-quality"):
        if f"id='{tid}'" not in html and f'id="{tid}"' not in html:
            problems.append(f"no table #{tid}")
    srcs = re.findall(r"<img[^>]*src=\"([^\"]+)\"", html)
    if not srcs:
        problems.append("no figures")
    for src in srcs:
        if not src.startswith("data:image/png;base64,"):
            problems.append(f"figure not inline: {src[:60]}")
            continue
        try:
            Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
        except Exception as err:  # noqa: BLE001
            problems.append(f"inline figure does not decode ({err})")
    return problems


def screenshot(browser: str, page: Path, out: Path, width: int, height: int, timeout: float = 120.0) -> None:
    with tempfile.TemporaryDirectory(prefix="lowvram-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={out}", page.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{browser} exited {proc.returncode}: {' | '.join(tail)}")


def non_blank_fraction(png: Path) -> float:
    """Share of pixel rows that are not plain white (a rendered table and plots give plenty)."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(Image.open(png).convert("L"))
    return float((arr.min(axis=1) < 250).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="PNG to write (default: next to the report)")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=4000)
    args = ap.parse_args(argv)
    if not args.html.is_file():
        print(f"{args.html}: not found", file=sys.stderr)
        return 1
    problems = check_page(args.html.read_text())
    browser = find_browser()
    if browser is None:
        print("no Chromium found: apt-get install -y chromium (or set CHROMIUM=...)", file=sys.stderr)
        return 2
    out = args.out or args.html.with_suffix(".png")
    screenshot(browser, args.html, out, args.width, args.height)
    filled = non_blank_fraction(out)
    if filled < 0.2:
        problems.append(f"screenshot is mostly blank ({filled:.0%} of rows have content)")
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    print(f"{out}: {args.width}x{args.height} screenshot, {filled:.0%} of rows have content"
          + ("" if problems else "; tables and inline figures OK"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
