"""The README's pictures of a run: the MLflow run page and the per-class accuracy plot, as the MLflow UI shows them.

    .venv/bin/python docs/screenshots.py                 # trains the quickstart run in a temporary folder
    .venv/bin/python docs/screenshots.py --store runs    # or uses the latest run of an existing output_dir
    .venv/bin/python docs/screenshots.py --store runs --run <run id> --out <folder>   # or one run, elsewhere

Trains with the real CLI (`rwray train quickstart`), starts `mlflow ui` on loopback on a free port, and captures the
pages with headless Chromium (Debian package `chromium`), driven over its DevTools protocol (the UI is a
single-page app: the script waits for what it shows and clicks the artifact open), writing docs/img/mlflow_run.png
and docs/img/per_class_accuracy.png. Every process it starts is in its own process group, stopped on the way out
(errors and Ctrl-C included), so a re-run starts clean and nothing is left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img"
BIN = Path(sys.executable).parent
SIZE = (1400, 900)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def started(cmd: list[str], log: Path, env: dict[str, str] | None = None):
    """A child process in a new session (its own process group), killed with all its children on exit."""
    with open(log, "wb") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, **(env or {})})
    try:
        yield p
    finally:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue


def wait_http(url: str, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"mlflow ui did not answer at {url} within {timeout_s:.0f} s; its log: {log}")


def latest_run(store: Path, run_id: str | None = None) -> tuple[str, str]:
    """(experiment id, run id) of run ``run_id``, or of the most recent finished run, in ``store``'s sqlite MLflow
    store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    if run_id is not None:
        return client.get_run(run_id).info.experiment_id, run_id
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
                              max_results=1)
    if not runs:
        sys.exit(f"no finished run in {store / 'mlflow.db'}")
    return runs[0].info.experiment_id, runs[0].info.run_id


class Page:
    """A headless Chromium tab driven over the DevTools protocol (aiohttp's websocket client, already installed with
    ray[default]): navigate, run a line of JavaScript, wait for the page to show something, capture it."""

    def __init__(self, ws):
        self.ws, self.n = ws, 0

    async def call(self, method: str, **params):
        self.n += 1
        await self.ws.send_json({"id": self.n, "method": method, "params": params})
        while True:  # events arrive in between; the answer carries our id
            msg = await self.ws.receive_json()
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def js(self, expression: str):
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return r["result"].get("value")

    async def wait_for(self, expression: str, what: str, timeout_s: float = 60) -> None:
        import asyncio

        for _ in range(int(timeout_s / 0.25)):
            if await self.js(expression):
                return
            await asyncio.sleep(0.25)
        raise TimeoutError(f"the MLflow UI did not show {what} within {timeout_s:.0f} s")

    async def capture(self, out: Path) -> None:
        import asyncio
        import base64

        await asyncio.sleep(1.0)  # let charts and images finish their transitions
        out.write_bytes(base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"]))


# An element whose own text is exactly t (tree rows and tabs wrap their label with icons).
BY_TEXT = ("(t => [...document.querySelectorAll('*')].find(e => [...e.childNodes].some(n => n.nodeType === 3 && "
           "n.textContent.trim() === t)))")
# The assistant side panel of MLflow 3 covers a third of the page: closed when it is open.
CLOSE_ASSISTANT = "(() => { const b = document.querySelector('button[aria-label=Close]'); if (b) b.click(); })()"


async def shoot_run(chromium: str, page_url: str, out_dir: Path, tmp: Path) -> None:
    """The run's overview page and its per-class accuracy plot in the artifact viewer."""
    import asyncio

    import aiohttp

    port = free_port()
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp / 'chromium'}",
           f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1", "about:blank"]
    with started(cmd, tmp / "chromium.log"):
        async with aiohttp.ClientSession() as http:
            for _ in range(120):  # Chromium's DevTools endpoint comes up within a few seconds
                try:
                    async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                        tabs = [t for t in await r.json() if t["type"] == "page"]
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.25)
            else:
                sys.exit(f"headless Chromium did not start; its log: {tmp / 'chromium.log'}")
            async with http.ws_connect(tabs[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                await page.call("Emulation.setDeviceMetricsOverride", width=SIZE[0], height=SIZE[1],
                                deviceScaleFactor=1, mobile=False)
                await page.call("Page.enable")
                # workflowType=machine_learning: the UI's "Model training" view (not the GenAI one)
                await page.call("Page.navigate", url=f"{page_url}?workflowType=machine_learning")
                await page.wait_for(f"!!{BY_TEXT}('About this run')", "the run overview")
                await page.js(CLOSE_ASSISTANT)
                await page.capture(out_dir / "mlflow_run.png")
                await page.call("Page.navigate", url=f"{page_url}/artifacts?workflowType=machine_learning")
                await page.wait_for(f"!!{BY_TEXT}('evaluation')", "the artifact tree")
                await page.js(CLOSE_ASSISTANT)
                await page.js(f"{BY_TEXT}('evaluation').click()")
                await page.wait_for(f"!!{BY_TEXT}('per_class_accuracy.png')", "the evaluation folder")
                await page.js(f"{BY_TEXT}('per_class_accuracy.png').click()")
                await page.wait_for("[...document.images].some(i => i.src.startsWith('blob:') && i.complete && "
                                    "i.naturalWidth > 200)", "the plot")
                await page.capture(out_dir / "per_class_accuracy.png")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, help="an output_dir holding mlflow.db (default: train a short run)")
    ap.add_argument("--run", help="with --store: this run (default: the latest finished one)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs of the run (default: the quickstart's)")
    ap.add_argument("--out", type=Path, default=IMG)
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("headless Chromium is needed: apt-get install chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rwray-shots-") as t:
        tmp = Path(t)
        store = args.store.resolve() if args.store else tmp / "runs"
        if args.store is None:
            cmd = [str(BIN / "rwray"), "train", "quickstart", f"output_dir={store}",
                   *([f"train.epochs={args.epochs}"] if args.epochs else [])]
            print("training:", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, cwd=tmp)
        exp, run = latest_run(store, args.run)
        port = free_port()
        ui = [str(BIN / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
              "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # one page to serve: one worker
        with started(ui, tmp / "mlflow-ui.log", {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}):  # no job runner
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/health", 120, tmp / "mlflow-ui.log")
            asyncio.run(shoot_run(chromium, f"{base}/#/experiments/{exp}/runs/{run}", args.out, tmp))
    for name in ("mlflow_run.png", "per_class_accuracy.png"):
        print(f"wrote {args.out / name} ({(args.out / name).stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
