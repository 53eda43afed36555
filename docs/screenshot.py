"""Screenshot a single-page web UI (MLflow, Prefect) with headless Chromium over the DevTools protocol.

Usage:
    python docs/screenshot.py URL OUT.png [--width 1600] [--height 1200] [--wait 8]
        [--click TEXT ...] [--wait-for TEXT] [--js EXPR] [--chromium /usr/bin/chromium]

Loads URL in a fresh, throw-away browser profile, waits until ``--wait-for`` text is on the page (then
``--wait`` seconds), runs ``--js`` if given, clicks the visible element whose text is exactly each
``--click`` TEXT (in order, waiting after each), and writes a PNG of the viewport. Only the Python standard
library and ``websockets`` (already installed with Prefect) are needed.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from websockets.sync.client import connect

CLICK_JS = """
(text) => {
  const els = [...document.querySelectorAll('button, a, [role=tab], [role=button], span, div, li')];
  const visible = (e) => { const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
  const hit = els.filter(e => visible(e) && e.textContent.trim() === text)
                 .sort((a, b) => a.querySelectorAll('*').length - b.querySelectorAll('*').length)[0];
  if (!hit) return false;
  const target = hit.closest('button, a, [role=tab], [role=button]') || hit;
  target.click();
  return true;
}
"""


class Page:
    def __init__(self, ws_url: str):
        self._ws = connect(ws_url, max_size=None, open_timeout=30)
        self._id = 0

    def call(self, method: str, **params):
        self._id += 1
        self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv(timeout=120))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expr: str):
        res = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JS error: {res['exceptionDetails']}")
        return res.get("result", {}).get("value")

    def has_text(self, text: str) -> bool:
        return bool(self.eval(f"document.body && document.body.innerText.includes({json.dumps(text)})"))

    def close(self):
        self._ws.close()


def _devtools_port(profile: Path, timeout: float = 60) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.exists() and marker.read_text().strip():
            return int(marker.read_text().splitlines()[0])
        time.sleep(0.2)
    raise TimeoutError("chromium did not open a DevTools port")


def _page_ws(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
        targets = json.load(resp)
    pages = [t for t in targets if t.get("type") == "page"]
    if not pages:
        raise RuntimeError("no page target in chromium")
    return pages[0]["webSocketDebuggerUrl"]


def _wait_text(page: Page, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if page.has_text(text):
            return
        time.sleep(0.5)
    raise TimeoutError(f"text {text!r} did not appear within {timeout:.0f} s")


def shoot(args: argparse.Namespace) -> None:
    profile = Path(tempfile.mkdtemp(prefix="shot-profile-"))
    cmd = [args.chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={profile}",
           f"--window-size={args.width},{args.height}", "about:blank"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        page = Page(_page_ws(_devtools_port(profile)))
        page.call("Emulation.setDeviceMetricsOverride", width=args.width, height=args.height,
                  deviceScaleFactor=1, mobile=False)
        page.call("Page.enable")
        page.call("Page.navigate", url=args.url)
        if args.wait_for:
            _wait_text(page, args.wait_for, args.timeout)
        time.sleep(args.wait)
        if args.js:
            page.eval(args.js)
            time.sleep(args.wait)
        for text in args.click:
            _wait_text(page, text, args.timeout)
            if not page.eval(f"({CLICK_JS})({json.dumps(text)})"):
                raise RuntimeError(f"no visible element with text {text!r} to click")
            time.sleep(args.wait)
        png = page.call("Page.captureScreenshot", format="png")["data"]
        Path(args.out).write_bytes(base64.b64decode(png))
        page.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)
    print(f"{args.out}: {args.url}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("out")
    p.add_argument("--width", type=int, default=1600)
    p.add_argument("--height", type=int, default=1200)
    p.add_argument("--wait", type=float, default=8.0, help="seconds to let the page settle after each step")
    p.add_argument("--wait-for", help="text that must appear on the page before anything else")
    p.add_argument("--timeout", type=float, default=90.0,
                   help="seconds to wait for --wait-for / --click text")
    p.add_argument("--click", action="append", default=[], help="exact text of an element to click")
    p.add_argument("--js", help="JavaScript expression to run before the clicks")
    p.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    try:
        shoot(p.parse_args(argv))
    except (RuntimeError, TimeoutError) as exc:
        sys.exit(f"screenshot failed: {exc}")


if __name__ == "__main__":
    main()
