"""The chat page in headless Chromium (Debian's), driven by Playwright: stream, reload, stop."""

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page, async_playwright, expect

from tests.fake_upstream import Reply
from tests.support import Service

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

if not Path(CHROMIUM).exists():
    if os.environ.get("CHATBOT_REQUIRE_BROWSER"):
        raise RuntimeError("chromium is required (apt-get install -y chromium)")
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)

WORDS = [f" word{index}" for index in range(25)]


@asynccontextmanager
async def _chat_page(service: Service) -> AsyncIterator[Page]:
    """The service's chat page in headless Chromium, ready to send; the browser closed after."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = await browser.new_page()
            await page.goto(service.url + "/")
            await expect(page.locator("#send")).to_be_enabled()
            yield page
        finally:
            await browser.close()


async def test_chat_page_streams_resumes_after_reload_and_stops(
    start_service: Any, tmp_path: Path
) -> None:
    async with start_service(auth="none", checkpoint_seconds=0.2) as service:
        async with _chat_page(service) as page:
            service.upstream.queue(Reply(tokens=WORDS, token_delay=0.1))
            await page.fill("#input", "Hello from the browser")
            await page.click("#send")
            reply = page.locator(".message.assistant").last
            await expect(reply.locator(".content")).to_contain_text("word3")
            await expect(reply).to_have_attribute("data-status", "in_progress")

            # Reload mid-reply: the page finds the running reply and follows it to the end.
            await page.reload()
            reply = page.locator(".message.assistant").last
            await expect(reply).to_have_attribute("data-status", "completed", timeout=15_000)
            await expect(reply.locator(".content")).to_have_text("".join(WORDS))
            assert len(service.upstream.requests) == 1
            await expect(page.locator("#conversations li")).to_have_count(1)

            gate = asyncio.Event()
            service.upstream.queue(Reply(tokens=["Stop", " me", " now"], gate=gate))
            await page.fill("#input", "Now something long")
            await page.click("#send")
            reply = page.locator(".message.assistant").last
            await expect(reply.locator(".content")).to_have_text("Stop")
            await page.click("#stop")
            await expect(reply).to_have_attribute("data-status", "cancelled")
            await expect(page.locator("#stop")).to_be_hidden()
            await page.screenshot(path=str(tmp_path / "chat.png"))
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


async def test_chat_page_shows_tool_calls_live_and_as_stored(start_service: Any) -> None:
    async with (
        start_service(auth="none", default_toolsets=["tasks"]) as service,
        _chat_page(service) as page,
    ):
        gate = asyncio.Event()
        service.upstream.queue(
            Reply(tokens=[], tool_calls=[("c1", "add_task", '{"title": "buy milk"}')]),
            Reply(tokens=["Added", " it."], gate=gate),
        )
        await page.fill("#input", "add a task to buy milk")
        await page.click("#send")
        # Live: the call and its result show while the answer is still on its way.
        reply = page.locator(".message.assistant").last
        await expect(reply.locator(".tools")).to_contain_text('→ add_task({"title": "buy milk"})')
        await expect(reply.locator(".tools")).to_contain_text('← ok: {"id"')
        gate.set()
        # Done: the turn as stored, the call, its result, then the answer.
        await expect(page.locator(".message.tool")).to_contain_text('"title": "buy milk"')
        await expect(page.locator(".message")).to_have_count(4)
        await expect(page.locator(".message.assistant").last.locator(".content")).to_have_text(
            "Added it."
        )
