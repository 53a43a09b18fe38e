"""LAN discovery over mDNS (zeroconf): service ``_edgemesh._tcp.local.``.

The TXT record holds the peer id, the public key, the signaling port, the addresses, the mesh
name, an announcement time and a signature over them, so a spoofer can neither claim another
peer's id (the id is the hash of the key) nor redirect a real peer's announcement to its own
address; a replayed older announcement loses to the newer one the node already saw. Still, an
announcement is only a hint: a peer counts once the transport handshake proves its key.

The ``c`` TXT value is the node's mesh member certificate (base64url, ~160 characters: a TXT
value holds 255). It is outside the announcer's signature because it needs none: the mesh
owner signed it for this peer id, and the receiver's policy checks exactly that.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from mesh.errors import DiscoveryError
from mesh.net.identity import Identity
from mesh.net.signed import Field, Format

__all__ = [
    "SERVICE_TYPE",
    "Announcement",
    "make_properties",
    "parse_announcement",
    "MdnsDiscovery",
]

log = logging.getLogger(__name__)
SERVICE_TYPE = "_edgemesh._tcp.local."
MAX_ADDRESSES = 8
# The TXT record's signed fields, in the order they are signed (the TXT keys in comments).
ANNOUNCEMENT = Format(
    what="announcement",
    context=b"edgemesh/mdns/v1\x00",
    fields=(
        Field("id", str),
        Field("pk", bytes),
        Field("sp", int),  # signaling port
        Field("a", list),  # addresses
        Field("n", str),  # name
        Field("m", str),  # mesh
        Field("t", int),  # sequence: the announcement time in ms
    ),
    error=DiscoveryError,
    max_size=2048,  # of the TXT keys and values; a valid one is under 1 KiB
    signer="id",
)
MAX_TRACKED = 256  # peers whose announcements we resolve at once; more are ignored


@dataclass(frozen=True)
class Announcement:
    peer_id: str
    public_key: bytes
    port: int
    addresses: tuple[str, ...]
    name: str
    mesh: str
    seq: int
    cert: str | None = None  # member certificate text, checked by the receiver's policy


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_properties(
    identity: Identity,
    port: int,
    addresses: list[str],
    name: str,
    mesh: str = "default",
    seq: int | None = None,
    cert: str | None = None,
) -> dict[str, str]:
    seq = int(time.time() * 1000) if seq is None else seq
    name = name[:63]
    sig = ANNOUNCEMENT.sign(
        identity, [identity.peer_id, identity.public_key, port, addresses, name, mesh, seq]
    )
    props = {
        "id": identity.peer_id,
        "pk": _b64(identity.public_key),
        "sp": str(port),
        "a": ",".join(addresses),
        "n": name,
        "m": mesh,
        "t": str(seq),
        "sig": _b64(sig),
    }
    if cert:
        props["c"] = cert
    return props


def parse_announcement(properties: dict[bytes, bytes | None], instance: str) -> Announcement:
    """Validate a TXT record (pure). Raises DiscoveryError."""
    size = sum(len(k) + len(v or b"") for k, v in properties.items())
    if size > ANNOUNCEMENT.max_size:
        raise DiscoveryError(f"announcement {instance!r} of {size} bytes exceeds the cap")
    try:
        props = {k.decode(): (v or b"").decode() for k, v in properties.items()}
        values = [
            props["id"],
            _unb64(props["pk"]),
            int(props["sp"]),
            [a for a in props.get("a", "").split(",") if a],
            props.get("n", ""),
            props.get("m", ""),
            int(props["t"]),
        ]
        sig = _unb64(props["sig"])
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise DiscoveryError(f"malformed announcement {instance!r}: {exc!r}") from None
    f = ANNOUNCEMENT.check(values, sig).fields
    pid, port, addrs = f["id"], f["sp"], f["a"]
    if not 0 < port < 65536:
        raise DiscoveryError(f"announcement {instance!r}: bad port {port}")
    if not addrs or len(addrs) > MAX_ADDRESSES:
        raise DiscoveryError(f"announcement {instance!r}: needs 1..{MAX_ADDRESSES} addresses")
    for a in addrs:
        try:
            ipaddress.ip_address(a)
        except ValueError as exc:
            raise DiscoveryError(f"announcement {instance!r}: {exc}") from None
    if not instance.startswith(pid + "."):
        raise DiscoveryError(f"instance {instance!r} does not carry its peer id {pid[:12]}")
    cert = props.get("c") or None
    return Announcement(pid, f["pk"], port, tuple(addrs), f["n"], f["m"], f["t"], cert)


class MdnsDiscovery:
    """Announces this node and reports validated announcements of others in its mesh.

    ``on_found(announcement)`` fires for every valid add/update, ``on_lost(peer_id)`` when a
    goodbye or expiry is confirmed (the name no longer resolves: a spoofed goodbye for a live
    peer changes nothing). ``rejected`` counts announcements that failed validation;
    announcements of other meshes are ignored. Resolves run at most ``MAX_TRACKED`` at a time;
    names beyond that wait in a bounded, de-duplicated backlog instead of being lost.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        port: int,
        addresses: list[str],
        name: str,
        interfaces: list[str] | None,
        on_found: Callable[[Announcement], None],
        on_lost: Callable[[str], None],
        mesh: str = "default",
        cert: str | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("mDNS needs at least one address to announce")
        self.identity = identity
        self.port = port
        self.addresses = addresses[:MAX_ADDRESSES]
        self.name = name
        self.mesh = mesh
        self.cert = cert
        self.interfaces = interfaces
        self.on_found = on_found
        self.on_lost = on_lost
        self.rejected = 0
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._backlog: OrderedDict[str, bool] = OrderedDict()  # name -> removed?
        self._seq: OrderedDict[str, int] = OrderedDict()  # newest announcement seen per peer

    async def start(self) -> None:
        if self.interfaces:
            zc = AsyncZeroconf(interfaces=self.interfaces, ip_version=IPVersion.V4Only)
        else:
            zc = AsyncZeroconf()
        self._zc = zc
        props = make_properties(
            self.identity, self.port, self.addresses, self.name, self.mesh, cert=self.cert
        )
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{self.identity.peer_id}.{SERVICE_TYPE}",
            port=self.port,
            properties=props,
            parsed_addresses=self.addresses,
            server=f"em-{self.identity.peer_id}.local.",
        )
        await zc.async_register_service(self._info)
        if self._zc is not zc:
            return  # stopped while registering: stop() closed it, browse nothing
        self._browser = AsyncServiceBrowser(zc.zeroconf, [SERVICE_TYPE], handlers=[self._on_change])

    async def stop(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        zc, self._zc = self._zc, None
        if zc is not None:
            # async_close unregisters our service, which sends the goodbye packets.
            await zc.async_close()

    def _on_change(
        self, zeroconf: object, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        label = name[: -len(SERVICE_TYPE) - 1] if name.endswith("." + SERVICE_TYPE) else name
        if label == self.identity.peer_id or len(name) > 255:
            return
        self._schedule(name, state_change is ServiceStateChange.Removed)

    def _schedule(self, name: str, removed: bool) -> None:
        if name in self._tasks:
            return  # a resolve of this name is running; its answer is the newest anyway
        if len(self._tasks) >= MAX_TRACKED:
            self._backlog[name] = removed
            self._backlog.move_to_end(name)
            while len(self._backlog) > 4 * MAX_TRACKED:
                self._backlog.popitem(last=False)
            return
        task = asyncio.get_running_loop().create_task(self._resolve(name, removed))
        self._tasks[name] = task

        def _done(_: asyncio.Task[None]) -> None:
            self._tasks.pop(name, None)
            if self._backlog and self._zc is not None:
                next_name, next_removed = self._backlog.popitem(last=False)
                self._schedule(next_name, next_removed)

        task.add_done_callback(_done)

    async def _resolve(self, name: str, removed: bool) -> None:
        if self._zc is None:
            return
        label = name[: -len(SERVICE_TYPE) - 1]
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        # After a goodbye the cache is empty, so this asks the network: a live peer answers.
        if not await info.async_request(self._zc.zeroconf, 1500 if removed else 3000):
            if removed:
                self._seq.pop(label, None)
                self.on_lost(label)
            else:
                log.debug("could not resolve %s", name)
            return
        try:
            ann = parse_announcement(info.properties or {}, name)
        except DiscoveryError as exc:
            self.rejected += 1
            log.warning("rejected mDNS announcement: %s", exc)
            return
        if ann.mesh != self.mesh:
            log.debug("ignoring %s of mesh %r", ann.peer_id[:12], ann.mesh)
            return
        if ann.seq < self._seq.get(ann.peer_id, -1):
            self.rejected += 1
            log.warning("rejected mDNS announcement of %s older than one seen", ann.peer_id[:12])
            return
        self._seq[ann.peer_id] = ann.seq
        self._seq.move_to_end(ann.peer_id)
        while len(self._seq) > 4 * MAX_TRACKED:
            self._seq.popitem(last=False)
        self.on_found(ann)
