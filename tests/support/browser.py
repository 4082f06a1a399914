"""Headless Chromium over the DevTools protocol: just enough to drive ComfyUI's frontend.

No browser automation package is needed: Chromium is started with a remote debugging
port, and one page is driven over its websocket (``websocket-client``). Console
messages and uncaught exceptions are collected for the tests to inspect.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


class BrowserError(RuntimeError):
    pass


def find_chromium() -> Optional[str]:
    """$OMNIID_CHROMIUM, else the first Chromium or Chrome on PATH."""
    explicit = os.environ.get("OMNIID_CHROMIUM")
    if explicit:
        return explicit if os.path.exists(explicit) else None
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class Page:
    def __init__(self, ws_url: str):
        import websocket
        self.ws = websocket.create_connection(ws_url, timeout=120, suppress_origin=True)
        self.next_id = 0
        self.console: list[dict] = []
        self.exceptions: list[str] = []
        self.send("Runtime.enable")
        self.send("Page.enable")
        self.send("Log.enable")

    def _event(self, message: dict) -> None:
        method = message.get("method")
        params = message.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append({"type": params.get("type"), "text": text})
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.exceptions.append(details.get("exception", {}).get("description") or details.get("text", ""))
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            self.console.append({"type": entry.get("level"), "text": entry.get("text", ""), "url": entry.get("url")})

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == my_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._event(message)

    def evaluate(self, expression: str, timeout: float = 120.0) -> Any:
        """The JSON value of a JavaScript expression (awaited when it is a promise)."""
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True,
                           timeout=int(timeout * 1000))
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(details.get("exception", {}).get("description") or details.get("text"))
        return result.get("result", {}).get("value")

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def wait_for(self, expression: str, timeout: float = 120.0, interval: float = 0.25) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(interval)
        raise BrowserError(f"timed out waiting for {expression}")

    def screenshot(self, path: Path, clip: Optional[dict] = None, quality: int = 85) -> Path:
        params = {"format": "jpeg", "quality": quality}
        if clip:
            params["clip"] = {**clip, "scale": 1}
        data = self.send("Page.captureScreenshot", **params)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001 - closing a dead socket is fine
            pass


class Chromium:
    """A headless Chromium process with a fresh profile."""

    def __init__(self, executable: Optional[str] = None, width: int = 1600, height: int = 1000):
        self.executable = executable or find_chromium()
        if not self.executable:
            raise BrowserError("no Chromium found: install it (apt install chromium) or set OMNIID_CHROMIUM")
        self.profile = tempfile.mkdtemp(prefix="omniid-chromium-")
        self.process = subprocess.Popen(
            [self.executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", f"--user-data-dir={self.profile}",
             "--remote-debugging-port=0", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise BrowserError(f"Chromium ({self.executable}) did not start")
            time.sleep(0.1)
        time.sleep(0.2)
        self.port = int(port_file.read_text().split()[0])

    def new_page(self, url: str = "about:blank") -> Page:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/new?{url}", method="PUT")
        with urllib.request.urlopen(request, timeout=30) as response:
            target = json.loads(response.read())
        return Page(target["webSocketDebuggerUrl"])

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


READY = ("window.app && app.graph && window.LiteGraph && "
         "LiteGraph.registered_node_types['OmniIdentityEncode'] ? true : false")


def open_editor(browser: Chromium, url: str) -> Page:
    """The editor at ``url``, with the first-run template dialog already dismissed."""
    settings = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1}
    request = urllib.request.Request(f"{url}/settings", data=json.dumps(settings).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).close()
    page = browser.new_page()
    page.navigate(url)
    page.wait_for(READY, timeout=180)
    return page


# A Load Image node whose photo is in ComfyUI's input folder grows by the photo's preview (220 px), in every
# frontend: when the node is drawn with the photo loaded (1.27), or at once (1.49). showPhotos(pick) waits until
# each Load Image shows its photo, drawing each node in view until then; pick: first point each at a photo the
# server lists (the test's "a user's photo in every Load Image"); else each must already name one.
SHOW_PHOTOS_JS = """
async function showPhotos(pick) {
  const values = w => (typeof w.options?.values === "function" ? w.options.values() : w.options?.values) || [];
  const loaders = app.graph._nodes.filter(n => n.type === "LoadImage");
  for (const n of loaders) {
    const w = n.widgets.find(w => w.name === "image");
    const photo = pick ? values(w).find(v => /[.](png|jpe?g|webp)$/i.test(v)) : w.value;
    if (!values(w).includes(photo)) throw new Error(`${n.title}: no photo ${photo ?? ""} in the input folder`);
    if (pick) {
      w.value = photo;
      w.callback?.(photo);
    }
  }
  const shown = n => n.imgs?.length && n.imgs.every(i => i.complete && i.naturalWidth > 0)
                     && n.widgets.some(w => w.name === "$$canvas-image-preview");
  const c = app.canvas, view = [c.ds.scale, [...c.ds.offset]];
  for (let tries = 0; !loaders.every(shown); tries++) {
    if (tries > 300)
      throw new Error("Load Image previews not shown: " + loaders.filter(n => !shown(n)).map(n => n.title));
    for (const n of loaders.filter(n => !shown(n))) {
      c.ds.scale = 1;
      c.ds.offset = [40 - n.pos[0], 80 - n.pos[1]];
      c.setDirty(true, true);
      c.draw(true, true);
    }
    await new Promise(r => setTimeout(r, 50));
  }
  c.ds.scale = view[0];
  c.ds.offset = view[1];
  c.setDirty(true, true);
  c.draw(true, true);
  return loaders.length;
}
"""

# for the tests: a user's photo in every Load Image, shown
SHOW_PHOTOS = "(async () => { %s; return await showPhotos(true); })()" % SHOW_PHOTOS_JS
