"""audit.html in headless Chromium: outcome first, per-round ε folded per node, and every
table within a 1280-pixel window."""

from __future__ import annotations

import json

from dashboard_runs import make_run

from privacy.audit import CANARIES_JSON, write_audit

NODES = tuple(f"region-{i}-with-a-rather-long-name" for i in range(5))


def test_audit_page_folds_rounds_and_fits_1280_pixels(browser, tmp_path):
    # Prepare: a 30-round, 5-node run (150 per-round ε rows) and a canary result.
    run = make_run(tmp_path, rounds=30, planned=30, nodes=NODES)
    (run / CANARIES_JSON).write_text(json.dumps({
        "result": "pass", "claimed_epsilon": 2.0, "epsilon_lower_bound": 0.12,
        "correct": 41, "guesses": 50, "positive_control_epsilon_lower_bound": 3.4}))
    html_path, _ = write_audit(run)

    # Execute
    browser.get(html_path.as_uri())

    # Assert: verification and canary outcome come before any section.
    first = browser.execute_script(
        "const box = document.getElementById('outcome');"
        "return box && box.compareDocumentPosition(document.querySelector('h2')) & 4;")
    assert first
    outcome = browser.find_element("id", "outcome").text
    assert "Verification:" in outcome and "Canary audit: PASS" in outcome and "0.1200" in outcome
    # One closed <details> per node; opening one shows its 30 rounds.
    folded = browser.find_elements("css selector", "#epsilon-per-round ~ details")
    assert len(folded) == len(NODES)
    assert not any(d.get_attribute("open") for d in folded)
    folded[0].find_element("css selector", "summary").click()
    assert len(folded[0].find_elements("css selector", "tr")) == 31
    # Nothing wider than the window.
    widths = browser.execute_script(
        "return [window.innerWidth, document.documentElement.scrollWidth,"
        " Math.max(...[...document.querySelectorAll('table')]"
        "   .map(t => t.getBoundingClientRect().right))]")
    inner, scroll, widest_table_right = widths
    assert inner <= 1280
    assert scroll <= inner, widths
    assert widest_table_right <= inner, widths
