"""Helpers for the browser test: a throwaway JupyterLab server and a headless Chromium that drives it.

The server runs from the repository root with its own temporary Jupyter config, data, runtime, settings
and workspace folders, so nothing leaks into (or out of) the user's ``~/.jupyter``; autosave is off, so
running the lessons in the browser never rewrites ``notebooks/*.ipynb``. Chromium is Debian's
(``apt-get install chromium``), driven by Playwright for Python; Playwright never downloads a browser.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from moekit.launch import free_port

#: Set to 1 to skip the browser test on a machine without Chromium (a laptop); CI must not set it.
SKIP_ENV = "MOEKIT_SKIP_BROWSER"
#: Where Debian's package puts the browser; MOEKIT_CHROMIUM overrides it.
DEFAULT_CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL_HINT = (
    "install what it needs with `make browser-deps` (as root: apt-get install -y chromium; "
    "pip install playwright via the dev extra), or set MOEKIT_SKIP_BROWSER=1 to skip it on purpose"
)

#: JupyterLab user settings for the test: no autosave (the repo's notebooks stay as committed), no news
#: fetching (the machine may be offline), every cell kept in the DOM so the test can read all prompts.
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def chromium_path() -> str:
    return os.environ.get("MOEKIT_CHROMIUM", DEFAULT_CHROMIUM)


def missing_browser_parts() -> list[str]:
    """What the browser test lacks on this machine (empty when it can run)."""
    missing = []
    if not (Path(chromium_path()).is_file() and os.access(chromium_path(), os.X_OK)):
        missing.append(f"Chromium at {chromium_path()}")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the Python package playwright")
    return missing


# --------------------------------------------------------------------------------------------
# The JupyterLab server
# --------------------------------------------------------------------------------------------


@dataclass
class LabServer:
    """A running JupyterLab: where it listens, its token, and its process."""

    base_url: str
    token: str
    process: subprocess.Popen
    log_path: Path

    def notebook_url(self, path: str) -> str:
        """The notebook in a workspace of its own: nothing restored from an earlier page (tabs, kernels)."""
        return f"{self.base_url}/lab/workspaces/{secrets.token_hex(4)}/tree/{path}?token={self.token}"

    def api(self, path: str, method: str = "GET", timeout_s: float = 5.0) -> dict:
        headers = {"Authorization": f"token {self.token}"}
        body = b"" if method == "POST" else None
        request = urllib.request.Request(f"{self.base_url}/api/{path}", method=method, headers=headers, data=body)
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read()
        return json.loads(body) if body else {}

    def log_tail(self, num_chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:] if self.log_path.exists() else ""


def isolated_jupyter_env(home: Path) -> dict[str, str]:
    """The environment of the server: Jupyter's and IPython's per-user folders moved under ``home``."""
    env = dict(os.environ)
    folders = {
        "JUPYTER_CONFIG_DIR": "config",
        "JUPYTER_DATA_DIR": "data",
        "JUPYTER_RUNTIME_DIR": "runtime",
        "JUPYTERLAB_SETTINGS_DIR": "lab-settings",
        "JUPYTERLAB_WORKSPACES_DIR": "lab-workspaces",
        "IPYTHONDIR": "ipython",
    }
    for variable, name in folders.items():
        (home / name).mkdir(parents=True, exist_ok=True)
        env[variable] = str(home / name)
    for relative, settings in LAB_SETTINGS.items():
        path = home / "lab-settings" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def wait_until_answering(server: LabServer, timeout_s: float) -> None:
    """Poll /api/status until the server answers; fail with its log if it exits or never answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with code {server.process.returncode}:\n{server.log_tail()}")
        try:
            server.api("status", timeout_s=2)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    raise RuntimeError(f"JupyterLab did not answer within {timeout_s:.0f} s:\n{server.log_tail()}")


def shut_down(server: LabServer, timeout_s: float = 20.0) -> None:
    """Ask the server to stop (it shuts its kernels down first); kill its process group if it will not."""
    if server.process.poll() is None:
        try:
            server.api("shutdown", method="POST")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        try:
            server.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            server.process.terminate()
            try:
                server.process.wait(5)
            except subprocess.TimeoutExpired:
                pass
    try:  # kernels the server left behind are in its process group (start_new_session below)
        os.killpg(server.process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    server.process.wait()


@contextmanager
def running_lab(root_dir: Path, log_path: Path, start_timeout_s: float = 90.0) -> Iterator[LabServer]:
    """JupyterLab serving ``root_dir`` on a free localhost port with a random token; always shut down."""
    home = Path(tempfile.mkdtemp(prefix="moekit-lab-"))
    env = isolated_jupyter_env(home)
    port, token = free_port(), secrets.token_hex(16)
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root_dir}", "--ServerApp.open_browser=False",
        "--ServerApp.terminals_enabled=False", "--LabApp.extension_manager=readonly",
        f"--FileCheckpoints.checkpoint_dir={home / 'checkpoints'}",  # absolute: no .ipynb_checkpoints/ in the repo
    ]  # fmt: skip
    if os.geteuid() == 0:  # CI runs as root in a container
        command.append("--allow-root")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=root_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = LabServer(f"http://127.0.0.1:{port}", token, process, log_path)
    try:
        wait_until_answering(server, start_timeout_s)
        yield server
    finally:
        shut_down(server)
        shutil.rmtree(home, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Driving a notebook in the page
# --------------------------------------------------------------------------------------------


@contextmanager
def chromium_browser() -> Iterator:
    """Debian's Chromium under Playwright, headless; Playwright gives it a fresh profile folder."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class ConsoleLog:
    """Errors the page reported: console.error messages and uncaught exceptions."""

    errors: list[str] = field(default_factory=list)

    def listen(self, page) -> None:
        page.on("console", lambda message: self.errors.append(f"console.error: {message.text}") if message.type == "error" else None)
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))


def open_notebook(page, server: LabServer, path: str, timeout_s: float = 90.0) -> None:
    """Load JupyterLab on a notebook and wait until its kernel is idle."""
    page.goto(server.notebook_url(path), timeout=timeout_s * 1000)
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell", timeout=timeout_s * 1000)
    wait_for_idle_kernel(page, timeout_s)


def wait_for_idle_kernel(page, timeout_s: float) -> None:
    """Wait until the status bar reads '<kernel> | Idle': a started, connected kernel with nothing to do.

    (The toolbar's execution indicator already says 'idle' before any kernel exists, so it cannot tell.)
    """
    page.locator(".jp-StatusBar-Widget").get_by_text(re.compile(r"\| Idle$")).wait_for(timeout=timeout_s * 1000)


def choose_menu_item(page, menu: str, item: str) -> None:
    """Click ``menu`` in JupyterLab's menu bar, then ``item`` in it, as a reader would."""
    page.locator(".lm-MenuBar-itemLabel", has_text=menu).first.click()
    page.locator(".lm-Menu-content .lm-Menu-itemLabel").get_by_text(item, exact=True).click()
    page.locator(".lm-Menu").first.wait_for(state="detached", timeout=5000)


def run_all_cells(page) -> None:
    """Edit > Clear Outputs of All Cells (so every prompt reads '[ ]:'), then Run > Run All Cells."""
    choose_menu_item(page, "Edit", "Clear Outputs of All Cells")
    choose_menu_item(page, "Run", "Run All Cells")


def cell_prompts(page) -> list[str]:
    """The input prompt of every code cell: '[3]:' once run, '[*]:' while queued or running, '[ ]:' never run."""
    return page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputArea-prompt").all_inner_texts()


def stderr_outputs(page) -> list[str]:
    """Tracebacks and warnings shown in the notebook (JupyterLab renders both as stderr text)."""
    selector = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
    return page.locator(f".jp-NotebookPanel:not(.lm-mod-hidden) {selector}").all_inner_texts()


def wait_until_all_cells_ran(page, timeout_s: float, grace_s: float = 5.0) -> None:
    """Wait until every code cell has an execution count; fail early, with any traceback, once execution stopped short."""
    deadline = time.monotonic() + timeout_s
    stopped_since = None
    prompts: list[str] = []
    while time.monotonic() < deadline:
        prompts = [p.strip() for p in cell_prompts(page)]
        if prompts and all(p[1:-2].strip().isdigit() for p in prompts):
            wait_for_idle_kernel(page, max(1.0, deadline - time.monotonic()))
            return
        if "[*]:" in prompts:
            stopped_since = None
        elif stopped_since is None:
            stopped_since = time.monotonic()
        elif time.monotonic() - stopped_since > grace_s:
            shown = "\n".join(text[-3000:] for text in stderr_outputs(page))
            raise AssertionError(f"execution stopped short; prompts: {prompts}; stderr shown:\n{shown}")
        time.sleep(0.5)
    raise AssertionError(f"cells still not run after {timeout_s:.0f} s; prompts: {prompts}")


# --------------------------------------------------------------------------------------------
# Reading what the page shows
# --------------------------------------------------------------------------------------------

#: Each ipywidgets control's description and displayed value, keyed by description.
_READ_CONTROLS_JS = """
root => {
  const text = element => element.textContent.replace(/\\u00a0/g, ' ');  // dropdowns show spaces as &nbsp;
  const knobs = {};
  for (const box of root.querySelectorAll('.widget-dropdown, .widget-toggle-buttons, .widget-slider, .widget-text, .widget-checkbox')) {
    if (box.classList.contains('widget-checkbox')) {
      knobs[text(box.querySelector('.widget-label-basic span'))] = box.querySelector('input').checked;
      continue;
    }
    const label = text(box.querySelector('.widget-label'));
    if (box.classList.contains('widget-dropdown')) knobs[label] = text(box.querySelector('select').selectedOptions[0]);
    else if (box.classList.contains('widget-toggle-buttons')) knobs[label] = text(box.querySelector('.mod-active'));
    else if (box.classList.contains('widget-slider')) knobs[label] = text(box.querySelector('.widget-readout'));
    else knobs[label] = box.querySelector('input').value;
  }
  return knobs;
}
"""

#: Every trace of the plotly chart that is (or is the first under) an element: name and bar heights, as plotly.js holds them.
_READ_BARS_JS = """
root => (root.matches('.js-plotly-plot') ? root : root.querySelector('.js-plotly-plot')).data.map(t => [t.name, Array.from(t.y)])
"""


def shown_controls(output) -> dict[str, str | bool]:
    """{description: displayed value} of the widget controls inside an output (a Playwright locator)."""
    return output.evaluate(_READ_CONTROLS_JS)


def shown_bars(output) -> dict[str, list[float]]:
    """{trace name: y values} of the plotly chart that is (or is inside) an element, read from the rendered plot."""
    return dict(output.evaluate(_READ_BARS_JS))


_READ_TALLEST_SHARE_JS = """
root => {
  const plot = root.matches('.js-plotly-plot') ? root : root.querySelector('.js-plotly-plot');
  const stacks = {};
  let tallest = 0;
  for (const trace of plot.data) {
    (trace.y || []).forEach((y, i) => {
      if (trace.type === 'bar') { stacks[i] = (stacks[i] || 0) + Math.max(y, 0); } else { tallest = Math.max(tallest, y); }
    });
  }
  tallest = Math.max(tallest, ...Object.values(stacks));
  const [low, high] = plot._fullLayout.yaxis.range;
  return tallest / (high - low);
}
"""


def shown_tallest_share(output) -> float:
    """The tallest bar of a rendered plotly chart as a share of its drawn y range (what a reader sees)."""
    return float(output.evaluate(_READ_TALLEST_SHARE_JS))


def wait_for(condition, timeout_s: float, interval_s: float = 0.25) -> bool:
    """Poll ``condition()`` until it is true or ``timeout_s`` passed; return its last answer."""
    deadline = time.monotonic() + timeout_s
    while not (answer := bool(condition())) and time.monotonic() < deadline:
        time.sleep(interval_s)
    return answer
