"""The dashboard page in a real browser: Debian's headless Chromium driven by selenium.

One browser for the module (a fresh profile folder), one dashboard server per test on a free
port, started in a thread. Skipped, with the reason, only where chromium/chromedriver are not
installed (CI installs them: `.ci/run`).
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from dashboard_runs import add_refusal, add_release, append_round, make_run, node_epsilon

from fedrank.dashboard import make_server

WAIT = 20.0  # upper bound only; a page normally renders well under a second
EVIL = '<img id="pwned" src="x" onerror="document.body.dataset.pwned=1">'

class Dashboard:
    """A dashboard server on a free port, in a thread."""

    def __init__(self, run: Path, **kwargs: object) -> None:
        self.server, self.sock, self.token = make_server(
            run, port=0, refresh_seconds=0.3, **kwargs)  # type: ignore[arg-type]
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + WAIT
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)

    def url(self, token: str | None = None) -> str:
        return f"http://127.0.0.1:{self.port}/" + (f"?token={token}" if token else "")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture
def serve() -> Iterator:
    started: list[Dashboard] = []

    def start(run: Path, **kwargs: object) -> Dashboard:
        started.append(Dashboard(run, **kwargs))
        return started[-1]

    yield start
    for dash in started:
        dash.stop()


def wait_for(driver, predicate, what: str):
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        value = predicate(driver)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; page text: {body_text(driver)[:500]}")


def body_text(driver) -> str:
    return driver.execute_script("return document.body.innerText")


def rounds_shown(driver) -> str | None:
    return driver.execute_script("return document.body.dataset.rounds || null")


def table_rows(driver, table: str) -> list[list[str]]:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0] + ' tbody tr')]"
        ".map(tr => [...tr.cells].map(td => td.textContent))", f"#{table}")


def test_page_shows_rounds_quality_and_epsilon_per_node(browser, serve, tmp_path):
    run = make_run(tmp_path, rounds=3, planned=5)
    add_refusal(run, "south", 4, node_epsilon(1, 3))
    fingerprint = add_release(run, 2)
    dash = serve(run)

    browser.get(dash.url())
    wait_for(browser, lambda d: rounds_shown(d) == "3", "3 rounds")

    assert "round 3 / 5" in browser.find_element("id", "round-text").text
    # Plotly drew the quality chart: federated (unseen, seen) + baselines, 4 points per line.
    traces = browser.execute_script(
        "const g = document.getElementById('quality-chart'); "
        "return g.data.map(t => [t.name, t.x.length]);")
    names = [name for name, _ in traces]
    assert "federated (unseen)" in names and "bm25 (unseen)" in names
    assert dict(traces)["federated (unseen)"] == 4  # round 0 (start) + 3 rounds
    assert browser.find_elements("css selector", "#quality-chart .scatterlayer .trace")
    assert browser.find_elements("css selector", "#epsilon-chart .scatterlayer .trace")
    nodes = {row[0]: row for row in table_rows(browser, "nodes-table")}
    assert nodes["north"][1] == f"{node_epsilon(0, 3):.4f}"
    assert nodes["south"][1] == f"{node_epsilon(1, 3):.4f}"
    assert nodes["south"][4] == "out of budget"
    release = table_rows(browser, "releases-table")[0]
    assert release[0] == "round-0002" and release[5] == "valid"
    assert fingerprint in browser.find_element("id", "release-key").text
    png = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(png)) and png.stat().st_size > 10_000


def test_page_updates_when_the_run_goes_on(browser, serve, tmp_path):
    run = make_run(tmp_path, rounds=2, planned=4)
    dash = serve(run)
    browser.get(dash.url())
    wait_for(browser, lambda d: rounds_shown(d) == "2", "2 rounds")

    append_round(run, 3)  # ledgers and metrics.json grow, as during a run

    wait_for(browser, lambda d: rounds_shown(d) == "3", "the page to show round 3")
    assert "round 3 / 4" in browser.find_element("id", "round-text").text
    nodes = {row[0]: row for row in table_rows(browser, "nodes-table")}
    assert nodes["north"][1] == f"{node_epsilon(0, 3):.4f}"
    points = browser.execute_script(
        "return document.getElementById('epsilon-chart').data[0].x.length")
    assert points == 3


def test_non_loopback_bind_refuses_requests_without_the_token(browser, serve, tmp_path):
    run = make_run(tmp_path, rounds=2)
    dash = serve(run, host="0.0.0.0")  # no --token: one is generated
    assert dash.token

    for path in ("", "api/state", "static/plotly.min.js"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(dash.url() + path, timeout=WAIT)
        assert refused.value.code == 401
    browser.get(dash.url())
    assert "token is required" in body_text(browser)
    assert rounds_shown(browser) is None

    browser.get(dash.url(dash.token))  # the printed URL: the page and its requests work
    wait_for(browser, lambda d: rounds_shown(d) == "2", "2 rounds with the token")


def test_malicious_node_name_is_shown_as_text(browser, serve, tmp_path):
    run = make_run(tmp_path, rounds=2, nodes=(EVIL, "<script>document.title='x'</script>"))
    dash = serve(run)
    browser.get(dash.url())
    wait_for(browser, lambda d: rounds_shown(d) == "2", "2 rounds")

    names = [row[0] for row in table_rows(browser, "nodes-table")]
    assert EVIL in names and "<script>document.title='x'</script>" in names
    assert browser.find_elements("id", "pwned") == []
    assert browser.execute_script("return document.body.dataset.pwned") is None
    assert browser.title == "fedrank dashboard"
    legend = browser.execute_script(
        "return [...document.querySelectorAll('#epsilon-chart .legendtext')]"
        ".map(e => e.textContent)")
    assert EVIL in legend  # plotly shows the name literally too
