"""The console in a real browser: headless Chromium (Debian's, never a downloaded one) against the platform's server.

Skipped, with the reason shown, where ``/usr/bin/chromium`` is absent. Set
``TANDEM_PLAYGROUND_SCREENSHOT=/path.png`` to keep a screenshot of the playground after a run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 15_000


@pytest.fixture
def page(request) -> Iterator[object]:
    """A signed-in page of the console, on the server of ``tests/conftest.py``'s ``platform_server``.

    That fixture is looked up only here, after Chromium is known to exist, so a machine
    without it skips before starting a server.
    """
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium) to run this")
    from playwright.sync_api import sync_playwright

    server = request.getfixturevalue("platform_server")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{server.url}/")
        assert "/signin/" in page.url  # the console needs a signed-in user
        page.get_by_label("Username").fill(server.username)
        page.get_by_label("Password").fill(server.password)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{server.url}/")
        yield page
        browser.close()


def run_prompt(page, model: str, prompt: str, max_tokens: int) -> None:
    page.get_by_label("Model").select_option(model)
    page.get_by_label("Prompt").fill(prompt)
    page.get_by_label("Max tokens").fill(str(max_tokens))
    page.get_by_role("button", name="Run").click()
    page.wait_for_function("document.getElementById('output').getAttribute('aria-busy') === 'false'")


def test_a_prompt_streams_into_provenance_spans_and_shows_its_cost(page):
    run_prompt(page, "tandem-test", "Tell me about Tandem.", 40)
    assert page.locator("#status").inner_text() == "done"
    output = page.locator("#output")
    assert output.inner_text() == "Tandem drafts at the edge and verifies in batches. "[:40]
    assert page.locator("#output span.tok").count() == 40
    assert page.locator("#output span.tok-drafted").count() > 0
    assert page.locator("#output span.tok-verifier").count() > 0
    assert page.locator("#stat-tokens").inner_text() == "40"
    assert page.locator("#cost").is_visible()
    assert page.locator("#cost-total").inner_text().startswith("$0.")
    assert page.locator("#cost-verifier").inner_text().startswith("$")
    assert page.locator("#route-tier").inner_text() == "tier: speculative"
    assert page.locator("#degraded").is_hidden() and page.locator("#error").is_hidden()
    assert page.locator("#stat-request").inner_text().startswith("req_")
    if shot := os.environ.get("TANDEM_PLAYGROUND_SCREENSHOT"):
        page.screenshot(path=shot, full_page=True)


def test_an_engine_failure_is_shown_plainly_with_what_it_cost(page):
    run_prompt(page, "tandem-test-broken", "Break, please.", 30)
    assert page.locator("#status").inner_text() == "error"
    assert page.locator("#error").is_visible()
    assert "engine failed" in page.locator("#error").inner_text()
    assert page.locator("#output span.tok").count() == 6
    assert page.locator("#cost").is_visible()
    assert page.get_by_role("button", name="Run").is_enabled()


def test_a_tier_asked_for_in_the_playground_is_served_and_its_reason_shown(page):
    page.get_by_role("button", name="a greeting (edge)").click()
    assert page.get_by_label("Prompt").input_value() == "Say hello to my team in one short line."
    page.get_by_label("Tier", exact=True).select_option("edge")
    run_prompt(page, "tandem-test", "Say hello to my team in one short line.", 12)
    assert page.locator("#status").inner_text() == "done"
    assert page.locator("#route-tier").inner_text() == "tier: edge"
    assert page.locator("#route-reason").inner_text().startswith("requested")
    assert page.locator("#degraded").is_hidden()


def test_chat_mode_keeps_the_conversation_and_sends_all_of_it_each_turn(page):
    assert page.get_by_label("Mode", exact=True).input_value() == "chat"  # the default
    run_prompt(page, "tandem-test", "Hello there.", 8)
    assert page.locator("#status").inner_text() == "done"
    first_answer = page.locator("#output").inner_text()
    first_prompt_tokens = int(page.locator("#cost-note").inner_text().split(" prompt")[0])
    assert page.get_by_label("Prompt").input_value() == ""  # ready for the next message
    run_prompt(page, "tandem-test", "And then?", 8)
    turns = page.locator("#history li")
    assert turns.count() == 3  # you, the first answer, you; the second answer is in the output below
    assert turns.nth(0).inner_text() == "You Hello there."
    assert turns.nth(1).inner_text() == f"Assistant {first_answer}"
    # the second turn sent the whole conversation, rendered through the chat template
    second_prompt_tokens = int(page.locator("#cost-note").inner_text().split(" prompt")[0])
    assert second_prompt_tokens > first_prompt_tokens + len(first_answer)
    page.get_by_role("button", name="New chat").click()
    assert page.locator("#history").is_hidden() and page.get_by_role("button", name="New chat").is_hidden()
