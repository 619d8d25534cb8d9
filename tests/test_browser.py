"""The MLflow UI's compare-runs page in a real browser, on the store of a real tiny sweep.

What a user does after ``repsearch run``: ``repsearch ui`` serves the runs folder and prints the
compare view of the latest study. Here the same server command (:func:`repsearch.tracking.ui_command`
with :data:`repsearch.tracking.UI_ENV`, the venv's ``mlflow``) serves the store of ``real_sweep``
(conftest.py) on 127.0.0.1 and a free port, Debian's headless ``chromium`` opens the URL that
``repsearch ui`` prints (:func:`repsearch.compare.latest_study_url`), and the rendered page must name
every trial's run and show the ``val/top1`` metric. The page's screenshot and DOM are kept under
``$REPSEARCH_TEST_ARTIFACTS`` (default ``<repo>/test-artifacts/``).

The browser is driven over Chromium's DevTools protocol on a pipe (``--remote-debugging-pipe``,
standard library only), not with ``--dump-dom``: the page's metrics table is a virtualised grid
300 px high that renders only its first ~18 rows, so a plain DOM dump never holds ``val/top1`` (it
matched only inside the ``not_learning`` tag's text); the test scrolls the grid as a user would.

Needs the ``ui`` extra (full ``mlflow``) and Debian's ``chromium`` (``apt-get install -y chromium``;
``.ci/run`` installs it as root). Without either the test is skipped, unless env ``CI`` is set: then
it fails.
"""

from __future__ import annotations

import base64
import fcntl
import importlib.util
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
WAIT_S = 60  # for /health (answers ~9 s after start on 2 cores) and for the page to show the runs
#: Headless Chromium as root (INSTALL.md): no sandbox, no GPU, no network traffic of its own.
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,3000"]  # tall: run names and metrics in one screenshot

#: Finds an element whose own text is exactly the argument, scrolling every scrollable box of the page
#: (virtualised grids render only the rows in view) until it appears; scrolls it to the middle of the
#: view and returns the href of its link (the metric's chart), its tag name, or null when it is nowhere.
#: In the MLflow compare table the column of names follows the scrolled column of values one scroll
#: event late: once the text is found, the box is nudged by a pixel until that column has caught up.
FIND_TEXT_JS = """
(async (text) => {
  const pause = ms => new Promise(r => setTimeout(r, ms));
  const follows = (column, box) =>  // the column's scroll position matches the box's (or its own end)
    Math.abs(column.scrollTop - Math.min(box.scrollTop, column.scrollHeight - column.clientHeight)) <= 1;
  const find = () => document.evaluate(`//*[normalize-space(text())='${text}']`, document, null,
                                       XPathResult.FIRST_ORDERED_NODE_TYPE, null).singleNodeValue;
  const scrollers = [...document.querySelectorAll('*')].filter(
      e => e.scrollHeight > e.clientHeight + 1 && ['auto', 'scroll'].includes(getComputedStyle(e).overflowY));
  for (const box of [null, ...scrollers]) {
    const start = box ? box.scrollTop : 0;
    for (let top = 0; ; top += Math.max(40, Math.floor((box ? box.clientHeight : 0) / 2))) {
      const el = find();
      if (el && !box) {
        el.scrollIntoView({block: 'center'});
      } else if (el) {
        box.scrollIntoView({block: 'nearest'});  // the page (only if needed), not the box
        let column = el.parentElement;          // the box itself, or the column that follows it
        while (column && column.scrollHeight <= column.clientHeight + 1) column = column.parentElement;
        column = column || box;
        const y = el.getBoundingClientRect().top - column.getBoundingClientRect().top + column.scrollTop;
        box.scrollTop = Math.max(0, Math.round(y + el.offsetHeight / 2 - box.clientHeight / 2));
        for (let i = 0; i < 40 && !follows(column, box); i++) {
          await pause(100);
          box.scrollTop += box.scrollTop > 0 ? -1 : 1;
        }
      }
      if (el) {
        await pause(300);
        const link = el.closest('a');
        return link ? link.getAttribute('href') : el.tagName;
      }
      if (!box) break;
      if (top > box.scrollHeight) {  // not in this box: put it back as it was
        box.scrollTop = start;
        break;
      }
      box.scrollTop = top;
      await pause(250);
    }
  }
  return null;
})(%s)
"""


def _missing(reason: str) -> None:
    """Skip with ``reason``; under CI (env ``CI`` set) fail instead: CI must run this test."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this test must run)")
    pytest.skip(reason)


def artifacts_dir() -> Path:
    """Where the test keeps its screenshot: env ``REPSEARCH_TEST_ARTIFACTS``, else ``<repo>/test-artifacts``."""
    out = Path(os.environ.get("REPSEARCH_TEST_ARTIFACTS") or REPO_ROOT / "test-artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def tools() -> tuple[str, str]:
    """``(chromium, mlflow)``: the browser binary and the venv's ``mlflow`` (the ``ui`` extra).

    Requested before ``real_sweep`` so that a machine without them skips before training anything.
    """
    if importlib.util.find_spec("flask") is None or importlib.util.find_spec("mlflow.server") is None:
        _missing("the MLflow UI needs the full mlflow package: pip install -e '.[ui]' -c constraints.txt")
    mlflow = Path(sys.executable).parent / "mlflow"  # what `repsearch ui` runs
    if not mlflow.exists():
        _missing(f"{mlflow} not found: install the ui extra into this venv")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        _missing("Debian's chromium is not installed (apt-get install -y chromium; .ci/run installs it as root)")
    return chromium, str(mlflow)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _end_group(pgid: int, wait: Callable[[float], Any]) -> None:
    """End the process group ``pgid`` (its leader started it with ``setsid``): SIGTERM, up to 10 s
    for the leader to exit (``wait``), then SIGKILL to whatever of the group is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:  # the whole group is gone
            return
        wait(10)


def _popen_wait(proc: subprocess.Popen) -> Callable[[float], None]:
    def wait(timeout: float) -> None:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass

    return wait


def _wait_healthy(proc: subprocess.Popen, port: int, log: Path) -> None:
    """Poll the server's ``/health`` until it answers ``OK``; fail if it exits or stays silent."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow ui exited with {proc.returncode} before answering /health:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=2) as r:
                if r.status == 200 and r.read().strip() == b"OK":
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow ui did not answer /health within {WAIT_S} s:\n{log.read_text()[-3000:]}")


class DevTools:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    JSON messages ending in NUL, commands into the browser's fd 3, replies and events out of its fd 4).
    The browser leads its own process group; :meth:`close` ends the group."""

    def __init__(self, chromium: str, profile: Path, log: Path):
        self.log = log
        cmd_r, cmd_w = os.pipe()
        out_r, out_w = os.pipe()
        # the child's ends, moved above 9 so that mapping them onto fds 3 and 4 cannot clobber each other
        child_r, child_w = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (cmd_r, out_w))
        for fd in (cmd_r, out_w):
            os.close(fd)
        argv = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        try:
            self.pid = os.posix_spawn(chromium, argv, os.environ, setsid=True, file_actions=[
                (os.POSIX_SPAWN_DUP2, child_r, 3), (os.POSIX_SPAWN_DUP2, child_w, 4),
                (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
                (os.POSIX_SPAWN_DUP2, 1, 2)])
        finally:
            os.close(child_r)
            os.close(child_w)
        self._w, self._r = cmd_w, out_r
        self._buf = b""
        self._id = 0
        self.exited = False

    def call(self, method: str, params: Optional[dict] = None, session: Optional[str] = None, timeout: float = 60) -> dict:
        """Send one command and return its result (events in between are dropped)."""
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            ready, _, _ = select.select([self._r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                pytest.fail(f"chromium did not answer {method} within {timeout} s:\n{self.log.read_text()[-3000:]}")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                pytest.fail(f"chromium closed its DevTools pipe during {method}:\n{self.log.read_text()[-3000:]}")
            self._buf += chunk

    def open(self, url: str) -> str:
        """Open ``url`` in a new tab; returns the session id that addresses it."""
        target = self.call("Target.createTarget", {"url": url})["targetId"]
        return self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def evaluate(self, session: str, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        res = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True}, session)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def screenshot(self, session: str, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"}, session)["data"]))

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.exited and time.monotonic() < deadline:
            try:
                self.exited = os.waitpid(self.pid, os.WNOHANG)[0] == self.pid
            except ChildProcessError:
                self.exited = True
            if not self.exited:
                time.sleep(0.1)

    def close(self) -> None:
        try:
            os.write(self._w, json.dumps({"id": self._id + 1, "method": "Browser.close"}).encode() + b"\0")
            self._wait(10)
        except OSError:
            pass
        finally:
            os.close(self._w)
            os.close(self._r)
            _end_group(self.pid, self._wait)


def test_mlflow_ui_compare_page_shows_every_trial_and_val_top1(tools, real_sweep, tmp_path):
    """The compare view that ``repsearch ui`` prints (its URL lists exactly the sweep's 4 runs),
    rendered by headless Chromium from the MLflow UI that ``repsearch ui`` starts, shows the run name
    of each of the 4 trials and the ``val/top1`` metric as a row of the metrics table (a link to its
    chart of these runs). Keeps ``browser_compare_runs.png`` and ``browser_compare_runs.html``."""
    from mlflow.tracking import MlflowClient

    from repsearch.compare import latest_study_url
    from repsearch.tracking import UI_ENV, ui_command

    chromium, mlflow = tools
    stores, summary = real_sweep
    client = MlflowClient(tracking_uri=stores.tracking_uri)
    children = client.search_runs([client.get_experiment_by_name(stores.experiment).experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{summary.parent_run_id}'")
    names = sorted(r.info.run_name for r in children)
    assert len(names) == 4 and len(set(names)) == 4, names  # 2 configurations x 2 seeds

    port = _free_port()
    cmd = ui_command(stores, host=HOST, port=port)
    assert cmd[0] == "mlflow" and cmd[cmd.index("--host") + 1] == HOST
    cmd[0] = mlflow
    url = latest_study_url(HOST, port, runs_dir=stores.runs_dir, tracking_uri=stores.tracking_uri)
    assert url is not None and url.startswith(f"http://{HOST}:{port}/#/compare-runs?runs=[")
    listed = json.loads(url.split("runs=", 1)[1].split("&experiments=", 1)[0])
    assert sorted(listed) == sorted(r.info.run_id for r in children)

    out = artifacts_dir()
    shot, html = out / "browser_compare_runs.png", out / "browser_compare_runs.html"
    for f in (shot, html):
        f.unlink(missing_ok=True)
    log = tmp_path / "mlflow-ui.log"
    with log.open("w") as fh:
        server = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, **UI_ENV}, stdout=fh, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    browser: Optional[DevTools] = None
    try:
        _wait_healthy(server, port, log)
        browser = DevTools(chromium, tmp_path / "chromium-profile", tmp_path / "chromium.log")
        page = browser.open(url)
        deadline, shown = time.monotonic() + WAIT_S, []
        while time.monotonic() < deadline:
            text = browser.evaluate(page, "document.body ? document.body.innerText : ''") or ""
            shown = [n for n in names if n in text]
            if len(shown) == len(names):
                break
            time.sleep(0.5)
        metric = browser.evaluate(page, FIND_TEXT_JS % json.dumps("val/top1"))
        html.write_text(browser.evaluate(page, "document.documentElement.outerHTML"))
        browser.screenshot(page, shot)
    finally:
        if browser is not None:
            browser.close()
        _end_group(server.pid, _popen_wait(server))
    print(f"screenshot of the compare page: {shot}")

    assert shown == names, f"the compare page shows the runs {shown}, not all of {names} (DOM: {html})"
    assert metric is not None, f"the compare page has no val/top1 row (DOM: {html})"
    assert metric.startswith("#/metric?") and "val%2Ftop1" in metric, metric  # the row links to the metric's chart
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"no PNG screenshot at {shot}"
