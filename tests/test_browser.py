"""The lab as a person uses it: JupyterLab in headless Chromium.

The test starts JupyterLab on a free port of 127.0.0.1 with a token, serving a copy of the
notebooks (so nothing the browser saves reaches the repository), opens ``01_architecture`` in
Debian's Chromium driven by Playwright (its own browser download is not reachable here), runs all
cells from the Run menu, and checks what a reader sees: every cell ran without a traceback, the
expert-load heatmap is an image of real size, the ipywidgets rendered (the widget manager is
installed), and moving the routing explorer's layer control and the KV explorer's batch slider
redraws their figures. ``08_v3_to_v4`` runs the same way and its three figures must be images of
real size. Full-page screenshots go to ``results/browser/``.

Skipped, with the reason, when Chromium or Playwright is missing; ``make test-browser`` installs
Chromium with apt-get. Run directly to screenshot any notebooks::

    .venv/bin/python tests/test_browser.py notebooks/00_quickstart.ipynb ...
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from dsv3lab.paths import REPO_ROOT as ROOT

NOTEBOOKS = os.path.join(ROOT, "notebooks")
RESULTS = os.path.join(ROOT, "results", "browser")
# Debian's launcher script is /usr/bin/chromium; the binary it starts is the one Playwright needs
CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# the notebook on show (other open notebooks' panels stay in the page, hidden)
NB = ".jp-NotebookPanel:not(.lm-mod-hidden)"
RUN_TIMEOUT_S = 600          # the whole notebook, on a loaded 2-core machine
STEP_TIMEOUT_S = 120         # one widget redraw, one page load


def _nb(s: str) -> str:
    return s.replace("$NB", NB)


def shutdown_kernels(base: str, token: str) -> None:
    req = urllib.request.Request(f"{base}/api/kernels?token={token}")
    with urllib.request.urlopen(req, timeout=10) as r:
        kernels = json.load(r)
    for k in kernels:
        urllib.request.urlopen(urllib.request.Request(f"{base}/api/kernels/{k['id']}?token={token}",
                                                      method="DELETE"), timeout=30).close()


def chromium_path():
    for p in CHROMIUM_CANDIDATES:
        if os.access(p, os.X_OK):
            return p
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with code {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer {url} within {timeout:.0f} s")


@contextlib.contextmanager
def jupyterlab(notebooks: list[str]):
    """JupyterLab on 127.0.0.1:<free port> over a temporary copy of ``notebooks``, fresh settings
    (notebook windowing off, so every cell is in the page; no news fetching); yields
    (base_url, token, dir).
    The server and its kernels are stopped on exit, whatever happened."""
    tmp = tempfile.mkdtemp(prefix="dsv3lab-lab-")
    work, settings = os.path.join(tmp, "notebooks"), os.path.join(tmp, "settings")
    os.makedirs(work)
    for nb in notebooks:
        shutil.copy(nb, work)
    for plugin, values in {"notebook-extension/tracker": {"windowingMode": "none"},
                           "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False}
                           }.items():
        f = os.path.join(settings, "@jupyterlab", plugin + ".jupyterlab-settings")
        os.makedirs(os.path.dirname(f), exist_ok=True)
        with open(f, "w") as fh:
            json.dump(values, fh)
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=os.path.join(tmp, "runtime"), OMP_NUM_THREADS="1",
               TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    env.pop("MPLBACKEND", None)            # the notebooks choose %matplotlib inline themselves
    lab = os.path.join(ROOT, "data", "lab-model")
    if os.path.exists(os.path.join(lab, "config.json")):
        env["DSV3LAB_MODEL"] = lab
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
           f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={os.path.join(tmp, 'ws')}",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(os.path.join(tmp, "jupyterlab.log"), "w")
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{base}/api/status?token={token}", proc, STEP_TIMEOUT_S)
        yield base, token, work
    except BaseException:
        log.flush()
        with open(log.name) as f:
            sys.stderr.write("---- jupyterlab log (tail) ----\n" + f.read()[-4000:])
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)     # the server's own group: it and its kernels
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def chromium_page(width: int = 1400, height: int = 1000):
    """A Playwright page in headless Chromium with a fresh profile; closed on exit."""
    from playwright.sync_api import sync_playwright
    exe = chromium_path()
    if exe is None:
        raise RuntimeError(f"no Chromium at {' or '.join(CHROMIUM_CANDIDATES)}")
    profile = tempfile.mkdtemp(prefix="dsv3lab-chromium-")
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                profile, executable_path=exe, headless=True, args=CHROMIUM_FLAGS,
                viewport={"width": width, "height": height}, timeout=STEP_TIMEOUT_S * 1000)
            try:
                page = ctx.pages[0] if ctx.pages else ctx.new_page()
                page.set_default_timeout(STEP_TIMEOUT_S * 1000)
                yield page
            finally:
                ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


# ---- what a person does, as page steps -------------------------------------------------------

# the kernel is ready when the notebook toolbar names a kernel and its status is idle
KERNEL_READY_JS = """() => {
    const name = document.querySelector('$NB .jp-KernelName, $NB .jp-Toolbar-kernelName');
    const ind = document.querySelector('$NB .jp-Notebook-ExecutionIndicator');
    return !!name && !/No Kernel/.test(name.textContent) && !!ind && ind.getAttribute('data-status') === 'idle';
}"""


def open_notebook(page, base: str, token: str, name: str) -> None:
    # ?reset: a fresh workspace, so notebooks opened before are not restored beside this one
    page.goto(f"{base}/lab/tree/{name}?reset&token={token}", wait_until="domcontentloaded")
    page.wait_for_selector(_nb("$NB .jp-Cell"), state="attached")
    # a notebook without kernelspec metadata asks which kernel: take the preselected Python 3
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while True:
        dialog = page.locator(".jp-Dialog", has_text="Select Kernel")
        if dialog.count():
            dialog.locator("button", has_text="Select").click()
        if page.evaluate(_nb(KERNEL_READY_JS)):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: the kernel did not become idle within {STEP_TIMEOUT_S} s")
        page.wait_for_timeout(500)
    # fold the file browser away: the notebook gets the page's width
    tab = page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current")
    if tab.count():
        tab.first.click()


def run_all_cells(page) -> None:
    """Run > Run All Cells, from the menu bar; then wait until every code cell has a number."""
    item = page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first
    for attempt in range(5):            # the menu bar may not take the first click while the lab settles
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        try:
            item.wait_for(state="visible", timeout=10_000)
            break
        except Exception:
            page.keyboard.press("Escape")
    item.click()
    page.wait_for_function(_nb("""() => {
        const prompts = [...document.querySelectorAll('$NB .jp-CodeCell .jp-InputArea-prompt')];
        const errors = document.querySelectorAll('$NB [data-mime-type="application/vnd.jupyter.error"]');
        if (errors.length) return true;    // stop waiting: the check below reports it
        return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
    }"""), timeout=RUN_TIMEOUT_S * 1000, polling=1000)


def cell_errors(page) -> list[str]:
    """Texts of error outputs (tracebacks), and cells that never ran."""
    errs = page.eval_on_selector_all(_nb(
        '$NB .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"], '
        '$NB .jp-RenderedText[data-mime-type="application/vnd.jupyter.error"]'),
        "els => els.map(e => e.textContent.slice(0, 2000))")
    unrun = page.eval_on_selector_all(
        _nb("$NB .jp-CodeCell .jp-InputArea-prompt"),
        "els => els.map((e, i) => [i, e.textContent]).filter(([i, t]) => !/\\[\\d+\\]/.test(t))")
    return errs + [f"code cell {i} did not run (prompt {t!r})" for i, t in unrun]


def code_cell(page, source_snippet: str):
    """The code cell whose source contains ``source_snippet``."""
    cell = page.locator(_nb("$NB .jp-CodeCell")).filter(
        has=page.locator(".jp-InputArea-editor", has_text=source_snippet))
    assert cell.count() >= 1, f"no code cell with {source_snippet!r}"
    return cell.first


def image_stats(img) -> dict:
    return img.evaluate("""i => ({w: i.naturalWidth, h: i.naturalHeight, src_len: i.src.length,
                                 shown_w: i.getBoundingClientRect().width, src: i.src})""")


def output_image_src(cell, n: int) -> str:
    """src of the n-th figure in the cell's widget outputs (a redraw replaces the <img>)."""
    return cell.evaluate("(c, n) => { const i = c.querySelectorAll('.widget-output img')[n]; return i ? i.src : ''; }", n)


def wait_figure_change(cell, n: int, before: str) -> str:
    """Wait (bounded) until the n-th widget figure of ``cell`` is a different image than ``before``."""
    cell.page.wait_for_function(
        "([c, n, s]) => { const i = c.querySelectorAll('.widget-output img')[n]; return !!i && !!i.src && i.src !== s; }",
        arg=[cell.element_handle(), n, before], timeout=STEP_TIMEOUT_S * 1000, polling=250)
    return output_image_src(cell, n)


def full_page_screenshot(page, path: str) -> str:
    """The whole notebook in one PNG: the lab scrolls inside its notebook panel, so the viewport
    is grown to the panel's content height first (capped)."""
    h = page.evaluate(_nb("""() => {
        const nb = document.querySelector('$NB .jp-WindowedPanel-outer')
                || document.querySelector('$NB .jp-Notebook');
        return nb ? nb.scrollHeight : document.body.scrollHeight;
    }"""))
    vp = page.viewport_size
    page.set_viewport_size({"width": vp["width"], "height": int(min(max(h + 200, vp["height"]), 30000))})
    page.evaluate(_nb("""() => {
        for (const el of document.querySelectorAll('$NB .jp-WindowedPanel-outer, $NB .jp-Notebook')) el.scrollTop = 0;
    }"""))
    page.wait_for_timeout(500)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    page.screenshot(path=path, full_page=True)
    page.set_viewport_size(vp)
    return path


def screenshot_notebooks(paths: list[str], out_dir: str = RESULTS) -> list[tuple[str, list[str]]]:
    """Open each notebook, run all cells, screenshot it; returns (png, errors) per notebook."""
    done = []
    with jupyterlab(paths) as (base, token, _), chromium_page() as page:
        for p in paths:
            name = os.path.basename(p)
            open_notebook(page, base, token, name)
            run_all_cells(page)
            page.wait_for_timeout(1500)      # late widget renders
            png = full_page_screenshot(page, os.path.join(out_dir, name.replace(".ipynb", ".png")))
            done.append((png, cell_errors(page)))
            shutdown_kernels(base, token)       # one kernel at a time on a small machine
    return done


# ---- the test --------------------------------------------------------------------------------

def _skip_reason():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install -r requirements.txt)"
    if chromium_path() is None:
        return ("Chromium is not installed (no /usr/bin/chromium): `make test-browser` installs it "
                "with apt-get")
    return None


@contextlib.contextmanager
def notebook_run(name: str):
    """One notebook of notebooks/ opened in JupyterLab in Chromium and run from the Run menu:
    yields the page, the cells' error texts and where its screenshot goes."""
    with jupyterlab([os.path.join(NOTEBOOKS, name)]) as (base, token, _), chromium_page() as page:
        open_notebook(page, base, token, name)
        run_all_cells(page)
        yield page, cell_errors(page), os.path.join(RESULTS, name.replace(".ipynb", ".png"))


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_architecture_notebook_in_jupyterlab():
    with notebook_run("01_architecture.ipynb") as (page, errors, shot):
        try:
            assert not errors, "cells failed in the browser:\n" + "\n---\n".join(errors)

            # the expert-load heatmap rendered as an image of real size
            heat = code_cell(page, "expert_load_heatmap(").locator(".jp-OutputArea-output img").first
            heat.wait_for(state="visible")
            s = image_stats(heat)
            assert s["w"] >= 300 and s["h"] >= 150 and s["src_len"] > 10_000 and s["shown_w"] >= 200, s

            # the widgets rendered through the lab's widget manager, not as their text fallback
            explore = code_cell(page, "RoutingExplorer(")
            explore.locator(".jupyter-widgets.widget-dropdown select").first.wait_for(state="visible")
            assert "VBox(children" not in explore.inner_text()

            # choose another layer: the routing figure (the cell's first widget figure) is redrawn
            layer = explore.locator(".widget-dropdown", has_text="layer").locator("select").first
            explore.locator(".widget-output img").first.wait_for(state="visible")
            before = output_image_src(explore, 0)
            options = layer.evaluate("s => [...s.options].map(o => o.value)")
            current = layer.evaluate("s => s.value")
            assert len(options) >= 2, options
            layer.select_option(next(o for o in options if o != current))
            after = wait_figure_change(explore, 0, before)
            assert after.startswith("data:image/png") and len(after) > 10_000

            # move the KV explorer's batch slider with the keyboard: its figure (the second) changes
            slider = explore.locator(".widget-slider", has_text="batch").locator(".noUi-handle").first
            explore.locator(".widget-output img").nth(1).wait_for(state="visible")
            before = output_image_src(explore, 1)
            slider.focus()
            page.keyboard.press("ArrowRight")
            wait_figure_change(explore, 1, before)
        finally:
            full_page_screenshot(page, shot)
    assert os.path.getsize(shot) > 50_000


# notebook 08's three figures, by a line of the cell that draws each
V4_FIGURES = ('cache[f"layers.{i}.attn_hc.hook_comb"]',       # the mHC mixing matrices across depth
              "t.routing.expert_load()",                      # hash against learned routing load
              'kv_cache_bytes_per_token("v3-671b")')          # KV bytes per token against context, V3 to V4


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_v3_to_v4_notebook_in_jupyterlab():
    """Notebook 08 (what changed from V3 to V4) as a reader sees it: every cell ran in the browser
    without a traceback and each of its figures is an image of real size on the page."""
    with notebook_run("08_v3_to_v4.ipynb") as (page, errors, shot):
        try:
            assert not errors, "cells failed in the browser:\n" + "\n---\n".join(errors)
            for marker in V4_FIGURES:
                img = code_cell(page, marker).locator(".jp-OutputArea-output img").first
                img.wait_for(state="visible")
                s = image_stats(img)
                assert s["w"] >= 300 and s["h"] >= 150 and s["src_len"] > 10_000 and s["shown_w"] >= 200, (marker, s)
        finally:
            full_page_screenshot(page, shot)
    assert os.path.getsize(shot) > 50_000


if __name__ == "__main__":
    paths = sys.argv[1:] or sorted(os.path.join(NOTEBOOKS, n) for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb"))
    for png, errs in screenshot_notebooks([os.path.abspath(p) for p in paths]):
        print(png, "OK" if not errs else f"{len(errs)} problem(s):\n" + "\n".join(e[:500] for e in errs))
