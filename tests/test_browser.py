"""The dashboard in a real browser: Debian's Chromium driven by Playwright against a live server.

Starts the app as `make app` does, opens the page, clicks Step and Run, waits until the charts change, fails on
any exception shown on the page, and keeps screenshots in artifacts/screenshots/. A long walk checks the live
charts (app/live_chart.py) follow the walk point by point and that Pause answers while it runs.
"""
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

if CHROMIUM is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI needs Chromium for the browser test (make test installs Debian's chromium)")
    pytest.skip("chromium is not installed (make test installs it as root)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The server's run store: a folder of the test's own, not the checkout's runs/."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def server(tmp_path_factory, store):
    port = _free_port()
    env = {**os.environ, "GEODESIC_CACHE": str(tmp_path_factory.mktemp("cache")), "GEODESIC_RUNS": str(store)}
    proc = subprocess.Popen([sys.executable, "-m", "app.serve",
                             "--server.headless", "true", "--server.address", "127.0.0.1", "--server.port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError(f"streamlit did not start: {proc.stdout.read().decode()[-2000:]}")
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # A persistent context in a fresh folder: a new, empty --user-data-dir for every run.
        context = p.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("chromium")),
                                                       executable_path=CHROMIUM, args=FLAGS, headless=True,
                                                       viewport={"width": 1400, "height": 1000})
        yield context
        context.close()


def _no_exception(page) -> None:
    shown = page.locator("[data-testid='stException']")
    assert shown.count() == 0, shown.first.inner_text()


def _step_value(page) -> int:
    metric = page.locator("[data-testid='stMetric']").filter(has_text="step").first
    return int(metric.locator("[data-testid='stMetricValue']").inner_text())


def test_step_and_run_change_the_charts(server, browser):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page()
    elsewhere = []  # the app works offline: nothing the page loads may come from another host
    page.on("request", lambda r: elsewhere.append(r.url) if not r.url.startswith((server, "data:", "blob:")) else None)
    page.goto(server)
    page.get_by_role("button", name="Step", exact=True).wait_for(timeout=120_000)
    page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
    _no_exception(page)
    page.screenshot(path=str(SHOTS / "01-start.png"), full_page=True)
    assert _step_value(page) == 0

    page.get_by_role("button", name="Step", exact=True).click()
    page.wait_for_function("() => [...document.querySelectorAll('[data-testid=stMetricValue]')]"
                           ".some(e => e.innerText.trim() === '1')", timeout=30_000)
    _no_exception(page)

    before = page.locator(".js-plotly-plot").first.evaluate("el => el._fullData[0].x.length")
    page.get_by_role("button", name="Run", exact=True).click()
    # The default walk reaches its goal in a few hundred steps (seconds): wait for the charts to grow by more
    # than 10 points, then pause if it is still running.
    page.wait_for_function("(n) => { const el = document.querySelector('.js-plotly-plot');"
                           " return el && el._fullData && el._fullData[0].x.length > n + 10; }", arg=int(before),
                           timeout=60_000)
    _no_exception(page)
    page.screenshot(path=str(SHOTS / "02-running.png"), full_page=True)
    pause = page.get_by_role("button", name="Pause", exact=True)
    if pause.is_visible():
        pause.click()
    page.get_by_role("button", name="Run", exact=True).wait_for(timeout=30_000)
    time.sleep(1.5)
    stopped = _step_value(page)
    time.sleep(1.5)
    assert _step_value(page) == stopped  # paused (or finished): no step after
    assert stopped >= 10

    page.get_by_text("Path", exact=True).click()
    page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)
    time.sleep(1)
    _no_exception(page)
    page.screenshot(path=str(SHOTS / "03-path.png"), full_page=True)
    page.get_by_text("Learn", exact=True).first.click()
    page.get_by_text("How a functionally invariant walk works").wait_for(timeout=30_000)
    _no_exception(page)
    page.screenshot(path=str(SHOTS / "04-learn.png"), full_page=True)
    assert elsewhere == [], elsewhere  # e.g. a Material icon as the tab's icon is fetched from fonts.gstatic.com
    page.close()


def _chart_and_step(page) -> tuple[int, int]:
    """(points of the first trace of the first live chart, the step shown), read together."""
    return page.evaluate("() => { const el = document.querySelector('.geodesic-live-chart');"
                         " const v = document.querySelector('[data-testid=stMetricValue]');"
                         " return [el && el.data && el.data[0].x ? el.data[0].x.length : 0, parseInt(v.innerText)]; }")


def test_the_live_chart_follows_a_long_walk_and_pause_answers_while_it_runs(server, browser):
    page = browser.new_page()
    page.goto(f"{server}/?goal=new-task&steps=100000")  # a walk with no end: it runs until paused
    page.locator(".geodesic-live-chart.js-plotly-plot").first.wait_for(timeout=120_000)
    page.get_by_role("button", name="Run", exact=True).click()
    page.wait_for_function("() => parseInt(document.querySelector('[data-testid=stMetricValue]').innerText) > 300",
                           timeout=120_000)
    for _ in range(5):  # every point of the walk is on the chart (the point count follows the step number)
        points, step = _chart_and_step(page)
        # The step shown and the chart are drawn by the same refresh, from reads a moment apart (the engine walks on).
        assert abs(points - (step + 1)) <= 40, (points, step)
        time.sleep(0.4)
    _no_exception(page)
    answers = []
    for _ in range(3):  # Pause, then Run again: each click answered quickly while the walk runs
        t0 = time.perf_counter()
        page.get_by_role("button", name="Pause", exact=True).click()
        page.get_by_role("button", name="Run", exact=True).wait_for(timeout=10_000)
        answers.append(time.perf_counter() - t0)
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_role("button", name="Pause", exact=True).wait_for(timeout=10_000)
        time.sleep(1.0)
    # The median of three Pause clicks: answered while the walk runs, not after it (the walk has no end). How fast is a
    # benchmark's figure (bench/dashboard_speed.py: 0.16-0.25 s, BENCHMARKS.md), not this test's: with 0.5 s here it
    # failed at 0.51 s on a fresh clone sharing its two cores with other Chromium pages.
    assert sorted(answers)[1] < 2.0, answers
    page.get_by_role("button", name="Pause", exact=True).click()
    _no_exception(page)
    page.close()


def test_a_chart_out_of_sight_waits_and_catches_up_when_scrolled_to(server, browser):
    """The second live chart starts below the fold: while the walk runs it keeps its updates instead of drawing
    them, and when scrolled into view it draws them and follows the walk again."""
    page = browser.new_page()
    page.goto(f"{server}/?goal=new-task&steps=100000")
    page.locator(".geodesic-live-chart.js-plotly-plot").first.wait_for(timeout=120_000)
    page.get_by_role("button", name="Run", exact=True).click()
    page.wait_for_function("() => parseInt(document.querySelector('[data-testid=stMetricValue]').innerText) > 200",
                           timeout=120_000)
    read = ("() => [...document.querySelectorAll('.geodesic-live-chart')].map(c => ["
            "c.getBoundingClientRect().top, Number(c.dataset.pending || 0), c.data && c.data[0].x ? "
            "c.data[0].x.length : 0])")
    charts = page.evaluate(read)
    assert len(charts) >= 2
    top, pending, points = charts[1]
    assert top > 1000 and pending > 0, charts  # below the 1,000-pixel viewport: updates wait
    assert points < charts[0][2] - 50, charts  # and it has drawn none of them
    page.locator(".geodesic-live-chart").nth(1).scroll_into_view_if_needed()
    page.wait_for_function("() => { const c = document.querySelectorAll('.geodesic-live-chart')[1];"
                           " const v = parseInt(document.querySelector('[data-testid=stMetricValue]').innerText);"
                           " return c.data && Math.abs(c.data[0].x.length - (v + 1)) <= 40; }", timeout=30_000)
    assert page.evaluate(read)[1][1] == 0
    page.get_by_role("button", name="Pause", exact=True).click()
    _no_exception(page)
    page.close()


def test_a_fan_of_step_sizes_is_drawn_one_colour_each_and_one_is_kept(server, browser):
    page = browser.new_page()
    page.goto(server)
    page.get_by_role("button", name="Step", exact=True).wait_for(timeout=120_000)
    page.locator(".geodesic-live-chart.js-plotly-plot").first.wait_for(timeout=60_000)
    page.get_by_role("button", name="Step", exact=True).click()
    page.wait_for_function("() => [...document.querySelectorAll('[data-testid=stMetricValue]')]"
                           ".some(e => e.innerText.trim() === '1')", timeout=30_000)
    page.get_by_text("Compare step sizes (a fan of walks from here)").click()
    values = page.get_by_label("Values, 2 to 7, comma-separated")
    values.fill("0.05, 0.1, 0.4")
    values.press("Enter")
    page.get_by_role("button", name="Launch the fan", exact=True).click()
    page.locator("[data-testid='stDataFrame']").first.wait_for(timeout=30_000)  # the fan's table, above the charts
    # The fan's controls and table push the chart below a 1000-pixel window, and a chart out of sight keeps its
    # updates until it is seen (app/live_chart.py): look at it, as a user would scroll to it.
    page.locator(".geodesic-live-chart").first.scroll_into_view_if_needed()
    labels = ["ε=0.05 @ 1", "ε=0.1 @ 1", "ε=0.4 @ 1"]
    # Every fan walk gets its own traces on the accuracy chart, each in its own colour, and they grow as it walks.
    page.wait_for_function(
        "(labels) => { const el = document.querySelector('.geodesic-live-chart.js-plotly-plot');"
        " if (!el || !el.data) return false;"
        " return labels.every(l => el.data.some(t => (t.name || '').startsWith(l + ':') && t.x && t.x.length > 5)); }",
        arg=labels, timeout=120_000)
    colours = page.evaluate(
        "(labels) => { const el = document.querySelector('.geodesic-live-chart.js-plotly-plot');"
        " return labels.map(l => el._fullData.find(t => (t.name || '').startsWith(l + ':')).line.color); }", labels)
    assert len(set(colours)) == 3, colours
    _no_exception(page)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "05-fan.png"), full_page=True)
    # On the Path view every walk's points are coloured on one scale, whose bar spans them all (each trace had
    # its own scale, and the bar showed the first walk's: 1e-15 wide for the points the basis was fitted on).
    page.locator("[data-testid=stButtonGroup]").get_by_text("Path", exact=True).click()
    page.wait_for_function("() => [...document.querySelectorAll('.geodesic-live-chart')].some("
                           "e => (e.innerText || '').includes('PCA') || (e.layout && e.layout.title"
                           " && (e.layout.title.text || '').includes('PCA')))", timeout=60_000)
    page.locator(".geodesic-live-chart").first.scroll_into_view_if_needed()  # (out of sight, it would wait)
    page.wait_for_function(
        "(l) => { const el = document.querySelector('.geodesic-live-chart.js-plotly-plot');"
        " return el && el.data && el.data.some(t => t.name === l && t.marker && t.marker.color"
        " && t.marker.color.length > 5); }", arg=labels[-1], timeout=60_000)
    scale = page.evaluate(
        "() => { const el = document.querySelector('.geodesic-live-chart.js-plotly-plot');"
        " const coloured = el.data.filter(t => t.marker && typeof t.marker.color === 'object'"
        " && t.marker.color.length > 1);"  # (the start and current markers have one colour, a string)
        " const all = coloured.flatMap(t => Array.from(t.marker.color));"
        " const axis = el._fullLayout.coloraxis || {};"
        " return {names: coloured.map(t => t.name), axes: coloured.map(t => t.marker.coloraxis),"
        " low: Math.min(...all), high: Math.max(...all), cmin: axis.cmin, cmax: axis.cmax}; }")
    assert set(labels) <= set(scale["names"]), scale["names"]
    assert set(scale["axes"]) == {"coloraxis"}, scale
    assert scale["cmin"] <= scale["low"] + 1e-9 and scale["cmax"] >= scale["high"] - 1e-9, scale
    table = page.locator("[data-testid='stDataFrame']").first
    table.wait_for(timeout=30_000)
    page.get_by_role("button", name="Keep this one as the walk that steps", exact=True).click()
    page.get_by_role("button", name="Keep this one as the walk that steps", exact=True).wait_for(
        state="detached", timeout=30_000)  # the fan is closed: its table and buttons are gone
    _no_exception(page)
    page.close()


CUT_TEXT = """() => [...document.querySelectorAll('[data-testid=stMain] *')].filter(e => {
    const style = getComputedStyle(e);
    return style.textOverflow === 'ellipsis' && e.offsetParent !== null && e.scrollWidth > e.clientWidth + 1
        && e.innerText.trim(); }).map(e => e.innerText.trim())"""


def test_on_a_tablet_with_the_sidebar_open_no_value_or_button_is_cut(server, browser):
    """At 820 pixels wide (a tablet, half a laptop's screen), st.columns cut the status row's values to "97.…" and
    "41.…", and the buttons to "Re…", "Keep this one a…", "Weights (.sa…", "Compute the spectrum at the current p…":
    the rows now wrap instead, and labels that could not are shorter."""
    page = browser.new_page()
    page.set_viewport_size({"width": 820, "height": 1100})
    page.goto(server)
    page.get_by_role("button", name="Step", exact=True).wait_for(timeout=120_000)
    page.get_by_role("button", name="Step", exact=True).click()
    page.wait_for_function("() => [...document.querySelectorAll('[data-testid=stMetricValue]')]"
                           ".some(e => e.innerText.trim() === '1')", timeout=30_000)
    page.get_by_text("Compare step sizes (a fan of walks from here)").click()
    page.get_by_role("button", name="Launch the fan", exact=True).click()
    page.get_by_role("button", name="Keep this one as the walk that steps", exact=True).wait_for(timeout=30_000)
    time.sleep(1)
    cut = {"Overview": page.evaluate(CUT_TEXT)}
    for view, button in (("Path", "Refit PCA basis"), ("Metric", "Compute the spectrum"), ("Data", "Table (CSV)")):
        page.locator("[data-testid=stButtonGroup]").get_by_text(view, exact=True).click()
        page.get_by_role("button", name=button, exact=True).wait_for(timeout=60_000)
        time.sleep(1)
        cut[view] = page.evaluate(CUT_TEXT)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "08-tablet.png"))
    assert not any(cut.values()), cut
    page.get_by_role("button", name="Stop the fan", exact=True).click()
    _no_exception(page)
    page.close()


def test_every_download_of_the_data_view_arrives_even_clicked_one_after_another(server, browser):
    """Each click used to rerun the page, which replaced the other buttons' files: a second download clicked
    soon after the first found its file gone (nothing downloaded). The chart's HTML opens offline."""
    page = browser.new_page()
    page.goto(server)
    page.get_by_role("button", name="Step", exact=True).wait_for(timeout=120_000)
    page.get_by_role("button", name="Step", exact=True).click()
    page.locator("[data-testid=stButtonGroup]").get_by_text("Data", exact=True).click()
    buttons = page.locator("[data-testid=stDownloadButton] button")
    buttons.first.wait_for(timeout=30_000)
    assert buttons.count() == 4
    files = {}
    for i in range(4):
        with page.expect_download(timeout=30_000) as download:
            buttons.nth(i).click()
        files[download.value.suggested_filename] = Path(download.value.path()).read_bytes()
    by_kind = {name.rsplit(".", 1)[-1]: data for name, data in files.items()}
    assert set(by_kind) == {"csv", "parquet", "safetensors", "html"}, list(files)
    assert by_kind["csv"].startswith(b"step,") and by_kind["parquet"].startswith(b"PAR1")
    assert b"<script src=\"https://cdn.plot.ly" not in by_kind["html"] and len(by_kind["html"]) > 1_000_000  # inside
    _no_exception(page)
    page.close()


def test_the_umap_box_stays_open_through_the_refreshes_and_changes_above_it(server, browser):
    """The UMAP box closed by itself: Chromium drew it anew, closed, when the live refresh stopped (the baselines
    arriving) and when "Recompute contour" first appeared above it; the first change inside it (n_neighbors, or the
    UMAP asked for) hid what it showed."""
    page = browser.new_page()
    page.goto(server)
    page.get_by_role("button", name="Step", exact=True).wait_for(timeout=120_000)
    for _ in range(3):  # a path of 4 points: enough for the projection
        page.get_by_role("button", name="Step", exact=True).click()
        page.wait_for_timeout(800)
    page.locator("[data-testid=stButtonGroup]").get_by_text("Path", exact=True).click()
    box = page.locator("details").filter(has=page.locator("summary").filter(has_text="UMAP (on demand)")).first
    box.locator("summary").click()
    page.get_by_text("Loss contour behind the path").click()
    page.get_by_role("button", name="Recompute contour").wait_for(timeout=60_000)
    page.get_by_text("Computing the baselines").wait_for(state="detached", timeout=120_000)
    field = page.get_by_role("spinbutton", name="n_neighbors")
    field.fill("20")
    field.press("Enter")
    page.wait_for_timeout(3000)  # the rerun that the change asks for
    assert box.get_attribute("open") is not None and field.is_visible() and field.input_value() == "20"
    _no_exception(page)
    page.close()


def _wait_step(page, n: int, timeout: float = 30.0) -> None:
    page.wait_for_function("(n) => [...document.querySelectorAll('[data-testid=stMetric]')].some(m =>"
                           " m.innerText.includes('step') && m.querySelector('[data-testid=stMetricValue]')"
                           ".innerText.trim() === String(n))", arg=n, timeout=timeout * 1000)


def _tab_token(page) -> str | None:
    return page.evaluate("() => sessionStorage.getItem('geodesic-tab')")


def test_a_reload_gives_the_tab_its_walk_back_and_a_duplicated_tab_gets_its_own(server, browser):
    """A reload is a new Streamlit session: the walk on screen was lost with the old one (step 0 again). The tab's
    token (sessionStorage, app/tab.py) now brings back its walk and its view, with two tabs open at once; a tab
    that carries another open tab's token (a duplicated tab) gets a token and a walk of its own."""
    a, b = browser.new_page(), browser.new_page()
    for page, link in ((a, server), (b, f"{server}/?teach=1")):  # b: a student at the teacher's link
        page.goto(link)
        page.get_by_role("button", name="Step", exact=True).wait_for(timeout=120_000)
    for page, steps in ((a, 2), (b, 1)):
        for n in range(1, steps + 1):
            page.get_by_role("button", name="Step", exact=True).click()
            _wait_step(page, n)
    a.locator("[data-testid=stButtonGroup]").get_by_text("Path", exact=True).click()
    a.get_by_role("button", name="Refit PCA basis").wait_for(timeout=30_000)
    token_a, token_b = _tab_token(a), _tab_token(b)
    assert token_a and token_b and token_a != token_b

    a.reload()
    _wait_step(a, 2)
    a.get_by_role("button", name="Refit PCA basis").wait_for(timeout=30_000)  # the view it showed
    a.wait_for_timeout(1500)
    assert _step_value(a) == 2 and _tab_token(a) == token_a
    assert _step_value(b) == 1

    c = browser.new_page()  # as "Duplicate tab" does: the storage of a tab that is still open
    c.add_init_script(f"if (!sessionStorage.getItem('geodesic-tab')) sessionStorage.setItem('geodesic-tab', "
                      f"'{token_a}')")
    c.goto(server)
    c.get_by_role("button", name="Step", exact=True).wait_for(timeout=120_000)
    c.wait_for_function("(t) => sessionStorage.getItem('geodesic-tab') !== t", arg=token_a, timeout=30_000)
    c.wait_for_timeout(1500)
    assert _step_value(c) == 0 and _step_value(a) == 2

    # Teach mode comes back too: the link's ?teach=1 is gone from the URL on another page, and a reload there
    # showed the student the whole set-up.
    b.get_by_text("Learn", exact=True).first.click()
    b.get_by_text("How a functionally invariant walk works").wait_for(timeout=30_000)
    b.reload()
    b.get_by_text("How a functionally invariant walk works").wait_for(timeout=30_000)
    b.get_by_text("Explore", exact=True).first.click()
    _wait_step(b, 1)
    assert b.get_by_text("Set up a walk").count() == 0

    # A walk running when its tab is reloaded goes on, and the page sees it stop: the button went back to Run only
    # in the session that had clicked Run, so it read "Pause" under "Stopped: goal reached".
    a.get_by_role("button", name="Run", exact=True).click()
    a.get_by_role("button", name="Pause", exact=True).wait_for(timeout=30_000)
    a.reload()
    a.get_by_role("button", name="Pause", exact=True).wait_for(timeout=60_000)
    a.get_by_text("Stopped: goal reached").wait_for(timeout=120_000)
    a.get_by_role("button", name="Run", exact=True).wait_for(timeout=10_000)
    assert _step_value(a) > 2
    for page in (a, b, c):
        _no_exception(page)
        page.close()


def test_two_pages_closing_unsaved_walks_at_once_are_asked_in_sight_and_each_keeps_its_run(server, browser, store):
    """A new walk closed the walk on screen without a word. It asks now, in a dialog seen wherever the page was
    scrolled to (the sidebar's button stays in view, the top of the page does not), and two pages saving at once
    walks of the same settings and step (one offered name) each get a run of their own."""
    pages = [browser.new_page(), browser.new_page()]
    for page in pages:
        page.goto(server)
        page.get_by_role("button", name="Step", exact=True).wait_for(timeout=120_000)
    for n in (1, 2):
        for page in pages:
            page.get_by_role("button", name="Step", exact=True).click()
            _wait_step(page, n)
    # the second page's walk has a fan running beside it: a fan's walks are saved too, and the toast that says so
    # was lost (the first refresh saw the closed fan stop and ran the page again in the middle of that run)
    pages[1].get_by_text("Compare step sizes (a fan of walks from here)").click()
    pages[1].get_by_role("button", name="Launch the fan", exact=True).click()
    pages[1].locator("[data-testid='stDataFrame']").first.wait_for(timeout=30_000)
    for page in pages:
        page.locator(".js-plotly-plot").last.scroll_into_view_if_needed()  # reading the charts at the page's foot
        page.get_by_role("button", name="Start a new walk with these settings").click()
    # (a fan walk that has not stepped yet has nothing to lose: it is not listed)
    for page, asked in zip(pages, ["The walk on screen has 2 steps not saved. A new walk closes it.",
                                   "walks on screen have steps not saved: main (2 steps), ε="], strict=True):
        question = page.get_by_role("dialog").get_by_text(asked)
        question.wait_for(timeout=30_000)
        box = question.bounding_box()
        assert box is not None and 0 <= box["y"] and box["y"] + box["height"] <= 1000, box  # in sight
        assert _step_value(page) == 2  # nothing closed while it asks
    pages[0].screenshot(path=str(SHOTS / "10-unsaved-question.png"))
    listed = re.findall(r"ε=([0-9.]+) @ 2 \(", pages[1].get_by_role("dialog").inner_text())  # the fan walks asked about
    assert listed and set(listed) <= {"0.1", "0.2", "0.4"}, listed
    for page in pages:  # both answer before either has saved
        page.get_by_role("button", name="Save and go on").click()
    for page in pages:
        page.get_by_text("Saved before closing").wait_for(timeout=60_000)
        _wait_step(page, 0)
        assert page.get_by_role("dialog").count() == 0
        _no_exception(page)
    saved = sorted(p.name for p in store.iterdir() if p.name.startswith("sparsify-constrained-seed0-step2"))
    assert saved == ["sparsify-constrained-seed0-step2", "sparsify-constrained-seed0-step2-2"], saved
    fan = sorted(p.name for p in store.iterdir() if p.name.startswith("sparsify-constrained-seed0-eps-"))
    assert [name.split("-step")[0] for name in fan] == [f"sparsify-constrained-seed0-eps-{e}-at-2"
                                                        for e in sorted(listed)], fan
    assert all((store / name / "steps.parquet").exists() for name in saved + fan)

    # closed with Esc: the same as Cancel (the walk kept, and no question back at the page's next run)
    page = pages[0]
    page.get_by_role("button", name="Step", exact=True).click()
    _wait_step(page, 1)
    page.get_by_role("button", name="Reset", exact=True).click()
    page.get_by_role("dialog").wait_for(timeout=30_000)
    page.keyboard.press("Escape")
    page.get_by_role("dialog").wait_for(state="detached", timeout=10_000)
    page.get_by_role("button", name="Step", exact=True).click()  # a run of the whole page
    _wait_step(page, 2)
    page.wait_for_timeout(1000)
    assert page.get_by_role("dialog").count() == 0 and _step_value(page) == 2

    # "don't ask again" holds for the tab, through a reload too
    page.get_by_role("button", name="Reset", exact=True).click()
    page.get_by_role("dialog").get_by_text("Don't ask again in this session").click()
    page.get_by_role("button", name="Go on without saving").click()
    _wait_step(page, 0)
    page.reload()
    page.get_by_text("Your walk is back").wait_for(timeout=30_000)
    page.get_by_role("button", name="Step", exact=True).click()
    _wait_step(page, 1)
    page.get_by_role("button", name="Reset", exact=True).click()
    _wait_step(page, 0)
    assert page.get_by_role("dialog").count() == 0
    for page in pages:
        page.close()
