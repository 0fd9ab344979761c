"""The coin economy's demo pages in a real browser (Playwright, headless Chromium).

A creator adds a product and pins it while live; viewers see the pinned card,
buy from it, and the room sees a "bought" bubble while the stock goes down; the
creator's orders list gets the order and can refund it; an effect bought on one
viewer page plays full screen on the others; a brand page creates a campaign, a
creator page joins it and fills its progress bar, and both pages toast the
reward, as does the room. Same conventions and helpers as ``tests/test_browser.py``; screenshots
go to ``.artifacts/screenshots/``.
"""

from __future__ import annotations

import re

from playwright.async_api import Locator, Page, expect

from gifting.hub import Hub
from tests import test_browser
from tests.conftest import ClientFactory, token, topup
from tests.test_browser import SHOTS, Pages

# test_browser's fixtures, shared: one Chromium per module, a context per test.
browser = test_browser.browser
pages = test_browser.pages


async def add_product(creator: Page, pid: str, name: str, price: int, stock: int) -> Locator:
    """Fills the creator page's product form; returns the product's row."""
    await creator.fill("#product-id", pid)
    await creator.fill("#product-name", name)
    await creator.fill("#product-price", str(price))
    await creator.fill("#product-stock", str(stock))
    await creator.click("#product-save")
    row = creator.locator(f'#products li[data-product="{pid}"]')
    await expect(row.locator(".product-stock")).to_have_text(f"{stock} in stock")
    return row


async def pin(row: Locator) -> None:
    await row.locator(".pin-btn").click()
    await expect(row.locator(".pin-btn")).to_have_text("Unpin")
    await expect(row).to_have_class(re.compile(r"\bis-pinned\b"))


def orders(page: Page) -> Locator:
    """The creator page's orders, newest first."""
    return page.locator("#orders li.order")


async def shoot(**named: Page) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    for name, p in named.items():
        await p.evaluate("window.scrollTo(0, 0)")  # else the sticky top bar shows mid-page
        await p.screenshot(path=SHOTS / f"{name}.png", full_page=True)


async def test_pinned_product_is_bought_from_the_stage(pages: Pages, hub: Hub) -> None:
    await topup(hub, "bob", 1000)
    creator = await pages.creator("alice", "Alice", "Shop night")
    # Bob is in the room before the pin (the `pinned` event), Carol after (`join`'s result).
    bob = await pages.viewer("bob", "Bob", "alice")
    await expect(bob.locator("#pinned")).to_be_hidden()
    row = await add_product(creator, "mug", "Glow mug", 120, 5)
    await pin(row)
    carol = await pages.viewer("carol", "Carol", "alice")
    for p in (bob, carol, creator):
        card = p.locator("#pinned")
        await expect(card.locator(".pinned-name")).to_have_text("Glow mug")
        await expect(card.locator(".pinned-price")).to_have_text("120 coins")
        await expect(card.locator(".pinned-stock")).to_have_text("5 left")
    await expect(creator.locator("#pinned .buy")).to_have_count(0)  # not in one's own shop

    await bob.locator("#pinned .buy").click()
    for p in (carol, creator, bob):
        sale = p.locator("#bubbles .bubble.sale")
        await expect(sale).to_have_count(1)
        await expect(sale.locator(".bubble-name")).to_have_text("Bob")
        await expect(sale.locator(".bubble-gift")).to_have_text("bought Glow mug")
        await expect(p.locator("#pinned .pinned-stock")).to_have_text("4 left")
    await expect(bob.locator("#balance")).to_have_text("880")
    await expect(orders(creator)).to_have_count(1)
    order = orders(creator).first
    await expect(order.locator(".order-what")).to_have_text("Bob bought Glow mug ×1")
    await expect(order.locator(".order-coins")).to_have_text("120")
    await expect(order.locator(".chip")).to_have_text("paid")
    await expect(row.locator(".product-stock")).to_have_text("4 in stock")
    await expect(creator.locator("#balance")).to_have_text("108")  # 90 % of 120
    await shoot(**{"shop-creator": creator, "shop-viewer-carol": carol})


async def test_refund_from_the_creator_page(pages: Pages, hub: Hub) -> None:
    await topup(hub, "bob", 500)
    creator = await pages.creator("alice", "Alice")
    row = await add_product(creator, "tee", "Tour tee", 200, 3)
    await pin(row)
    bob = await pages.viewer("bob", "Bob", "alice")
    await bob.locator("#pinned .buy").click()
    await expect(bob.locator("#balance")).to_have_text("300")
    order = orders(creator).first
    await expect(order.locator(".chip")).to_have_text("paid")
    await expect(row.locator(".product-stock")).to_have_text("2 in stock")

    await order.locator(".refund-btn").click()
    await expect(order.locator(".chip")).to_have_text("refunded")
    await expect(order.locator(".refund-btn")).to_have_count(0)
    await expect(bob.locator("#balance")).to_have_text("500")  # all of it, platform's part too
    await expect(creator.locator("#balance")).to_have_text("0")
    await expect(row.locator(".product-stock")).to_have_text("3 in stock")
    await expect(orders(creator)).to_have_count(1)
    # A pin lasts one live session.
    await creator.click("#end-live")
    await expect(bob.locator("#pinned")).to_be_hidden()
    await expect(row.locator(".pin-btn")).to_have_text("Pin")
    await expect(row.locator(".pin-btn")).to_be_disabled()


async def test_effect_plays_full_screen_for_the_room(pages: Pages, hub: Hub) -> None:
    await topup(hub, "bob", 100)
    creator = await pages.creator("alice", "Alice")
    bob = await pages.viewer("bob", "Bob", "alice")
    carol = await pages.viewer("carol", "Carol", "alice")
    button = bob.locator('#effects button[data-effect="confetti"]')
    await expect(button).to_contain_text("20 coins")
    await expect(button).to_be_enabled()

    await button.click()
    for p in (carol, creator):
        fx = p.locator('#fx .fx[data-effect="confetti"]')
        await expect(fx).to_have_count(1)
        await expect(fx).to_be_visible()
        await expect(fx.locator(".fx-name")).to_have_text("Bob")
        await expect(fx.locator(".fx-what")).to_have_text("Confetti")
        box = await fx.bounding_box()
        assert box is not None and box["width"] == 1280 and box["height"] == 800  # full screen
        await expect(fx.locator(".fx-piece").first).to_have_css("animation-name", "fx-fall")
    await carol.screenshot(path=SHOTS / "effect-confetti.png")
    await expect(bob.locator("#balance")).to_have_text("80")
    await expect(carol.locator("#fx .fx")).to_have_count(0)  # over after a few seconds


async def test_brand_campaign_rewards_a_creator(
    pages: Pages, hub: Hub, connect: ClientFactory
) -> None:
    await topup(hub, "acme", 1000)
    await topup(hub, "bob", 100)
    brand = await pages.open("brand.html", "acme", "Acme", token=token("acme", "Acme", brand=True))
    await expect(brand.locator("#balance")).to_have_text("1,000")
    await brand.fill("#c-id", "spring")
    await brand.fill("#c-title", "Spring push")
    await brand.fill("#c-budget", "300")
    await brand.fill("#c-reward", "100")
    await brand.select_option("#c-metric", "gifts")
    await brand.fill("#c-threshold", "2")
    await brand.fill("#c-ends", "30")
    await brand.click("#c-create")
    card = brand.locator('#campaigns li[data-campaign="spring"]')
    await expect(card.locator(".chip").first).to_have_text("open")
    await expect(card.locator(".escrow")).to_have_text("300")
    await expect(brand.locator("#balance")).to_have_text("700")

    creator = await pages.creator("alice", "Alice")
    carol = await pages.viewer("carol", "Carol", "alice")
    mine = creator.locator('#campaigns li[data-campaign="spring"]')
    await mine.locator(".join-btn").click()
    label = mine.locator(".progress-label")
    await expect(label).to_have_text("0 / 2 gifts")
    bob = await connect(hub, "bob")
    await bob.request("join", room="alice")
    await bob.send_gift("alice", "rose")
    await expect(label).to_have_text("1 / 2 gifts")
    await bob.send_gift("alice", "rose")

    await expect(label).to_have_text("Rewarded +100 coins")
    await expect(mine.locator(".bar-fill")).to_have_attribute("style", re.compile(r"width: 100%"))
    reward = creator.locator("#toasts .toast.reward")
    await expect(reward).to_have_count(1)
    await expect(reward).to_contain_text("+100 coins from Acme")
    in_room = carol.locator("#toasts .toast.reward")  # the room's copy of the event
    await expect(in_room).to_have_text("★Alice reached Acme’s goal “Spring push”: +100 coins")
    toast = brand.locator("#toasts .toast.reward")
    await expect(toast).to_have_count(1)
    await expect(toast).to_contain_text("Alice was rewarded 100 coins")
    await expect(card.locator(".rewarded-chip")).to_have_text(["Alice"])
    await expect(card.locator(".rewarded-count")).to_have_text("1 creator rewarded")
    await expect(card.locator(".escrow")).to_have_text("200")
    await expect(creator.locator("#balance")).to_have_text("100")  # the reward; roses pay 0
    await shoot(**{"campaign-brand": brand, "campaign-creator": creator})
