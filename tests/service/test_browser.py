"""The chat page and the API docs in headless Chromium (Debian's), driven by Playwright.

The chat page is tried at a phone's size and a desktop's: it fits the screen, streams and renders
Markdown safely, folds tool calls, names the conversation when the service does, shows what Send
and Stop can do, stops a reply and picks one up again after a reload. /docs and /redoc render
with every request to another origin refused. Each test saves screenshots of its key moments in
a folder it prints (`pytest -s` shows it)."""

import asyncio
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import (
    Browser,
    Page,
    Route,
    ViewportSize,
    async_playwright,
    expect,
)

from tests.fake_upstream import Reply
from tests.support import Service

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

if not Path(CHROMIUM).exists():
    if os.environ.get("CHATBOT_REQUIRE_BROWSER"):
        raise RuntimeError("chromium is required (apt-get install -y chromium)")
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)

VIEWPORTS: dict[str, ViewportSize] = {
    "phone": {"width": 390, "height": 844},
    "desktop": {"width": 1280, "height": 800},
}
NARROWEST: ViewportSize = {"width": 360, "height": 640}
WORDS = [f" word{index}" for index in range(25)]

# Recorded from the first script on: what the page's Content-Security-Policy refused.
WATCH_CSP = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__violations.push(`${event.violatedDirective} ${event.blockedURI}`);
});
"""


class Screenshots:
    """A test's screenshots, numbered in the order taken, in a folder that outlives the run."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.taken = 0
        folder.mkdir(parents=True, exist_ok=True)
        print(f"screenshots: {folder}")

    async def take(self, page: Page, moment: str) -> None:
        self.taken += 1
        await page.screenshot(path=str(self.folder / f"{self.taken:02d}-{moment}.png"))


@pytest.fixture(scope="session")
def screenshots_root() -> Path:
    return Path(tempfile.mkdtemp(prefix="chatbot-screenshots-"))


@pytest.fixture
def screenshots(screenshots_root: Path, request: pytest.FixtureRequest) -> Screenshots:
    return Screenshots(screenshots_root / re.sub(r"[^\w.-]+", "-", request.node.name).strip("-"))


@pytest.fixture(params=list(VIEWPORTS))
def viewport(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield launched
        finally:
            await launched.close()


@asynccontextmanager
async def _chat_page(
    browser: Browser, service: Service, viewport: str, *, refusals: tuple[str, ...] = ()
) -> AsyncIterator[Page]:
    """The service's chat page at that size, ready to type in; after the test, it must have
    thrown no error, and its CSP refused nothing but what `refusals` names (directives)."""
    context = await browser.new_context(viewport=VIEWPORTS[viewport])
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.add_init_script(WATCH_CSP)
    await page.goto(service.url + "/")
    await expect(page.locator("#input")).to_be_editable()
    yield page
    violations: list[str] = await page.evaluate("window.__violations")
    assert [v for v in violations if v.split()[0] not in refusals] == []
    assert errors == []
    await context.close()


async def _assert_fits(page: Page) -> None:
    """No horizontal scroll anywhere, and the message box and Send wholly on screen."""
    layout = await page.evaluate(
        """() => {
          const box = (id) => {
            const r = document.getElementById(id).getBoundingClientRect();
            return {left: r.left, right: r.right, top: r.top, bottom: r.bottom};
          };
          const messages = document.getElementById("messages");
          return {
            scrollWidth: document.documentElement.scrollWidth,
            width: window.innerWidth,
            height: window.innerHeight,
            messagesOverflow: messages.scrollWidth - messages.clientWidth,
            input: box("input"),
            send: box("send"),
          };
        }"""
    )
    assert layout["scrollWidth"] <= layout["width"], layout
    assert layout["messagesOverflow"] <= 0, layout
    for name in ("input", "send"):
        box = layout[name]
        assert box["left"] >= 0, (name, layout)
        assert box["right"] <= layout["width"], (name, layout)
        assert box["top"] >= 0, (name, layout)
        assert box["bottom"] <= layout["height"], (name, layout)


async def _style(page: Page, selector: str) -> dict[str, str]:
    style: dict[str, str] = await page.eval_on_selector(
        selector,
        """node => {
          const style = getComputedStyle(node);
          return {opacity: style.opacity, cursor: style.cursor};
        }""",
    )
    return style


async def _assert_send_disabled_visibly(page: Page) -> None:
    await expect(page.locator("#send")).to_be_disabled()
    style = await _style(page, "#send")
    assert float(style["opacity"]) <= 0.6, style
    assert style["cursor"] == "not-allowed", style


async def test_chat_page_streams_resumes_after_reload_and_stops(
    start_service: Any, browser: Browser, viewport: str, screenshots: Screenshots
) -> None:
    async with start_service(auth="none", checkpoint_seconds=0.2) as service:
        async with _chat_page(browser, service, viewport) as page:
            await _assert_fits(page)
            # Nothing typed: Send is disabled, and looks it.
            await _assert_send_disabled_visibly(page)
            await expect(page.locator("#stop")).to_be_hidden()
            await screenshots.take(page, "empty")

            service.upstream.queue(Reply(tokens=WORDS, token_delay=0.1))
            await page.fill("#input", "Hello from the browser")
            await expect(page.locator("#send")).to_be_enabled()
            assert float((await _style(page, "#send"))["opacity"]) == 1
            await page.click("#send")
            reply = page.locator(".message.assistant").last
            await expect(reply.locator(".content")).to_contain_text("word3")
            await expect(reply).to_have_attribute("data-status", "in_progress")
            # While the reply streams: Stop is there, and Send stays disabled even with text typed.
            await expect(page.locator("#stop")).to_be_visible()
            await page.fill("#input", "typed while it streams")
            await _assert_send_disabled_visibly(page)
            await _assert_fits(page)
            await screenshots.take(page, "streaming")
            await page.fill("#input", "")

            # Reload mid-reply: the page finds the running reply and follows it to the end.
            await page.reload()
            reply = page.locator(".message.assistant").last
            await expect(reply).to_have_attribute("data-status", "completed", timeout=15_000)
            await expect(reply.locator(".content")).to_have_text("".join(WORDS).strip())
            assert len(service.upstream.requests) == 1
            await expect(page.locator("#conversations li")).to_have_count(1)
            await expect(page.locator("#stop")).to_be_hidden()
            await screenshots.take(page, "resumed")

            gate = asyncio.Event()
            service.upstream.queue(Reply(tokens=["Stop", " me", " now"], gate=gate))
            await page.fill("#input", "Now something long")
            await page.click("#send")
            reply = page.locator(".message.assistant").last
            await expect(reply.locator(".content")).to_have_text("Stop")
            await page.click("#stop")
            await expect(reply).to_have_attribute("data-status", "cancelled")
            await expect(page.locator("#stop")).to_be_hidden()
            await _assert_send_disabled_visibly(page)  # the box is empty again
            await _assert_fits(page)
            await screenshots.take(page, "stopped")
        conversation_id = (await service.client.get("/v1/conversations")).json()["data"][0]["id"]
        stored = await service.messages(conversation_id)
        assert [(m["role"], m["status"]) for m in stored] == [
            ("user", "completed"),
            ("assistant", "completed"),
            ("user", "completed"),
            ("assistant", "cancelled"),
        ]
        assert stored[-1]["content"] == "Stop"
        assert len(service.upstream.requests) == 2


LONG_LINE = "print('" + "x" * 400 + "')"
MARKDOWN = [
    "Here is **bold** text.\n\n",
    "- first item\n- second item\n\n",
    f"```python\n{LONG_LINE}\n```\n\n",
    "A [safe link](https://example.com/docs).\n\n",
    "![a chart](https://example.com/chart.png)\n\n",
]
HOSTILE = [
    '<img src=x onerror="window.pwned=1">\n\n',
    "<script>window.pwned=1</script>\n\n",
    "[click me](javascript:window.pwned=1)\n\n",
    '<a href="javascript:window.pwned=1" onclick="window.pwned=1">raw link</a> ',
    '<b onmouseover="window.pwned=1" style="position:fixed;inset:0">hover</b> ',
    '<div class="message user">fake</div>',
]
UNSAFE = """() => {
  const box = document.getElementById("messages");
  const attributes = [...box.querySelectorAll("*")].flatMap((node) =>
    [...node.attributes].map((attribute) => attribute.name + "=" + attribute.value));
  return {
    pwned: window.pwned,
    scripts: box.querySelectorAll("script, img, iframe, object, style").length,
    handlers: attributes.filter((a) => a.startsWith("on") || a.startsWith("style=")),
    javascript: attributes.filter((a) => /javascript:/i.test(a)),
    fakes: box.querySelectorAll(".markdown .message").length,
  };
}"""


async def test_chat_page_renders_markdown_as_it_streams_and_sanitises_it(
    start_service: Any, browser: Browser, viewport: str, screenshots: Screenshots
) -> None:
    async with (
        start_service(auth="none") as service,
        # Chromium reports the hostile handlers and styles as refused when the sanitiser parses
        # them (in a document of its own, where nothing runs): the CSP's second line holds too.
        _chat_page(
            browser, service, viewport, refusals=("script-src-attr", "style-src-attr")
        ) as page,
    ):
        gate = asyncio.Event()
        service.upstream.queue(Reply(tokens=MARKDOWN + HOSTILE, gate=gate))
        await page.fill("#input", "Show me **Markdown** <b>please</b>")
        await page.click("#send")
        # The user's own text is shown as typed, never as Markdown or HTML.
        user = page.locator(".message.user").last.locator(".content")
        await expect(user).to_have_text("Show me **Markdown** <b>please</b>")
        assert await user.locator("strong, b").count() == 0

        # Rendered while it streams: the first delta is already Markdown.
        reply = page.locator(".message.assistant").last
        await expect(reply.locator(".content strong")).to_have_text("bold")
        await expect(reply).to_have_attribute("data-status", "in_progress")
        await screenshots.take(page, "streaming")
        gate.set()
        await expect(reply).to_have_attribute("data-status", "completed")

        content = reply.locator(".content")
        await expect(content.locator("li")).to_have_count(2)
        await expect(content.locator("pre > code")).to_contain_text(LONG_LINE)
        await expect(content.locator("a", has_text="safe link")).to_have_attribute(
            "rel", "noopener noreferrer nofollow"
        )
        await expect(content.locator("a", has_text="safe link")).to_have_attribute(
            "target", "_blank"
        )
        # An image from elsewhere is a link to it, never fetched.
        await expect(content.locator("a", has_text="a chart")).to_have_attribute(
            "href", "https://example.com/chart.png"
        )
        # A long code line scrolls inside its block, never the page.
        code = content.locator("pre")
        widths = await code.evaluate("node => [node.scrollWidth, node.clientWidth]")
        assert widths[0] > widths[1]
        await _assert_fits(page)
        await screenshots.take(page, "rendered")

        # The hostile parts: nothing ran, nothing that could run is left.
        await content.locator("b", has_text="hover").hover()
        await content.locator("a", has_text="raw link").click()
        unsafe = await page.evaluate(UNSAFE)
        assert unsafe == {"pwned": None, "scripts": 0, "handlers": [], "javascript": [], "fakes": 0}
        await content.locator("pre").scroll_into_view_if_needed()
        await screenshots.take(page, "code-block")

        # The narrowest screen the page is made for still fits, code block and all.
        await page.set_viewport_size(NARROWEST)
        await _assert_fits(page)
        await expect(page.locator("#menu")).to_be_visible()
        await expect(page.locator("#sidebar")).not_to_be_in_viewport()  # slid away
        await screenshots.take(page, "narrowest")

        # Stored replies render the same way.
        await page.reload()
        reply = page.locator(".message.assistant").last
        await expect(reply.locator(".content strong")).to_have_text("bold")
        await expect(reply.locator(".content li")).to_have_count(2)
        assert (await page.evaluate(UNSAFE))["handlers"] == []
        await _assert_fits(page)
        await page.emulate_media(color_scheme="dark")
        await screenshots.take(page, "dark")


async def test_chat_page_folds_tool_calls_live_and_as_stored(
    start_service: Any, browser: Browser, viewport: str, screenshots: Screenshots
) -> None:
    async with (
        start_service(auth="none", default_toolsets=["tasks"]) as service,
        _chat_page(browser, service, viewport) as page,
    ):
        gate = asyncio.Event()
        service.upstream.queue(
            Reply(tokens=[], tool_calls=[("c1", "add_task", '{"title": "buy milk"}')]),
            Reply(tokens=["Added", " **it**."], gate=gate),
        )
        await page.fill("#input", "add a task to buy milk")
        await page.click("#send")
        # Live: the call and its result show, folded, while the answer is on its way.
        call = page.locator("details.tool")
        await expect(call).to_have_count(1)
        await expect(call.locator("summary")).to_contain_text("add_task")
        await expect(call.locator(".tool-status")).to_have_text("done")
        await expect(call).not_to_have_attribute("open", re.compile(".*"))
        await expect(call.locator("pre").first).to_be_hidden()
        await _assert_fits(page)
        await screenshots.take(page, "live")
        gate.set()

        # Done: the turn as stored, its call and result in one fold, then the answer.
        answer = page.locator(".message.assistant").last
        await expect(answer.locator(".content strong")).to_have_text("it")
        await expect(page.locator(".message")).to_have_count(3)
        await expect(call).to_have_count(1)
        await expect(call).to_have_attribute("data-result-id", re.compile(".+"))
        await expect(call).not_to_have_attribute("open", re.compile(".*"))
        await screenshots.take(page, "stored")

        await call.locator("summary").click()
        await expect(call).to_have_attribute("open", "")
        arguments = call.locator('[data-part="arguments"] pre')
        await expect(arguments).to_have_text('{\n  "title": "buy milk"\n}', use_inner_text=True)
        await expect(call.locator('[data-part="result"] pre')).to_contain_text(
            '"title": "buy milk"'
        )
        await _assert_fits(page)
        await screenshots.take(page, "opened")


async def test_the_sidebar_shows_the_title_once_the_service_sets_it(
    start_service: Any, browser: Browser, viewport: str, screenshots: Screenshots
) -> None:
    async with (
        start_service(auth="none") as service,
        _chat_page(browser, service, viewport) as page,
    ):
        # The title comes a while after the reply has ended, as from a slow model.
        service.upstream.utility_script.append(
            Reply(tokens=["Milk", " and", " bread"], first_token_delay=1.5)
        )
        await page.fill("#input", "What goes with milk?")
        await page.click("#send")
        item = page.locator("#conversations li")
        await expect(item).to_have_text("Untitled conversation")
        await expect(page.locator(".message.assistant").last).to_have_attribute(
            "data-status", "completed"
        )
        await expect(item).to_have_text("Untitled conversation")  # not named yet
        await expect(item).to_have_text("Milk and bread", timeout=10_000)
        await expect(page).to_have_title("Milk and bread · chatbot")

        sidebar = page.locator("#sidebar")
        if viewport == "phone":
            # The list is a drawer: closed, off screen; the menu opens it over the chat.
            await expect(page.locator("#conversation-title")).to_have_text("Milk and bread")
            await expect(sidebar).not_to_be_in_viewport()
            await screenshots.take(page, "drawer-closed")
            await page.click("#menu")
            await expect(page.locator("#menu")).to_have_attribute("aria-expanded", "true")
            await expect(sidebar).to_be_in_viewport(ratio=1)
            await expect(item).to_be_visible()
            await _assert_fits_while_drawer_open(page)
            await screenshots.take(page, "drawer-open")
            await page.click("#new-chat")
            await expect(sidebar).not_to_be_in_viewport()
            await expect(page.locator("#conversation-title")).to_have_text("New chat")
            await page.click("#menu")
            await item.click()
            await expect(sidebar).not_to_be_in_viewport()
            await expect(page.locator("#conversation-title")).to_have_text("Milk and bread")
        else:
            await expect(page.locator("#menu")).to_be_hidden()
            await expect(sidebar).to_be_in_viewport(ratio=1)
            box = await sidebar.bounding_box()
            assert box is not None
            assert box["width"] == 260
            await screenshots.take(page, "titled")
        await expect(page.locator(".message")).to_have_count(2)
        await _assert_fits(page)
    assert len(service.upstream.utility_requests) == 1


async def _assert_fits_while_drawer_open(page: Page) -> None:
    width = await page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1]


async def _offline_page(
    browser: Browser, service: Service, elsewhere: list[str]
) -> tuple[Page, list[str]]:
    """A desktop-sized page on which every request to another origin is refused (and noted)."""
    page = await browser.new_page(viewport=VIEWPORTS["desktop"])
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.add_init_script(WATCH_CSP)

    async def only_the_service(route: Route) -> None:
        url = route.request.url
        if url.startswith((service.url + "/", "data:", "blob:")):
            await route.continue_()
        else:
            elsewhere.append(url)
            await route.abort()

    await page.route("**/*", only_the_service)
    return page, errors


async def test_docs_and_redoc_render_with_no_other_origin_reachable(
    start_service: Any, browser: Browser, screenshots: Screenshots
) -> None:
    async with start_service(auth="none") as service:
        elsewhere: list[str] = []
        page, errors = await _offline_page(browser, service, elsewhere)
        await page.goto(service.url + "/docs")
        create = page.locator(".opblock-post", has=page.locator('[data-path="/v1/conversations"]'))
        await expect(create).to_have_count(1)
        assert await page.locator(".opblock").count() >= 15
        await create.locator(".opblock-summary").click()
        await expect(create.locator(".opblock-body")).to_be_visible()
        await screenshots.take(page, "swagger-ui")
        assert await page.evaluate("window.__violations") == []

        await page.goto(service.url + "/redoc")
        await expect(page.locator(".api-info h1")).to_contain_text("chatbot")
        operation = page.locator(
            '[data-section-id$="/operation/create_conversation_v1_conversations_post"]'
        )
        await expect(operation).to_contain_text("/v1/conversations")
        await screenshots.take(page, "redoc")

        # Nothing was fetched from elsewhere. ReDoc's own "API docs by Redocly" logo is an
        # image from its CDN, which the page's CSP refuses before the network is tried.
        assert elsewhere == []
        violations = await page.evaluate("window.__violations")
        assert all(v.startswith("img-src https://cdn.redoc.ly/") for v in violations), violations
        assert errors == []
        await page.close()
