"""Attacks on discovery and signaling, against real node processes."""

import base64

import aiohttp
import msgpack
import pytest
from aiohttp import web
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from mesh.discovery.mdns import SERVICE_TYPE, make_properties
from mesh.launch.localmesh import wait_for
from mesh.net.identity import Identity
from mesh.net.signaling import parse_envelope, seal

pytestmark = pytest.mark.network


class SignalingRelay:
    """A man in the middle on the signaling path to ``target`` (host:port). It is a member
    of the mesh (an insider: ``data_dir`` holds its identity and certificate), so membership
    does not stop it; the handshake's binding of the DTLS fingerprints must."""

    def __init__(self, target: str, mode: str, data_dir) -> None:
        self.target = target
        self.mode = mode
        self.me = Identity.load_or_create(data_dir)  # the relay's own, valid identity
        self.cert = (data_dir / "member.cert").read_text().strip()
        self.offers = 0
        self.session: aiohttp.ClientSession | None = None
        self.runner: web.AppRunner | None = None
        self.address = ""

    async def start(self) -> None:
        self.session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_get("/edgemesh/info", self.info)
        app.router.add_post("/edgemesh/offer", self.offer)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.address = f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        await self.session.close()
        await self.runner.cleanup()

    async def info(self, request):
        if self.mode == "splice":  # introduce itself under its own (valid) identity
            body = {"name": "m", "cert": self.cert}
            return web.Response(body=seal(self.me, "info", request.query["to"], body))
        async with self.session.get(
            f"http://{self.target}/edgemesh/info", params=request.query
        ) as resp:
            return web.Response(body=await resp.read(), status=resp.status)

    async def offer(self, request):
        self.offers += 1
        raw = await request.read()
        fields = msgpack.unpackb(raw)
        target_id = await self._target_id()
        if self.mode == "swap-fingerprint":
            # keep A's signature, change the DTLS fingerprint so DTLS would end at the relay
            fields[7]["sdp"] = _swap_fp(fields[7]["sdp"])
            raw = msgpack.packb(fields)
        elif self.mode == "splice":
            # re-sign A's offer (SDP untouched) as the relay, towards B; then re-sign B's
            # answer as the relay towards A: A and B meet directly, each expecting the relay
            raw = seal(self.me, "offer", target_id, dict(fields[7], cert=self.cert))
        async with self.session.post(f"http://{self.target}/edgemesh/offer", data=raw) as resp:
            body = await resp.read()
            if resp.status != 200:
                return web.Response(body=body, status=resp.status)
        if self.mode == "splice":
            answer = parse_envelope(body)
            body = seal(self.me, "answer", fields[2], dict(answer.body, cert=self.cert))
        return web.Response(body=body)

    async def _target_id(self):
        async with self.session.get(
            f"http://{self.target}/edgemesh/info", params={"to": self.me.peer_id}
        ) as resp:
            return parse_envelope(await resp.read()).sender


def _swap_fp(sdp: str) -> str:
    lines = []
    for line in sdp.splitlines():
        if line.startswith("a=fingerprint:sha-256 "):
            line = "a=fingerprint:sha-256 " + ":".join(["AB"] * 32)
        lines.append(line)
    return "\r\n".join(lines) + "\r\n"


@pytest.mark.parametrize("mode", ["swap-fingerprint", "splice"])
async def test_signaling_mitm_is_refused(local_mesh, mode):
    b = await local_mesh.start_node("b", ["--no-mdns", "--signaling", "127.0.0.1:0"])
    local_mesh.provision(local_mesh.base_dir / "relay")
    relay = SignalingRelay(b.signaling, mode, local_mesh.base_dir / "relay")
    await relay.start()
    try:
        a = await local_mesh.start_node("a", ["--no-mdns", "--peer", relay.address])

        async def a_failed():
            info = await local_mesh.get(a, "/v1/info")
            return info["counters"]["dial_failures"] >= 2

        await wait_for(a_failed, 30, "a's dials through the relay to fail")
        assert relay.offers >= 2
        assert await local_mesh.get(a, "/v1/peers") == []
        assert await local_mesh.get(b, "/v1/peers") == []
        a_info = await local_mesh.get(a, "/v1/info")
        b_info = await local_mesh.get(b, "/v1/info")
        if mode == "swap-fingerprint":
            assert b_info["counters"]["signaling_rejected"] >= 1
            await a.wait_logged("bad signature")
        else:
            assert a_info["counters"]["handshake_failures"] >= 1
            await a.wait_logged("expected peer")
    finally:
        await relay.stop()


async def test_spoofed_mdns_announcement_never_connects(local_mesh):
    a, b = await local_mesh.start_nodes(["a", "b"])
    await local_mesh.wait_connected(timeout=20)

    attacker, victim = Identity.generate(), Identity.generate()
    mesh = local_mesh.mesh
    props = make_properties(attacker, 9, ["127.0.0.1"], "spoof", mesh)
    zc = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    infos = []
    # 1) another peer's id (b's) with the attacker's key; 2) a victim's id, attacker's key
    for claimed in (b.peer_id, victim.peer_id):
        spoof = dict(props, id=claimed)
        infos.append(
            AsyncServiceInfo(
                SERVICE_TYPE,
                f"{claimed}.{SERVICE_TYPE}",
                port=9,
                properties=spoof,
                parsed_addresses=["127.0.0.1"],
                server=f"spoof-{claimed[:8]}.local.",
            )
        )
    # 3) a's real record replayed by the attacker, pointing at the attacker's address
    real = dict(
        make_properties(attacker, 9, ["127.0.0.1"], "x", mesh),
        id=a.peer_id,
        pk=base64.urlsafe_b64encode(b"\0" * 32).decode().rstrip("="),
    )
    infos.append(
        AsyncServiceInfo(
            SERVICE_TYPE,
            f"{a.peer_id}x.{SERVICE_TYPE}",
            port=9,
            properties=real,
            parsed_addresses=["127.0.0.1"],
            server="spoof-a.local.",
        )
    )
    try:
        for info in infos:
            await zc.async_register_service(info, allow_name_change=True)

        async def a_rejected_all():
            return (await local_mesh.get(a, "/v1/info"))["counters"]["mdns_rejected"] >= 2

        await wait_for(a_rejected_all, 30, "a to reject the spoofed announcements")
        peers = {p["peer_id"]: p for p in await local_mesh.get(a, "/v1/peers")}
        assert set(peers) == {b.peer_id}
        assert peers[b.peer_id]["state"] == "connected"
        assert victim.peer_id not in peers and attacker.peer_id not in peers
        # b's entry was not redirected to the spoofed port
        assert all(not addr.endswith(":9") for addr in peers[b.peer_id]["addresses"])
        await local_mesh.wait_connected(timeout=5)
    finally:
        await zc.async_close()
