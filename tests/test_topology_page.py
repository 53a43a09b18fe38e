"""The topology page, rendered by headless Chromium against a real 3-node mesh.

"Three peers drawn" means: the graph has three node groups, one for the node whose page it is
(``g.node.self``) and one for each of its two connected peers (``g.node.connected``), each
carrying that node's peer id; two links join the centre to the peers; the table has the same
three rows. Chromium is required: CI installs it (``make test``, apt package ``chromium``),
and its absence is a failure, not a skip.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import pytest

pytestmark = pytest.mark.network

EVIL = "jetson<img src=x onerror=alert(1)>"  # a node name that must be shown as text
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    # virtual time runs the page's 1 s polling timers without real waiting, and does not
    # advance while a fetch is pending: the DOM is dumped after several completed polls
    "--virtual-time-budget=5000",
]


def chromium_path() -> str:
    path = os.environ.get("EDGEMESH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail(
            "chromium is not installed: `make test` installs it (Debian package chromium); "
            "or set EDGEMESH_CHROMIUM to a Chromium binary",
            pytrace=False,
        )
    return path


async def chromium(url: str, profile: Path, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        chromium_path(),
        *FLAGS,
        f"--user-data-dir={profile}",
        *args,
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode(errors="replace")


class Dom(HTMLParser):
    """Elements (tag, attributes) and the text of a dumped DOM."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def find(self, tag: str, cls: str | None = None) -> list[dict[str, str]]:
        return [
            a
            for t, a in self.elements
            if t == tag and (cls is None or cls in a.get("class", "").split())
        ]


async def test_topology_page_draws_three_peers(local_mesh, tmp_path):
    chromium_path()  # fail at once, before starting the mesh, when it is missing
    a = await local_mesh.start_node("laptop")
    b = await local_mesh.start_node("desktop")
    c = await local_mesh.start_node(EVIL)
    await local_mesh.wait_connected(timeout=30)
    ids = {a.peer_id, b.peer_id, c.peer_id}

    async with aiohttp.ClientSession() as http:
        async with http.get(a.api + "/") as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
            assert "/web/topology.js" in await resp.text()
        async with http.get(a.api + "/web/topology.js") as resp:
            assert resp.status == 200 and resp.content_type == "text/javascript"
            script = await resp.text()
            for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write"):
                assert sink not in script
        async with http.get(a.api + "/web/../api.py") as resp:
            assert resp.status == 404

    dom = Dom(await chromium(a.api + "/", tmp_path / "chromium", "--dump-dom"))
    body = dom.find("body")[0]
    assert body["data-status"] == "ok", "".join(dom.text)[-500:]
    assert body["data-drawn"] == "3"

    nodes = dom.find("g", "node")
    assert len(nodes) == 3
    assert {n["data-peer-id"] for n in nodes} == ids
    assert [n["data-peer-id"] for n in nodes if "self" in n["class"].split()] == [a.peer_id]
    assert sorted(n["class"] for n in nodes) == ["node connected"] * 2 + ["node self"]
    assert len(dom.find("line", "connected")) == 2

    rows = dom.find("tr", "peer-row")
    assert {r["data-peer-id"] for r in rows} == ids and len(rows) == 3
    # the name is text on the page, never markup
    assert not dom.find("img")
    assert sum(EVIL in t for t in dom.text) == 2  # the graph's tooltip and the table cell
    assert EVIL[:23] + "…" in dom.text  # the graph's label, cut

    shot = tmp_path / "topology.png"
    await chromium(
        a.api + "/", tmp_path / "chromium2", f"--screenshot={shot}", "--window-size=1000,400"
    )
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    keep = os.environ.get("EDGEMESH_UPDATE_SCREENSHOT")
    if keep:  # refresh docs/topology.png: EDGEMESH_UPDATE_SCREENSHOT=docs/topology.png
        shutil.copyfile(shot, keep)


async def test_page_renders_shards_zone_and_rates_from_untrusted_fields(tmp_path):
    """Fields the mesh does not fill yet (zone, shards, running, tokens/s) and bad values."""
    from aiohttp import web

    from mesh.api.web import add_web_routes

    polls = [0]

    async def info(request: web.Request) -> web.Response:
        return web.json_response({"peer_id": "self0", "name": "me", "tokens_per_s": 12.5})

    async def peers(request: web.Request) -> web.Response:
        polls[0] += 1
        return web.json_response(
            [
                {
                    "peer_id": "p1",
                    "name": "gpu box",
                    "state": "connected",
                    "rtt_ms": 2.5,
                    "zone": "eu-west",
                    "shards": [{"model": "gemma3", "layers": [0, 9]}, "tok-embd"],
                    "running": [{"model": "gemma3", "start": 0, "end": 9}],
                    "tokens_per_s": 41.25,
                    "bytes_sent": 1_500_000 + 100_000 * polls[0],  # 100 KB per poll
                    "bytes_received": 2000,
                },
                {
                    "peer_id": "p2",
                    "name": 7,
                    "state": '"><script>alert(1)</script>',
                    "rtt_ms": "NaN",
                    "shards": "not a list",
                    "bytes_sent": None,
                },
                "not an object",
            ]
        )

    app = web.Application()
    app.router.add_get("/v1/info", info)
    app.router.add_get("/v1/peers", peers)
    add_web_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        html = await chromium(f"http://127.0.0.1:{port}/", tmp_path / "chromium", "--dump-dom")
    finally:
        await runner.cleanup()
    dom = Dom(html)
    assert dom.find("body")[0]["data-status"] == "ok"
    assert dom.find("body")[0]["data-drawn"] == "3"  # this node and the two object entries
    assert len(dom.find("script")) == 1  # only the page's own
    text = dom.text
    for shown in ("eu-west", "gemma3 [0, 9), tok-embd", "gemma3 [0, 9)", "41.3", "12.5"):
        assert shown in text, shown
    sent = 1_500_000 + 100_000 * polls[0]  # the last poll is the one drawn
    assert f"{sent / 1e6:.1f} MB" in text and "2.0 KB" in text
    # 100 KB more per one-second poll (timer jitter allowed), nothing received
    (rate,) = [t for t in text if t.endswith(" KB/s / 0 B/s")]
    assert 50 < float(rate.split()[0]) < 200, rate
    assert '"><script>alert(1)</script>' in text  # the bad state, as text
    classes = sorted(g["class"] for g in dom.find("g", "node"))
    assert classes == ["node connected", "node self", "node unknown"]
    assert polls[0] >= 2
