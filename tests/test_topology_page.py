"""The topology page, rendered by headless Chromium against a real 3-node mesh while a
generation split over all three runs.

"The mesh drawn" means: the graph has three node groups, one for the node whose page it is
(``g.node.self``) and one for each of its two peers, each carrying that node's peer id; the
three links of the triangle (two of this node's, one its peers report), each labelled with its
RTT; the generation's route as a path from the coordinator through its stages and one layer
band per stage (over the peer in the graph, and on the route's bar), with the layers the API
gives; the tokens/s plot with the last minute of samples; and a table row per member with
every column filled (hardware, memory used / limit, shards held, stages run, tokens/s, zone,
addresses, ...). The chat box is driven over the DevTools protocol. Chromium is required: CI
installs it (``make test``, apt package ``chromium``), and its absence is a failure, not a
skip. ``EDGEMESH_UPDATE_SCREENSHOT=docs/topology.png`` refreshes the picture in docs/.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import pytest

from mesh.launch.localmesh import wait_for

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


async def chromium(url: str, profile: Path, *args: str, budget_ms: int = 5000) -> str:
    """``budget_ms``: virtual time runs the page's 1 s polling timers without real waiting,
    and does not advance while a fetch is pending: the DOM is dumped (or the screenshot
    taken) after that many milliseconds of completed polls."""
    proc = await asyncio.create_subprocess_exec(
        chromium_path(),
        *FLAGS,
        f"--virtual-time-budget={budget_ms}",
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
    """Elements (tag, attributes) and the text of a dumped DOM; ``rows``: the table's cells
    by the ``data-peer-id`` of their row."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.rows: dict[str, list[str]] = {}
        self._row: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.elements.append((tag, a))
        if tag == "tr" and "data-peer-id" in a:
            self._row = self.rows.setdefault(a["data-peer-id"], [])
        elif tag == "td" and self._row is not None:
            self._row.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._row:
            self._row[-1] += data

    def find(self, tag: str, cls: str | None = None) -> list[dict[str, str]]:
        return [
            a
            for t, a in self.elements
            if t == tag and (cls is None or cls in a.get("class", "").split())
        ]


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six layers (three stages of two) and room for a generation that outlasts the test."""
    from dataclasses import replace

    from runtimes.testmodels import DEFAULT_SPECS, write_test_model

    spec = replace(DEFAULT_SPECS["llama"], n_layers=6, context_length=8192)
    return write_test_model(tmp_path_factory.mktemp("page") / "page.gguf", spec)


async def _generate(mesh, node, body, seen: list[dict]) -> None:
    """Generations in the background, one after another (a fast machine may finish one
    before the page is drawn), until the test cancels the task; their events are kept."""
    while True:
        async with mesh._http.post(
            node.api + "/v1/generate", json=body, timeout=aiohttp.ClientTimeout(total=None)
        ) as resp:
            assert resp.status == 200
            async for line in resp.content:
                if line.strip():
                    seen.append(json.loads(line))
        assert "error" not in seen[-1], seen[-1]


async def test_topology_page_draws_the_mesh_and_a_running_route(local_mesh, long_model, tmp_path):
    chromium_path()  # fail at once, before starting the mesh, when it is missing
    a = await local_mesh.start_node("laptop", ["--zone", "home-lan"])
    b = await local_mesh.start_node("desktop", ["--zone", "home-lan"])
    c = await local_mesh.start_node(EVIL, ["--zone", "office"])
    await local_mesh.wait_connected(timeout=30)
    ids = {a.peer_id, b.peer_id, c.peer_id}

    async with aiohttp.ClientSession() as http:
        async with http.get(a.api + "/") as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
            assert "/web/topology.js" in await resp.text()
        for script in ("topology.js", "chat.js"):
            async with http.get(a.api + "/web/" + script) as resp:
                assert resp.status == 200 and resp.content_type == "text/javascript"
                text = await resp.text()
                for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write"):
                    assert sink not in text
                # nothing fetched off-node (the SVG namespace is a name, not a download)
                assert "https://" not in text
                assert text.replace("http://www.w3.org/2000/svg", "").count("http://") == 0
        async with http.get(a.api + "/web/../api.py") as resp:
            assert resp.status == 404

    await local_mesh.post(a, "/v1/models", {"path": str(long_model), "name": "tiny"})
    events: list[dict] = []
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4000, "split": 3}
    gen = asyncio.get_running_loop().create_task(_generate(local_mesh, a, body, events))
    try:
        await _page_while_generating(local_mesh, a, ids, events, tmp_path)
    finally:
        gen.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gen


async def _mesh_ready(mesh, a, ids: set[str]) -> dict | None:
    """/v1/mesh once every member reports its hardware, runs a stage of the generation and
    has a rate, the route covers all three and its rate's history has a second counted."""
    view = await mesh.get(a, "/v1/mesh")
    members = {m["peer_id"]: m for m in view["members"]}
    gens = view["generations"]
    ok = (
        set(members) == ids
        and all(
            m.get("hw") and m.get("running") and m.get("tokens_per_s") for m in members.values()
        )
        and len(gens) == 1
        and {s["peer_id"] for s in gens[0]["stages"]} == ids
        and len(view["links"]) == 3
        and sum(gens[0]["rate_history"]) > 0  # a whole second of it counted
    )
    return view if ok else None


def _route(view: dict) -> list[tuple[str, int, int]] | None:
    gens = view["generations"]
    if len(gens) != 1:
        return None
    return [(s["peer_id"], *s["layers"]) for s in gens[0]["stages"]]


async def _page_while_generating(mesh, a, ids, events, tmp_path) -> None:
    for attempt in range(3):
        view = await wait_for(lambda: _mesh_ready(mesh, a, ids), 90, "the mesh view", 0.5)
        dom = Dom(await chromium(a.api + "/", tmp_path / f"chromium{attempt}", "--dump-dom"))
        body = dom.find("body")[0]
        assert body["data-status"] == "ok", "".join(dom.text)[-500:]
        # The same route before and after the page was drawn, so the page drew that one
        # (between two generations of the loop the page may show none: draw it again).
        if body["data-routes"] == "1" and _route(view) == _route(await mesh.get(a, "/v1/mesh")):
            break
    else:
        pytest.fail("the route changed under every drawing of the page")
    assert all(x["rtt_ms"] is not None for x in view["links"])
    stages = view["generations"][0]["stages"]
    assert view["generations"][0]["coordinator"] == a.peer_id
    assert events[0]["route"] and any("token" in e for e in events)  # it streams meanwhile
    assert body["data-drawn"] == "3"

    # the graph: three members, the three links of the triangle, each with its RTT
    nodes = dom.find("g", "node")
    assert {n["data-peer-id"] for n in nodes} == ids and len(nodes) == 3
    assert [n["data-peer-id"] for n in nodes if "self" in n["class"].split()] == [a.peer_id]
    links = dom.find("line", "link")
    assert {frozenset((x["data-a"], x["data-b"])) for x in links} == {
        frozenset(p) for p in ((a.peer_id, b) for b in ids - {a.peer_id})
    } | {frozenset(ids - {a.peer_id})}
    assert len(dom.find("line", "connected")) == 2 and len(dom.find("line", "reported")) == 1
    assert len(dom.find("text", "rtt")) == 3
    # the route: a path over the peers, and one layer band per stage, on the graph and the bar
    (route,) = dom.find("polyline", "route")
    assert len(route["points"].split()) == 1 + len(stages)  # coordinator, then each stage
    want = {(s["peer_id"], f"{s['layers'][0]}-{s['layers'][1]}") for s in stages}
    for cls in ("layer-band", "node-band"):
        bands = dom.find("rect", cls)
        assert {(r["data-peer-id"], r["data-layers"]) for r in bands} == want, cls
    # the live plot has samples
    # the plot: the last minute as the nodes counted it, tokens of the generation and each
    # member's stage rows per second
    (plot,) = dom.find("polyline", "total")
    assert int(plot["data-samples"]) == 60 == len(plot["points"].split())
    assert {p["data-peer-id"] for p in dom.find("polyline", "member")} == ids
    assert sum(view["generations"][0]["rate_history"]) > 0

    # the table: a row per member, every column filled with real values
    rows = dom.rows
    assert set(rows) == ids
    for pid, cells in rows.items():
        assert len(cells) == 14 and all(cells), (pid, cells)
        hw, memory, holds, runs, tps, zone, addrs = (cells[i] for i in (3, 4, 5, 6, 7, 8, 9))
        assert " / " in memory and "tiny [" in holds and "tiny [" in runs, cells
        assert float(tps) > 0 and zone in ("home-lan", "office") and ":" in addrs, cells
        assert any(k in hw for k in ("cpu", "cuda", "metal")) and "cores" in hw, cells
    assert rows[a.peer_id][2] == "this node"
    # the name is text on the page, never markup
    assert not dom.find("img")
    assert sorted(r[1] for r in rows.values()) == sorted(["laptop", "desktop", EVIL])
    assert EVIL[:23] + "…" in dom.text  # the graph's label, cut

    shot = tmp_path / "topology.png"
    await chromium(
        a.api + "/",
        tmp_path / "chromium2",
        f"--screenshot={shot}",
        "--window-size=1360,700",
        budget_ms=20_000,  # twenty polls: the plot has a line to show
    )
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    keep = os.environ.get("EDGEMESH_UPDATE_SCREENSHOT")
    if keep:  # refresh docs/topology.png: EDGEMESH_UPDATE_SCREENSHOT=docs/topology.png
        _save_small(shot, Path(keep))


def _save_small(shot: Path, keep: Path) -> None:
    """The screenshot in 128 colours (a third of the size; the page is flat colours)."""
    try:
        from PIL import Image
    except ImportError:
        shutil.copyfile(shot, keep)
        return
    with Image.open(shot) as im:
        im.convert("RGB").quantize(colors=128).save(keep, optimize=True)


async def test_page_renders_shards_zone_and_rates_from_untrusted_fields(tmp_path):
    """Odd and hostile values in every field the page reads: shown as text or left out."""
    from aiohttp import web

    from mesh.api.web import add_web_routes

    polls = [0]

    async def info(request: web.Request) -> web.Response:
        return web.json_response({"peer_id": "self0", "name": "me", "mesh": "m"})

    async def mesh(request: web.Request) -> web.Response:
        good = {
            "peer_id": "p1",
            "name": "gpu box",
            "zone": "eu-west",
            "addresses": ["10.0.0.2:7000"],
            "hw": {"acc": "cuda", "cores": 8, "ram_mb": 32768, "gpus": [{"name": "RTX 4090"}]},
            "memory_used": 2_000_000_000,
            "memory_limit": 8_000_000_000,
            "shards": [{"model": "gemma3", "units": [0, 9]}, "tok-embd"],
            "running": [{"model": "gemma3", "units": [0, 9], "owner": "self0"}],
            "tokens_per_s": 41.25,
            "rate_history": [40, 41, 42],
        }
        bad = {
            "peer_id": "p2",
            "name": 7,
            "zone": ["x"],
            "hw": "<b>",
            "shards": "not a list",
            "running": [{"units": "x", "owner": '"><script>alert(1)</script>'}],
            "tokens_per_s": "NaN",
        }
        route = {
            "model": "gemma3",
            "coordinator": "self0",
            "n_layers": 18,
            "stages": [
                {"peer_id": "p1", "layers": [0, 8]},
                {"peer_id": "self0", "layers": [9, 17]},
                {"peer_id": "p2", "layers": "x"},
            ],
            "tokens": 12,
            "tokens_per_s": 9.5,
            "rate_history": [9, "x", 10, None],
        }
        links = [
            {"a": "p1", "b": "self0", "rtt_ms": 2.5},
            {"a": "p1", "b": "p2", "rtt_ms": "far"},
            {"a": "nobody", "b": "self0", "rtt_ms": 1},
        ]
        return web.json_response(
            {
                "self": "self0",
                "members": [{"peer_id": "self0", "name": "me", "tokens_per_s": 12.5}, good, bad],
                "links": links,
                "generations": [route, "not an object"],
            }
        )

    async def peers(request: web.Request) -> web.Response:
        polls[0] += 1
        return web.json_response(
            [
                {
                    "peer_id": "p1",
                    "name": "gpu box",
                    "state": "connected",
                    "rtt_ms": 2.5,
                    "bytes_sent": 1_500_000 + 100_000 * polls[0],  # 100 KB per poll
                    "bytes_received": 2000,
                },
                {
                    "peer_id": "p2",
                    "state": '"><script>alert(1)</script>',
                    "rtt_ms": "NaN",
                    "bytes_sent": None,
                },
                "not an object",
            ]
        )

    app = web.Application()
    app.router.add_get("/v1/info", info)
    app.router.add_get("/v1/peers", peers)
    app.router.add_get("/v1/mesh", mesh)
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
    assert dom.find("body")[0]["data-status"] == "ok", "".join(dom.text)[-500:]
    assert dom.find("body")[0]["data-drawn"] == "3"  # this node and the two object entries
    assert dom.find("body")[0]["data-routes"] == "1"
    assert len(dom.find("script")) == 2  # only the page's own
    text = dom.text
    p1 = dom.rows["p1"]
    assert p1[4] == "2.0 GB / 8.0 GB" and p1[5] == "gemma3 [0, 9), tok-embd"
    assert p1[6] == "gemma3 [0, 9) for this node" and p1[7] == "41.3" and p1[8] == "eu-west"
    assert "cuda · 8 cores · 32.0 GiB · RTX 4090" in p1[3] and p1[9] == "10.0.0.2:7000"
    assert dom.rows["self0"][7] == "12.5"
    sent = 1_500_000 + 100_000 * polls[0]  # the last poll is the one drawn
    assert p1[11] == f"{sent / 1e6:.1f} MB" and p1[12] == "2.0 KB"
    # 100 KB more per one-second poll (timer jitter allowed), nothing received
    assert p1[13].endswith(" KB/s / 0 B/s") and 50 < float(p1[13].split()[0]) < 200, p1
    p2 = dom.rows["p2"]
    assert p2[2] == '"><script>alert(1)</script>'  # the bad state, as text
    assert p2[1] == "" and p2[3] == "" and p2[5] == "" and p2[8] == "" and p2[7] == "-"
    classes = sorted(g["class"] for g in dom.find("g", "node"))
    assert classes == ["node connected", "node self", "node unknown"]
    # the link to a member nobody lists is not drawn; a bad RTT has no label
    assert len(dom.find("line", "link")) == 2 and "2.5 ms" in text
    # the route's bands: the two stages with layer ranges, not the malformed one
    bands = {(r["data-peer-id"], r["data-layers"]) for r in dom.find("rect", "layer-band")}
    assert bands == {("p1", "0-8"), ("self0", "9-17")}
    assert "generations now 9.5 tok/s · thin: each member's stages" in text
    (total,) = dom.find("polyline", "total")
    assert total["data-samples"] == "4"  # bad values count as none
    members = {p["data-peer-id"]: p for p in dom.find("polyline", "member")}
    assert set(members) == {"self0", "p1", "p2"} and members["p1"]["data-samples"] == "3"
    assert polls[0] >= 2


CHAT = """(async () => {
  const $ = (id) => document.getElementById(id);
  const out = $("chat-out");
  const ask = async (token) => {
    $("chat-token").value = token;
    $("chat-token").dispatchEvent(new Event("change"));
    $("chat-prompt").value = "hello";
    out.setAttribute("data-state", "idle");
    $("chat-send").click();
    for (let i = 0; i < 1200; i++) {
      const state = out.getAttribute("data-state");
      if (state === "done" || state === "error") {
        return { state, text: out.textContent, chunks: out.getAttribute("data-chunks") };
      }
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    return { state: "timeout", text: out.textContent };
  };
  for (let i = 0; i < 200 && !$("chat-model").value; i++) {
    await new Promise((resolve) => setTimeout(resolve, 50));  // the first poll names the model
  }
  const none = await ask("");
  const wrong = await ask("x".repeat(43));
  const right = await ask(TOKEN);
  return { none, wrong, right, model: $("chat-model").value,
           kept: sessionStorage.getItem("edgemesh.api_token") === TOKEN };
})()"""


async def _devtools(proc: asyncio.subprocess.Process) -> str:
    """The DevTools address Chromium prints on stderr when it starts."""
    assert proc.stderr is not None
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode(errors="replace")
        assert line, "chromium exited before it listened for DevTools"
        if "DevTools listening on ws://" in line:
            return line.split("ws://", 1)[1].split("/", 1)[0]


async def _evaluate(ws: aiohttp.ClientWebSocketResponse, expression: str) -> object:
    """Run ``expression`` in the page (awaiting a promise) and return its value."""
    params = {"expression": expression, "awaitPromise": True, "returnByValue": True}
    await ws.send_json({"id": 1, "method": "Runtime.evaluate", "params": params})
    while True:
        msg = await asyncio.wait_for(ws.receive_json(), 120)
        if msg.get("id") == 1:
            assert "exceptionDetails" not in msg["result"], msg
            return msg["result"]["result"].get("value")


@contextlib.asynccontextmanager
async def devtools(url: str, profile: Path) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """The page at ``url`` in headless Chromium, driven over the DevTools protocol."""
    proc = await asyncio.create_subprocess_exec(
        chromium_path(),
        *FLAGS,
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        url,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        address = await _devtools(proc)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{address}/json/list") as resp:
                pages = [t for t in await resp.json() if t["type"] == "page"]
            async with http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                ready = "document.readyState === 'complete' && !!document.getElementById('chat')"
                await wait_for(lambda: _evaluate(ws, ready), 30, "the page to load", 0.2)
                yield ws
    finally:
        proc.kill()
        await proc.wait()


async def test_chat_box_streams_from_the_node_with_the_pasted_token(
    local_mesh, long_model, tmp_path
):
    """A real browser types into the chat box (over the DevTools protocol): without the token
    and with a wrong one it says so; with the node's token the reply streams in."""
    chromium_path()
    node = await local_mesh.start_node("solo", ["--no-mdns"])
    await local_mesh.post(node, "/v1/models", {"path": str(long_model), "name": "tiny"})
    async with devtools(node.api + "/", tmp_path / "chromium") as ws:
        got = await _evaluate(ws, CHAT.replace("TOKEN", json.dumps(node.token)))
    assert isinstance(got, dict), got
    assert got["model"] == "tiny"  # named by the page from what the mesh holds
    assert got["none"]["state"] == "error" and "paste the API token" in got["none"]["text"]
    assert got["wrong"] == {
        "state": "error",
        "text": "the API token is not this node's",
        "chunks": None,
    }
    assert got["right"]["state"] == "done", got["right"]
    assert int(got["right"]["chunks"]) >= 1 and got["kept"]


async def test_a_locked_node_shows_its_page_once_the_token_is_pasted(local_mesh, tmp_path):
    """With EDGEMESH_API_TOKEN set even the status reads need the token: the page says so,
    and draws once the user pastes it."""
    chromium_path()
    local_mesh.env = {"EDGEMESH_API_TOKEN": "operator-token"}
    node = await local_mesh.start_node("locked", ["--no-mdns"])
    status = (
        "[document.body.getAttribute('data-status'), document.getElementById('status').textContent]"
    )
    async with devtools(node.api + "/", tmp_path / "chromium") as ws:

        async def shown(want: str) -> object:
            got = await _evaluate(ws, status)
            return got if isinstance(got, list) and got[0] == want else None

        refused = await wait_for(lambda: shown("error"), 30, "the page to fail", 0.2)
        assert "needs the node's API token" in str(refused[1])
        paste = (
            "(() => { const t = document.getElementById('chat-token'); t.value = 'operator-token';"
            " t.dispatchEvent(new Event('change')); })()"
        )
        await _evaluate(ws, paste)
        await wait_for(lambda: shown("ok"), 30, "the page to draw", 0.2)
        drawn = await _evaluate(ws, "document.querySelectorAll('tr.peer-row').length")
    assert drawn == 1
