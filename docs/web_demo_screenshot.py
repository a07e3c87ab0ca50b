"""Take the README's screenshot of the web demo (docs/web_demo.png) in headless chromium.

Starts ``demo.py --web`` with the given flags on a free loopback port, picks a gallery image, runs SemLA,
screenshots the page and stops the server. Needs Debian's chromium (``apt-get install chromium``)::

    python docs/web_demo_screenshot.py --out docs/web_demo.png --pick "fog night" -- \\
        --weights demo_output/base/model_final.pth --lora_library_path demo_output/loradb \\
        --embedding_model demo_output/clip --gallery demo_output/world
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "web_demo.png", help="PNG to write")
    parser.add_argument("--pick", default="fog night", help="caption of the gallery image to segment")
    parser.add_argument("--classes", help="class names, comma-separated (default: the model's)")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the browser")
    parser.add_argument("web_flags", nargs=argparse.REMAINDER, help="-- then flags of demo.py --web")
    args = parser.parse_args(argv)
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = [f for f in args.web_flags if f != "--"]
    command = [sys.executable, str(REPO_ROOT / "demo.py"), "--web", "--port", str(port), *flags]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in server.stdout:
            print(line, end="", flush=True)
            if "SemLA web demo on" in line:
                break
        else:
            raise SystemExit(f"the server stopped (exit {server.wait()})")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 1300})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#semla-gallery").get_by_text(args.pick, exact=True).first.click()
            expect(page.locator("#semla-status")).to_contain_text("ready", timeout=30_000)
            if args.classes:
                page.locator("#semla-classes textarea").fill("\n".join(args.classes.split(",")))
            page.locator("#semla-run").click()
            expect(page.locator("#semla-weights .semla-weight").first).to_be_attached(timeout=120_000)
            page.wait_for_timeout(500)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    # 256 colours: the page is flat colours and small pictures, so this keeps the PNG small
    Image.open(args.out).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(args.out, optimize=True)
    print(f"{args.out}: {args.out.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
