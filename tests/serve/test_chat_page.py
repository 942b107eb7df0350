"""The chat page at `/` in headless Chromium (Debian's chromium, driven by Playwright): type a
message, watch the reply stream in with its speed and context use, press stop; conversations kept in
the browser to switch, rename and delete; the model picker; the JSON-schema and tools panel; model
output rendered as Markdown without letting it inject HTML; a screenshot that shows the page."""

import shutil
import time

import pytest

from llamalite.formats.load import load
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


def _send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


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
        _wait(page, "document.getElementById('model').value === 'smollm2'")
        yield page
        browser.close()


def test_a_message_gets_a_streamed_reply(page):
    page.fill("#system", "You are a helpful assistant.")
    page.fill("#temperature", "0")
    _send(page, "What is the capital of France?")
    reply = page.locator(".msg.assistant .content").last
    _wait(page, "document.querySelector('.msg.assistant').dataset.done === 'true'", timeout=60)
    assert "Paris" in reply.inner_text()
    assert page.locator(".msg.user").first.inner_text().endswith("What is the capital of France?")
    # the conversation goes on with its history
    _send(page, "And of Italy?")
    _wait(page, "document.querySelectorAll('.msg.assistant').length === 2 && "
                           "document.querySelectorAll('.msg.assistant')[1].dataset.done === 'true'", timeout=60)
    assert page.locator(".msg.assistant .content").nth(1).inner_text().strip()


def test_stop_ends_the_stream_and_frees_the_slot(page, page_url):
    server = page_url[1]
    page.fill("#temperature", "1.0")
    _send(page, "Write a very long story about a dragon, with many chapters.")
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


def _reply_done(page, n: int) -> None:
    _wait(page, f"document.querySelectorAll('.msg.assistant').length === {n} && "
                f"document.querySelectorAll('.msg.assistant')[{n - 1}].dataset.done === 'true'", timeout=60)


def test_each_reply_shows_its_speed_and_context(page):
    page.fill("#temperature", "0")
    _send(page, "What is the capital of France?")
    _reply_done(page, 1)
    stats = page.locator(".msg.assistant .stats").first.inner_text()
    import re

    m = re.fullmatch(r"(\d+) tokens · ([\d.]+) tok/s · context (\d+) / 2048", stats)
    assert m and int(m.group(1)) > 1 and float(m.group(2)) > 0 and int(m.group(3)) > int(m.group(1)), stats


def test_conversations_are_kept_switched_renamed_and_deleted(page):
    page.fill("#temperature", "0")
    _send(page, "What is the capital of France?")
    _reply_done(page, 1)
    first_reply = page.locator(".msg.assistant .content").first.inner_text()
    assert page.locator("#chats li").count() == 1
    assert page.locator("#chats li .open").first.inner_text() == "What is the capital of France?"
    page.reload()  # kept in the browser
    _wait(page, "document.querySelectorAll('.msg.assistant').length === 1")
    assert page.locator(".msg.assistant .content").first.inner_text() == first_reply
    page.click("#new")
    assert page.locator(".msg").count() == 0 and page.locator("#chats li").count() == 2
    _send(page, "Say hello.")
    _reply_done(page, 1)
    page.fill("#title", "Greetings")  # rename the current one
    assert page.locator("#chats li.current .open").inner_text() == "Greetings"
    page.locator("#chats li .open", has_text="What is the capital").click()  # switch back
    assert page.locator(".msg.user").first.inner_text().endswith("What is the capital of France?")
    page.locator("#chats li", has_text="Greetings").locator(".delete").click()
    assert page.locator("#chats li").count() == 1
    page.reload()
    _wait(page, "document.querySelectorAll('#chats li').length === 1")
    assert "Greetings" not in page.locator("#chats").inner_text()


def test_the_schema_and_tools_panel(page):
    import json

    page.fill("#temperature", "0")
    page.click("#panel-toggle")
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}
    page.fill("#schema", json.dumps(schema))
    _send(page, "Name the capital of France.")
    _reply_done(page, 1)
    reply = json.loads(page.locator(".msg.assistant .content").first.inner_text())
    assert set(reply) == {"city"}
    page.fill("#schema", "{not json")
    _send(page, "Again.")
    assert "not valid JSON" in page.locator("#panel-error").inner_text()
    page.fill("#schema", "")
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                            "required": ["city"]}}}
    page.fill("#tools", json.dumps([tool]))
    page.select_option("#tool-choice", "required")
    _send(page, "What is the weather in Paris?")
    _reply_done(page, 2)
    call = page.locator(".msg.assistant .toolcall").first.inner_text()
    assert call.startswith("tool call: get_weather(") and "city" in call


def test_the_model_picker_routes_requests(tmp_path, default_model_file):
    """Two models served: the page lists both and a reply comes from the one picked."""
    from llamalite.serve.hub import Hub

    hub = Hub({"smollm2": lambda: load(default_model_file), "second": lambda: load(default_model_file)}, max_batch=1,
              max_seq_len=1024)
    hub.load_all()
    with BackgroundServer(create_app(hub)) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url + "/")
        _wait(page, "document.querySelectorAll('#model option').length === 2")
        page.select_option("#model", "second")
        page.fill("#temperature", "0")
        _send(page, "Hi!")
        _reply_done(page, 1)
        assert page.locator(".msg.assistant .role").first.inner_text() == "assistant · second"
        assert hub.servers["second"].engine.stats["requests"] == 1 and hub.servers["smollm2"].engine.stats["requests"] == 0
        assert page.locator(".msg.assistant .stats").first.inner_text().endswith("/ 1024")
        browser.close()


def test_a_screenshot_shows_the_page(page, tmp_path):
    """The page renders: a screenshot of it after a reply has the sidebar, header, messages and input
    where a user sees them, and is a picture rather than a blank."""
    from PIL import Image

    page.set_viewport_size({"width": 1100, "height": 700})
    page.fill("#temperature", "0")
    _send(page, "What is the capital of France?")
    _reply_done(page, 1)
    shot = tmp_path / "chat.png"
    page.screenshot(path=str(shot))
    image = Image.open(shot).convert("RGB")
    assert image.size == (1100, 700)
    assert len(image.getcolors(1 << 24)) > 50  # text, borders and backgrounds, not a blank
    boxes = {sel: page.locator(sel).first.bounding_box() for sel in ("aside", "header", ".msg.user", ".msg.assistant",
                                                                     "#input", "#send")}
    for sel, box in boxes.items():
        assert box and box["width"] > 20 and box["height"] > 10 and 0 <= box["x"] and box["x"] + box["width"] <= 1100, sel
    assert boxes["aside"]["x"] < boxes["header"]["x"] and boxes["header"]["y"] < boxes[".msg.user"]["y"] < \
        boxes[".msg.assistant"]["y"] < boxes["#input"]["y"]
    # the pixels under the assistant's reply are not the page background: the message is drawn there
    b = boxes[".msg.assistant"]
    crop = image.crop((int(b["x"]), int(b["y"]), int(b["x"] + b["width"]), int(b["y"] + b["height"])))
    assert len(crop.getcolors(1 << 24)) > 10
