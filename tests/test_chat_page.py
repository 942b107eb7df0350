"""The chat page at `/` in headless Chromium (Debian's chromium, driven by Playwright): type a
message, watch the reply stream in, press stop; model output is rendered as Markdown without
letting it inject HTML."""

import shutil
import time

import pytest

from llamalite.loading import load
from llamalite.serve import BackgroundServer, Server, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api", reason="the test extras install playwright")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; "
                                                         ".ci/run installs it)")


def _wait(page, expression: str, timeout: float = 30) -> None:
    """Poll a JavaScript condition from here: Playwright's wait_for_function evaluates its predicate with
    eval() inside the page, which the page's Content-Security-Policy (rightly) forbids."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def page_url(default_model_file):
    server = Server(load(default_model_file), "smollm2", max_batch=2, max_seq_len=2048)
    with BackgroundServer(create_app(server)) as url:
        yield url, server


@pytest.fixture()
def page(page_url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(page_url[0] + "/")
        _wait(page, "document.getElementById('model').textContent === 'smollm2'")
        yield page
        browser.close()


def test_a_message_gets_a_streamed_reply(page):
    page.fill("#system", "You are a helpful assistant.")
    page.fill("#temperature", "0")
    page.fill("#input", "What is the capital of France?")
    page.press("#input", "Enter")
    reply = page.locator(".msg.assistant .content").last
    _wait(page, "document.querySelector('.msg.assistant').dataset.done === 'true'", timeout=60)
    assert "Paris" in reply.inner_text()
    assert page.locator(".msg.user").first.inner_text().endswith("What is the capital of France?")
    # the conversation goes on with its history
    page.fill("#input", "And of Italy?")
    page.press("#input", "Enter")
    _wait(page, "document.querySelectorAll('.msg.assistant').length === 2 && "
                           "document.querySelectorAll('.msg.assistant')[1].dataset.done === 'true'", timeout=60)
    assert page.locator(".msg.assistant .content").nth(1).inner_text().strip()


def test_stop_ends_the_stream_and_frees_the_slot(page, page_url):
    server = page_url[1]
    page.fill("#temperature", "1.0")
    page.fill("#input", "Write a very long story about a dragon, with many chapters.")
    page.press("#input", "Enter")
    reply = page.locator(".msg.assistant .content").last
    _wait(page, "document.querySelector('.msg.assistant .content').textContent.length > 20",
                           timeout=60)
    assert page.is_enabled("#stop") and not page.is_enabled("#send")
    page.click("#stop")
    _wait(page, "document.querySelector('.msg.assistant').dataset.done === 'true'", timeout=10)
    stopped_at = reply.inner_text()
    time.sleep(0.5)
    assert reply.inner_text() == stopped_at  # nothing more arrives
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    deadline = time.monotonic() + 10
    while server.engine.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.engine.active == 0


def test_markdown_is_rendered_and_html_is_not_injected(page):
    html = page.evaluate("renderMarkdown('**bold** and `code` <img src=x onerror=alert(1)>\\n```\\n<script>x</script>\\n```')")
    assert "<strong>bold</strong>" in html and "<code>code</code>" in html
    assert "<img" not in html and "<script>" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html and "&lt;script&gt;" in html
    # and in the live page: model text becomes text nodes, never elements
    page.evaluate("addMessage('assistant', '<img src=x onerror=\"window.pwned=1\"> [a](javascript:alert(1))')")
    assert page.locator(".msg.assistant img").count() == 0
    assert page.locator(".msg.assistant a").count() == 0
    assert page.evaluate("window.pwned === undefined")
