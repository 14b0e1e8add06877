"""The cost dashboard in a real browser: headless Chromium (Debian's) against the platform's server, on a seeded ledger.

Its own server and database (the shared ``platform_server`` stays unseeded): migrated,
bootstrapped with ``tandem_demo`` and seeded with ``dashboards_seed``. Checks that the
charts draw (non-blank canvases) and that the totals shown are the ledger's exact sums;
saves a screenshot to ``docs/screenshots/cost-dashboard.png``. Skipped, with the reason,
where ``/usr/bin/chromium`` is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, TEST_MODELS, serving

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
TIMEOUT_MS = 20_000
PASSWORD = "cost-pass-123456"
SEED_ROWS = 3000
SCREENSHOT = REPO / "docs" / "screenshots" / "cost-dashboard.png"

# One process sets the database up (each manage.py start imports the whole platform): migrate, the demo
# account, the seeded ledger, then the ledger's own sums for the test to compare with.
SET_UP = f"""
import json, sys
from decimal import Decimal
from django.core.management import call_command
from tenants.models import Tenant, UsageRecord
call_command("migrate", "--noinput", verbosity=0)
call_command("tandem_demo", "--password", "{PASSWORD}", "--models", "{",".join(TEST_MODELS)}", stdout=sys.stderr)
call_command("dashboards_seed", "--rows", "{SEED_ROWS}", "--tenant", "demo", "--days", "10", stdout=sys.stderr)
tenant = Tenant.objects.get(slug="demo")
costs = list(UsageRecord.objects.filter(tenant=tenant).values_list("cost_total", flat=True))
print(json.dumps({{"cost_total": format(sum(costs, Decimal(0)), ".9f"), "requests": len(costs)}}))
"""


@pytest.fixture(scope="module")
def seeded_server(tmp_path_factory) -> Iterator[tuple[str, dict]]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium) to run this")
    var = tmp_path_factory.mktemp("costs-live")
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "TANDEM_VAR_DIR": str(var),
        "DATABASE_URL": f"sqlite:///{var / 'live.sqlite3'}",
    }
    python = sys.executable

    done = subprocess.run(
        [python, "manage.py", "shell", "-c", SET_UP], cwd=REPO, env=env, check=True, capture_output=True, text=True
    )
    sums = json.loads(done.stdout.strip().splitlines()[-1])
    with serving(var, env) as url:
        yield url, sums


# A canvas is drawn on when any pixel is not fully transparent.
CANVAS_DRAWN = """(id) => {
  const c = document.getElementById(id);
  if (!c || c.dataset.rendered !== "1" || !c.width || !c.height) return false;
  const px = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  for (let i = 3; i < px.length; i += 4) if (px[i] !== 0) return true;
  return false;
}"""


def test_the_cost_dashboard_draws_its_charts_and_shows_the_ledgers_exact_totals(seeded_server):
    from playwright.sync_api import sync_playwright

    url, sums = seeded_server
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{url}/signin/")
        page.get_by_label("Username").fill("demo")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{url}/")
        page.get_by_role("link", name="Costs").click()
        page.wait_for_url(f"{url}/costs/")
        page.get_by_label("Range", exact=True).select_option("30d")
        page.get_by_role("button", name="Show").click()
        page.wait_for_url("**/costs/?*range=30d*")
        page.wait_for_selector("#chart-spend[data-rendered='1']")
        for chart in ("chart-spend", "chart-tokens"):
            assert page.evaluate(CANVAS_DRAWN, chart), f"{chart} is blank"
        assert page.locator("#total-cost").inner_text() == sums["cost_total"]
        assert page.locator("#table-total-cost").inner_text() == sums["cost_total"]
        assert page.locator("#total-requests").inner_text() == str(sums["requests"])
        burn = page.locator("canvas.chart-burn").first
        if burn.count():
            assert page.evaluate(CANVAS_DRAWN, burn.get_attribute("id"))
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        # the split by user: the same total, the chart still drawn
        page.get_by_label("Split by", exact=True).select_option("user")
        page.get_by_role("button", name="Show").click()
        page.wait_for_url("**split=user*")
        page.wait_for_selector("#chart-spend[data-rendered='1']")
        assert page.evaluate(CANVAS_DRAWN, "chart-spend")
        assert page.locator("#total-cost").inner_text() == sums["cost_total"]
        browser.close()
