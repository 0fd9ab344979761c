"""The demo pages put user data in as text, and load only safe avatar URLs.

Names and avatars come from tokens, which users control. The pages are served
by a real hub; the rendering test then runs the served ``app.js`` under Node
with a small fake DOM (``render_harness.js``), on events a real hub sent for
tokens with hostile names and avatars. The fake DOM has no HTML parser: any
HTML sink used (``innerHTML`` ...) is reported, and every element the code
creates is visible. It is not a browser: layout, CSS and real image loading
are not checked.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from protocol.client import Client, new_key
from tests.conftest import T, token, topup, ws_url
from tests.test_http import request

NODE = shutil.which("node")
HARNESS = Path(__file__).with_name("render_harness.js")

GOOD = "https://img.example/a.png"
INLINE = "data:image/png;base64,iVBORw0KGgo="
# user -> (display name, avatar) in their token
GIFTERS = {
    "mallory": ('<img src=x onerror="alert(1)">', "javascript:alert(1)"),
    "mal2": ("</span><script>alert(2)</script>", "http://example.com/a.png"),
    "rel": ("Rel <b>bold</b>", "/avatar.png"),
    "protorel": ("&lt;amp&gt;", "//evil.example/a.png"),
    "datahtml": ("Data", "data:text/html,<script>alert(3)</script>"),
    "good": ("Good", GOOD),
    "inline": ("Inline", INLINE),
}
TITLE = '<iframe src="javascript:alert(4)"></iframe>'
GIFT_NAME = "<svg onload=alert(5)>"
PRODUCT_NAME = '<a href="javascript:alert(6)">mug</a>'

URLS = {
    GOOD: GOOD,
    "HTTPS://IMG.example/a.png": GOOD,
    INLINE: INLINE,
    "data:image/svg+xml,<svg/>": "data:image/svg+xml,<svg/>",
    "javascript:alert(1)": None,
    "JaVaScRiPt:alert(1)": None,
    " javascript:alert(1)": None,
    "http://example.com/a.png": None,
    "/avatar.png": None,
    "avatar.png": None,
    "//evil.example/a.png": None,
    "data:text/html,<script>alert(1)</script>": None,
    "data:image": None,
    "vbscript:msgbox(1)": None,
    "https:": None,
    "": None,
}
# What the renderers may create; a tag out of user data would show up here.
TAGS = {"BODY", "DIV", "SPAN", "LI", "IMG", "BUTTON", "#TEXT"}
SINKS = ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "srcdoc", "eval(")


def _code(js: str) -> str:
    """app.js without its comments (they may name the sinks they avoid)."""
    js = re.sub(r"/\*.*?\*/", "", js, flags=re.S)
    return "\n".join(line for line in js.splitlines() if not line.lstrip().startswith("//"))


async def test_pages_have_no_html_sinks_and_no_inline_script(hub):
    js = await request(hub.port, "GET", "/app.js")
    assert js.status == 200
    code = _code(js.body.decode())
    assert "textContent" in code and "safeImageUrl" in code
    for sink in SINKS + ("new Function",):
        assert sink not in code, f"app.js uses {sink}"
    for page in ("/", "/viewer.html", "/creator.html", "/brand.html"):
        reply = await request(hub.port, "GET", page)
        assert reply.status == 200
        text = reply.body.decode()
        assert re.findall(r"<script\b[^>]*>", text) == ['<script src="/app.js">'], page
        assert not re.search(r"<[^>]*\son[a-z]+\s*=", text, re.I), f"inline handler in {page}"
        assert "javascript:" not in text.lower(), page


def _walk(node: dict[str, Any]) -> list[dict[str, Any]]:
    out = [node]
    for child in node.get("children", []):
        out += _walk(child)
    return out


def _text(node: dict[str, Any]) -> str:
    return str(node["text"]) + "".join(_text(c) for c in node.get("children", []))


@pytest.mark.skipif(NODE is None, reason="node is not installed")
async def test_hostile_names_titles_and_avatars_render_as_text(hub, connect, tmp_path):
    creator = await connect(hub, "alice")
    await creator.request("go_live", title=TITLE)
    # A product whose name is markup, pinned: its card, and "bought" bubbles.
    await creator.request(
        "product_put", product="mug", name=PRODUCT_NAME, coins=1, stock=99, image=GOOD
    )
    await creator.request("pin", product="mug")
    watcher = await connect(hub, "watcher")
    joined = await watcher.request("join", room="alice")
    pinned = joined["pinned"]
    assert pinned["name"] == PRODUCT_NAME
    for user, (name, avatar) in GIFTERS.items():
        await topup(hub, user, 30)
        async with await Client.connect(
            ws_url(hub), token=token(user, name, avatar=avatar), timeout=T
        ) as c:
            await c.request("join", room="alice")
            await c.send_gift("alice", "rose")
            await c.request("buy", shop="alice", product="mug", count=1, coins=1, key=new_key())
            await c.request("effect", room="alice", effect="confetti", key=new_key())
    async with asyncio.timeout(T):
        bubbles = [await watcher.next_event("bubble") for _ in GIFTERS]
        sales = [await watcher.next_event("sale") for _ in GIFTERS]
        effects = [await watcher.next_event("effect") for _ in GIFTERS]
    effect_list = (await watcher.request("effects"))["effects"]
    joined = await watcher.request("join", room="alice")
    assert joined["title"] == TITLE and len(joined["top"]) == len(GIFTERS)
    assert {b["from"]["avatar"] for b in bubbles} == {a for _, a in GIFTERS.values()}

    app_js = tmp_path / "app.js"
    app_js.write_bytes((await request(hub.port, "GET", "/app.js")).body)
    feed = {
        "urls": list(URLS),
        "bubbles": bubbles,
        "top": joined["top"],
        "title": joined["title"],
        "me": {"user": "mallory", "name": GIFTERS["mallory"][0], "avatar": "javascript:alert(1)"},
        "gifts": [{"id": "rose", "name": GIFT_NAME, "coins": 1}],
        "sales": sales,
        "effects": effects,
        "effect_list": effect_list,
        "pinned": pinned,
    }
    assert NODE is not None
    proc = await asyncio.create_subprocess_exec(
        NODE,
        str(HARNESS),
        str(app_js),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(3 * T):
        out, err = await proc.communicate(json.dumps(feed).encode())
    assert proc.returncode == 0, err.decode()
    res = json.loads(out)

    assert res["urls"] == URLS
    assert res["errors"] == [] and res["html"] == [], res
    nodes = _walk(res["tree"])
    assert {n["tag"] for n in nodes} <= TAGS, {n["tag"] for n in nodes} - TAGS
    # Only the two safe avatars were loaded (once per bubble; top has no avatars).
    assert sorted(set(res["images"])) == sorted({GOOD, INLINE})
    subtitle = next(n for n in nodes if n["id"] == "room-subtitle")
    assert subtitle["text"] == TITLE and not subtitle.get("children")
    me = next(n for n in nodes if n["id"] == "me")
    assert [(n["cls"], n["text"]) for n in me["children"]] == [("avatar", "<")]
    names = [n["text"] for n in nodes if n["cls"] == "bubble-name"]
    # One gift bubble and one "bought" bubble each, every name as text.
    assert sorted(names) == sorted(2 * [name for name, _ in GIFTERS.values()])
    top = [n["text"] for n in nodes if n["cls"] == "top-name"]
    assert sorted(top) == sorted(name for name, _ in GIFTERS.values())
    gifted = {n["text"] for n in nodes if n["cls"] == "bubble-gift-name"}
    assert gifted == {GIFT_NAME, PRODUCT_NAME}
    assert [n["text"] for n in nodes if n["cls"] == "pinned-name"] == [PRODUCT_NAME]
    fx = [n["text"] for n in nodes if n["cls"] == "fx-name"]
    assert sorted(fx) == sorted(name for name, _ in GIFTERS.values())
    assert {n["text"] for n in nodes if n["cls"] == "fx-what"} == {"Confetti"}
    # An avatar that was not loaded shows the name's initial instead.
    avatars = [n for n in nodes if n["cls"] == "avatar"]
    shown = [n for n in avatars if any(c["tag"] == "IMG" for c in n.get("children", []))]
    assert {c["src"] for n in shown for c in n["children"]} == {GOOD, INLINE}
    for n in avatars:
        if n not in shown:
            assert len(n["text"]) == 1 and not n.get("children"), n
