"""The demo pages in a real browser: Playwright driving the system's headless Chromium.

A creator page and viewer pages, each with its own token, against a real hub:
a gift sent from one page floats up as a bubble in the others and lands in the
creator's feed; a combo grows one bubble's "x N"; an error is a toast, never a
bubble; a creator whose connection drops catches its feed up after
reconnecting, no gift missed or shown twice.

The browser is Debian's ``chromium`` (``scripts/install-browser``), never a
Playwright download. Where it is missing these tests skip, unless
``GIFTING_REQUIRE_BROWSER=1`` (CI), where they fail. Screenshots of test (a)'s
pages go to ``.artifacts/screenshots/``; with ``GIFTING_UPDATE_SCREENSHOT=1``
the README's ``docs/screenshot-viewer.png`` is made again.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
from playwright.async_api import (
    Browser,
    BrowserContext,
    Locator,
    Page,
    async_playwright,
    expect,
)

from gifting.hub import Hub
from tests.conftest import ClientFactory, T, token, topup

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / ".artifacts" / "screenshots"
README_SHOT = ROOT / "docs" / "screenshot-viewer.png"
MISSING = "Chromium not found: run scripts/install-browser (apt-get install chromium)"
MS = T * 1000  # Playwright counts in milliseconds

expect.set_options(timeout=MS)


def chromium() -> str | None:
    """The browser to drive: $GIFTING_CHROMIUM, else chromium on PATH."""
    return (
        os.environ.get("GIFTING_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """One headless Chromium for the module; each test gets its own context."""
    path = chromium()
    if path is None:
        if os.environ.get("GIFTING_REQUIRE_BROWSER") == "1":
            pytest.fail(MISSING + " (GIFTING_REQUIRE_BROWSER=1 makes this a failure)")
        pytest.skip(MISSING)
    args = ["--disable-dev-shm-usage"]
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=path, args=args, timeout=4 * MS)
        try:
            yield b
        finally:
            await b.close()


class Pages:
    """Pages of one test: opened on the hub, checked for script errors at the end."""

    def __init__(self, ctx: BrowserContext, hub: Hub) -> None:
        self.ctx = ctx
        self.base = f"http://127.0.0.1:{hub.port}"
        self.errors: list[str] = []

    async def open(self, page: str, user: str, name: str, **query: str) -> Page:
        p = await self.ctx.new_page()
        p.on("pageerror", lambda e: self.errors.append(f"{user}: {e}"))
        # A dropped socket is logged by Chromium itself; anything else is a bug.
        p.on(
            "console",
            lambda m: (
                self.errors.append(f"{user}: console: {m.text}")
                if m.type == "error" and "WebSocket" not in m.text
                else None
            ),
        )
        await p.goto(f"{self.base}/{page}?{urlencode({'token': token(user, name), **query})}")
        await expect(p.locator("#status")).to_have_text("Connected")
        return p

    async def viewer(self, user: str, name: str, room: str) -> Page:
        p = await self.open("viewer.html", user, name, room=room)
        await expect(p.locator("#viewers")).not_to_have_text("—")  # joined
        return p

    async def creator(self, user: str, name: str, title: str = "") -> Page:
        p = await self.open("creator.html", user, name)
        if title:
            await p.fill("#title-input", title)
        await p.click("#go-live")
        await expect(p.locator("#live-badge")).to_have_text("LIVE")
        return p


@pytest.fixture
async def pages(browser: Browser, hub: Hub) -> AsyncIterator[Pages]:
    ctx = await browser.new_context(viewport={"width": 1280, "height": 800})
    ctx.set_default_timeout(MS)
    p = Pages(ctx, hub)
    try:
        yield p
    finally:
        await ctx.close()
    assert p.errors == []


def gift(page: Page, gift_id: str) -> Locator:
    """A viewer page's button for one gift of the catalog."""
    return page.locator(f'#catalog button[data-gift="{gift_id}"]')


# The status pill's history, recorded in the page: a reconnect can be over
# before a poll from here would have seen it.
WATCH_STATUS = """() => {
  const s = document.querySelector('#status');
  window.statusLog = [s.className + '|' + s.textContent];
  new MutationObserver(() => window.statusLog.push(s.className + '|' + s.textContent))
    .observe(s, {attributes: true, childList: true, characterData: true, subtree: true});
}"""
RECONNECTED = """() => {
  const log = window.statusLog;
  const i = log.findIndex((s) => /\\bbad\\|.*reconnecting in [0-9]+ s/.test(s));
  return i >= 0 && log.slice(i).includes('status ok|Connected');
}"""


def rows(page: Page) -> Locator:
    """The creator page's feed entries, newest first."""
    return page.locator("#feed li:not(.empty)")


async def test_gift_shows_in_other_viewer_and_creator_feed(
    pages: Pages, hub: Hub, connect: ClientFactory
) -> None:
    await topup(hub, "bob", 1000)
    await topup(hub, "carol", 1000)
    v1 = await pages.viewer("bob", "Bob", "alice")
    v2 = await pages.viewer("carol", "Carol", "alice")
    await expect(v1.locator("#stage-note")).to_contain_text("not live")
    await expect(gift(v1, "star")).to_be_disabled()

    creator = await pages.creator("alice", "Alice", "Sunset jam session")
    for v in (v1, v2):
        await expect(v.locator("#live-badge")).to_have_text("LIVE")
        await expect(v.locator("#room-subtitle")).to_have_text("Sunset jam session")
    await expect(creator.locator("#viewers")).to_have_text("2")
    await expect(v1.locator("#balance")).to_have_text("1,000")
    await expect(gift(v1, "star")).to_contain_text("10 coins")

    await gift(v1, "star").click()
    for p in (v2, creator):
        bubble = p.locator("#bubbles .bubble")
        await expect(bubble).to_have_count(1)
        await expect(bubble.locator(".bubble-name")).to_have_text("Bob")
        await expect(bubble.locator(".bubble-gift-name")).to_have_text("Star")
        await expect(bubble.locator(".bubble-combo")).to_have_text("x1")
    await expect(rows(creator)).to_have_count(1)
    await expect(rows(creator).first).to_contain_text("Bob sent Star ×1")
    await expect(rows(creator).first.locator(".feed-earned")).to_have_text("+5")
    await expect(creator.locator("#total")).to_have_text("5")
    await expect(v1.locator("#balance")).to_have_text("990")
    await expect(v2.locator("#balance")).to_have_text("1,000")
    for p in (v1, v2, creator):
        await expect(p.locator("#top li.rank-1 .top-name")).to_have_text("Bob")

    SHOTS.mkdir(parents=True, exist_ok=True)
    for name, p in (("creator", creator), ("viewer-bob", v1), ("viewer-carol", v2)):
        await p.screenshot(path=SHOTS / f"{name}.png", full_page=True)
    if os.environ.get("GIFTING_UPDATE_SCREENSHOT") == "1":
        await readme_screenshot(hub, connect, v1, v2)


async def readme_screenshot(hub: Hub, connect: ClientFactory, v1: Page, v2: Page) -> None:
    """Carol's page mid-show (bubbles, combos, a full podium): the README's picture."""
    senders = {}
    for user in ("mia", "leo", "zoe"):
        await topup(hub, user, 5000)
        senders[user] = await connect(hub, user)
        await senders[user].request("join", room="alice")
    await senders["zoe"].send_gift("alice", "castle")
    await senders["leo"].send_gift("alice", "rocket", count=2)
    for _ in range(3):
        await gift(v1, "heart").click()
    for _ in range(12):
        await senders["mia"].send_gift("alice", "rose")
    combos = v2.locator("#bubbles .bubble-combo")
    await expect(combos.filter(has_text="x12")).to_have_count(1)
    await expect(combos.filter(has_text="x3")).to_have_count(1)
    await expect(v2.locator("#top li:not(.empty)")).to_have_count(4)
    await v2.screenshot(path=README_SHOT, animations="disabled")


async def test_combo_grows_one_bubble(pages: Pages, hub: Hub) -> None:
    await topup(hub, "bob", 100)
    creator = await pages.creator("alice", "Alice")
    v1 = await pages.viewer("bob", "Bob", "alice")
    v2 = await pages.viewer("carol", "Carol", "alice")
    await expect(gift(v1, "rose")).to_be_enabled()
    for _ in range(3):
        await gift(v1, "rose").click()
    for p in (v2, creator):
        await expect(p.locator("#bubbles .bubble-combo")).to_have_text("x3")
        await expect(p.locator("#bubbles .bubble")).to_have_count(1)
        await expect(p.locator("#bubbles .bubble-name")).to_have_text("Bob")
    await expect(rows(creator)).to_have_count(3)
    await expect(v1.locator("#balance")).to_have_text("97")


async def test_insufficient_funds_is_a_toast_not_a_bubble(pages: Pages, hub: Hub) -> None:
    await topup(hub, "dave", 5)
    creator = await pages.creator("alice", "Alice")
    poor = await pages.viewer("dave", "Dave", "alice")
    watcher = await pages.viewer("carol", "Carol", "alice")
    await expect(gift(poor, "castle")).to_be_enabled()

    await gift(poor, "castle").click()
    toast = poor.locator("#toasts .toast")
    await expect(toast).to_have_count(1)
    await expect(toast).to_contain_text("Not enough coins: need 500")
    await expect(toast).to_have_class(re.compile(r"\berror\b"))
    # Bubbles of a room arrive in order: once the rose's is in, a castle bubble
    # would have come before it.
    await gift(poor, "rose").click()
    for p in (watcher, creator, poor):
        await expect(p.locator("#bubbles .bubble-gift-name")).to_have_text(["Rose"])
    await expect(rows(creator)).to_have_count(1)
    await expect(poor.locator("#balance")).to_have_text("4")
    await expect(watcher.locator("#toasts .toast")).to_have_count(0)


@pytest.mark.parametrize("how", ["bye", "drop"])
async def test_creator_catches_up_feed_after_reconnect(
    pages: Pages, hub: Hub, connect: ClientFactory, how: str
) -> None:
    await topup(hub, "bob", 100)
    creator = await pages.creator("alice", "Alice")
    watcher = await pages.viewer("carol", "Carol", "alice")
    bob = await connect(hub, "bob")
    await bob.request("join", room="alice")
    await bob.send_gift("alice", "star")
    await expect(rows(creator)).to_have_count(1)
    await expect(watcher.locator("#bubbles .bubble-gift-name")).to_have_text(["Star"])

    for p in (creator, watcher):
        await p.evaluate(WATCH_STATUS)
    conns = [c for c in hub.conns if c.claims is not None and c.user in ("alice", "carol")]
    assert len(conns) == 2
    for conn in conns:
        if how == "bye":
            conn.close(1001, "server going away")
        else:
            conn.ws.transport.abort()  # no close frame: what a dropped network looks like
    # At once, well inside the pages' first backoff (>= 375 ms): this gift can
    # only reach the creator through the feed catch-up after it reconnects.
    await bob.send_gift("alice", "heart")
    for p in (creator, watcher):  # disconnected, counted down, connected again
        await p.wait_for_function(RECONNECTED)

    await expect(rows(creator)).to_have_count(2)
    await expect(rows(creator).first).to_contain_text("Bob sent Heart")
    await expect(rows(creator).first).not_to_have_class(re.compile(r"\bfresh\b"))
    # A live gift after the resume: everything before it is in, nothing twice.
    await bob.send_gift("alice", "rose")
    await expect(rows(creator)).to_have_count(3)
    await expect(rows(creator).locator(".feed-what")).to_have_text(
        ["Bob sent Rose ×1", "Bob sent Heart ×1", "Bob sent Star ×1"]
    )
    await expect(creator.locator("#total")).to_have_text("7")  # 5 + 2 + 0: half, rounded down
    # Both pages are back in the room: the live gift floats up in each.
    for p in (creator, watcher):
        await expect(p.locator("#bubbles .bubble-gift-name").last).to_have_text("Rose")
    await expect(creator.locator("#viewers")).to_have_text("2")  # bob and carol, re-joined
