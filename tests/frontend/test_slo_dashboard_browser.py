"""The SLO page in a real browser (Debian's Chromium, never a downloaded one) on a seeded data set.

Its own server (as ``tests/conftest.py``'s ``platform_server`` starts one) on a database
seeded with ``manage.py slo_seed --rollup``, so the page reads rollups plus an open window.
Saves a screenshot to ``docs/screenshots/slo-dashboard.png``.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, TEST_MODELS, serving
from tests.frontend.test_browser import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS

pytestmark = pytest.mark.browser
PASSWORD = "live-pass-123456"
SCREENSHOT = REPO / "docs" / "screenshots" / "slo-dashboard.png"


@pytest.fixture(scope="module")
def seeded_server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium) to run this")
    import os

    var = tmp_path_factory.mktemp("slo-live")
    database = var / "live.sqlite3"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "TANDEM_VAR_DIR": str(var),
        "DATABASE_URL": f"sqlite:///{database}",
    }
    python = sys.executable

    def manage(*args: str) -> None:
        subprocess.run([python, "manage.py", *args], cwd=REPO, env=env, check=True, capture_output=True)

    manage("migrate", "--noinput")
    manage("tandem_demo", "--password", PASSWORD, "--models", ",".join(TEST_MODELS))
    manage("slo_seed", "--tenant", "demo", "--samples", "20000", "--days", "8", "--failure-share", "0.01", "--rollup")
    with serving(var, env) as url:
        yield url, database


def raw_ttft(database: Path) -> tuple[int, int]:
    """(requests with TTFT <= 500 ms, requests with a TTFT) of the demo tenant's interactive samples, from the rows."""
    with sqlite3.connect(database) as db:
        good, counted = db.execute(
            "SELECT SUM(s.ttft_ms <= 500), COUNT(s.ttft_ms) FROM inference_slosample s "
            "JOIN tenants_tenant t ON t.id = s.tenant_id WHERE t.slug = 'demo' AND s.latency_class = 'interactive'"
        ).fetchone()
    return int(good), int(counted)


def test_the_slo_page_draws_its_charts_and_shows_the_attainment_the_raw_samples_give(seeded_server):
    from playwright.sync_api import sync_playwright

    url, database = seeded_server
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{url}/signin/")
        page.get_by_label("Username").fill("demo")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{url}/")
        page.get_by_role("link", name="SLOs").click()
        page.wait_for_url(f"{url}/slo/")
        good, counted = raw_ttft(database)
        row = page.locator('#objectives tr[data-class="interactive"][data-kind="ttft"]')
        assert (int(row.get_attribute("data-good")), int(row.get_attribute("data-total"))) == (good, counted)
        assert row.locator("td.attainment").inner_text() == f"{good / counted:.6f}"
        for chart in ("attainment", "latency", "acceptance", "route-mix", "tier-health", "queue"):
            page.wait_for_function(
                """id => {
                    const c = document.getElementById(id);
                    if (!c || !window.Chart || !Chart.getChart(c)) return false;
                    const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                    for (let i = 3; i < px.length; i += 4) if (px[i] !== 0) return true;
                    return false;
                }""",
                arg=f"chart-{chart}",
            )
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        browser.close()
