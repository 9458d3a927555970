"""The labs as learners meet them: JupyterLab in a real (headless) Chromium, driven by Playwright.

The test starts JupyterLab on a copy of labs/, on a free loopback port, with QLORA_LAB_PROFILE=smoke (so every lab's
`profile = "auto"` runs its quick version), opens lab 01, runs all cells, moves two controls of
the VRAM panel and checks that the predicted peak and the chart change; then opens every other
lab, runs it, and checks that no cell shows an error. Screenshots land in runs/browser/.

Needs Chromium (Debian's `chromium` package, which `make test` installs where apt-get exists)
and the `playwright` Python package (no browser download: it drives the system Chromium).
Skips with the reason where either is missing.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from qlora_lab import models, paths

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = paths.REPO_ROOT / "runs" / "browser"
TOKEN = "qlora-lab-browser-test"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

pytestmark = [
    pytest.mark.notebooks,
    # one pytest-xdist worker runs every browser test (one JupyterLab server, in order: lab 07 reads lab 05's adapter)
    pytest.mark.xdist_group("browser"),
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium; `make test` does it on Debian)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _private_cache(folder):
    """The browser's kernels write lab 05/07/08's runs here, not where the papermill tests (another worker) write
    theirs; the converted model and tokenizers are the shared cache's (converted first if missing)."""
    models.checkpoint_for(models.DEFAULT_MODEL)
    for entry in paths.cache_dir().iterdir():
        if not entry.name.startswith((".", "lab05", "fsdp-")):
            (folder / entry.name).symlink_to(entry)
    return folder


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory):
    """A JupyterLab server on a copy of labs/ (JupyterLab autosaves outputs into the notebooks it runs,
    and the committed ones must stay clean), smoke profile, stopped after the module."""
    root = tmp_path_factory.mktemp("jupyterlab-root")
    shutil.copytree(paths.LABS_DIR, root / "labs")
    committed = {p.name: p.read_bytes() for p in paths.LABS_DIR.glob("*.ipynb")}
    port = _free_port()
    settings = SHOTS.parent / "browser-settings"  # JupyterLab user settings for the test: no news pop-up,
    for plugin, values in {"apputils-extension/notification": '{"fetchNews": "false"}',  # every cell in the DOM
                           "notebook-extension/tracker": '{"windowingMode": "none"}'}.items():
        path = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(values)
    env = {**os.environ, "QLORA_LAB_PROFILE": "smoke", "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "QLORA_LAB_CACHE": str(_private_cache(tmp_path_factory.mktemp("cache"))),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(paths.REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", f"--port={port}", "--ip=127.0.0.1",
           f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    SHOTS.mkdir(parents=True, exist_ok=True)
    log = open(SHOTS / "jupyterlab.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"JupyterLab exited: {(SHOTS / 'jupyterlab.log').read_text()[-2000:]}")
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not answer within 60 s")
        yield base
        assert committed == {p.name: p.read_bytes() for p in paths.LABS_DIR.glob("*.ipynb")}, \
            "running the labs in the browser changed the committed notebooks"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(jupyterlab):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (in the dev extras)")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


# JavaScript run in the page through JupyterLab's application object (exposed by --LabApp.expose_app_in_browser)
RUN_ALL = """async path => { for (const w of window.jupyterapp.shell.widgets('main')) {
  if (w.context && w.context.path === path) { window.jupyterapp.shell.activateById(w.id);
    await window.jupyterapp.commands.execute('notebook:run-all-cells'); } } }"""
SHUTDOWN = """async path => { for (const w of window.jupyterapp.shell.widgets('main')) {
  if (w.context && w.context.path === path) await w.sessionContext.shutdown(); } }"""
NOTEBOOK = """path => { if (!window.jupyterapp) return false;  // the page is still starting
  for (const w of window.jupyterapp.shell.widgets('main')) {
  if (w.context && w.context.path === path && w.content && w.content.widgets.length > 0) return true; } return false; }"""
STATE = """path => {
  if (!window.jupyterapp) return null;
  let panel = null;
  for (const w of window.jupyterapp.shell.widgets('main')) { if (w.context && w.context.path === path) panel = w; }
  if (!panel || !panel.content || !panel.sessionContext.session) return null;
  const kernel = panel.sessionContext.session.kernel;
  const cells = panel.content.widgets.filter(c => c.model.type === 'code');
  const errors = [];
  cells.forEach((c, i) => { for (let j = 0; j < c.model.outputs.length; j++) {
      const o = c.model.outputs.get(j);
      if (o.type === 'error') errors.push(`cell ${i}: ${o.toJSON().ename}: ${o.toJSON().evalue}`); } });
  return {status: kernel ? kernel.status : 'none', done: cells.filter(c => c.model.executionCount !== null).length,
          total: cells.length, running: panel.content.widgets.filter(c => c.model.type === 'code' &&
          c.node.querySelector('.jp-InputArea-prompt')
          && c.node.querySelector('.jp-InputArea-prompt').textContent.includes('*')).length,
          errors};
}"""


def open_and_run(browser, base: str, stem: str, timeout: float = 240):
    """Open labs/<stem>.ipynb in JupyterLab, run all cells, wait until done; returns (page, state)."""
    path = f"labs/{stem}.ipynb"
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    # ?reset: a fresh workspace, so the notebooks earlier tests opened are not restored beside this one
    page.goto(f"{base}/lab/tree/{path}?reset&token={TOKEN}")
    page.wait_for_function(NOTEBOOK, arg=path, timeout=60_000)
    deadline = time.time() + 60
    while time.time() < deadline:  # the kernel must be up before running
        state = page.evaluate(STATE, path)
        if state and state["status"] == "idle":
            break
        time.sleep(0.5)
    page.evaluate(RUN_ALL, path)
    deadline = time.time() + timeout
    state = None
    while time.time() < deadline:
        state = page.evaluate(STATE, path)
        if state and (state["errors"] or (state["done"] == state["total"] and state["running"] == 0
                                           and state["status"] == "idle")):
            break
        time.sleep(1)
    return page, state


def close(page, stem: str):
    """Shut the notebook's kernel down (frees its memory for the next lab) and close the page."""
    try:
        page.evaluate(SHUTDOWN, f"labs/{stem}.ipynb")
    finally:
        page.close()


def wait_for_redraw(page, panel, old_peak: str, old_chart: str) -> tuple[str, str]:
    """Wait until the VRAM panel shows a new predicted peak and a new chart; returns (peak text, chart src)."""
    page.wait_for_function("t => document.querySelector('.qlora-peak-gib').textContent !== t", arg=old_peak,
                           timeout=15_000)
    page.wait_for_function("s => { const i = document.querySelector('.qlora-peak').closest('.widget-vbox')"
                           ".querySelector('img'); return i && i.src !== s; }", arg=old_chart, timeout=15_000)
    return panel.locator(".qlora-peak-gib").first.inner_text(), panel.locator("img").first.get_attribute("src")


def test_lab01_panel_updates_in_the_browser(browser, jupyterlab):
    page, state = open_and_run(browser, jupyterlab, "01_vram_budget")
    try:
        assert state and not state["errors"], state
        assert state["done"] == state["total"], f"not finished: {state}"
        panel = page.locator(".widget-vbox", has=page.locator(".qlora-peak")).first
        panel.scroll_into_view_if_needed()
        peak = panel.locator(".qlora-peak-gib").first
        peak.wait_for(timeout=30_000)
        panel.locator("img").first.wait_for(timeout=30_000)
        before_peak, before_chart = peak.inner_text(), panel.locator("img").first.get_attribute("src")
        page.screenshot(path=str(SHOTS / "01_vram_budget_before.png"), full_page=False)
        panel.locator(".widget-toggle-button", has_text="full").first.click()  # method: qlora -> full
        after_method, method_chart = wait_for_redraw(page, panel, before_peak, before_chart)
        slider = panel.locator(".widget-hslider", has_text="batch").first
        slider.locator(".widget-readout").first.click()  # the slider's number is editable
        page.keyboard.press("Control+A")
        page.keyboard.type("16")
        page.keyboard.press("Enter")
        after_batch, after_chart = wait_for_redraw(page, panel, after_method, method_chart)
        page.screenshot(path=str(SHOTS / "01_vram_budget_after.png"), full_page=False)
        assert float(after_method) > float(before_peak)  # full fine-tuning needs more than QLoRA
        assert float(after_batch) > float(after_method)  # 16 sequences need more than 4
        assert len({before_chart, method_chart, after_chart}) == 3  # the chart was redrawn each time
    finally:
        close(page, "01_vram_budget")


@pytest.mark.parametrize("stem", [p.stem for p in sorted(paths.LABS_DIR.glob("[0-9][0-9]_*.ipynb"))
                                  if p.stem != "01_vram_budget"])
def test_lab_runs_in_the_browser(browser, jupyterlab, stem):
    page, state = open_and_run(browser, jupyterlab, stem)
    try:
        page.screenshot(path=str(SHOTS / f"{stem}.png"), full_page=False)
        assert state and not state["errors"], state
        assert state["done"] == state["total"], f"not finished: {state}"
    finally:
        close(page, stem)
