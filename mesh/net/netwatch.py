"""Whether this node's network works again: STUN binding requests to its ICE servers.

A home whose uplink drops for seconds (a router reboot, a laptop between networks) still
dials: its offers are gathered without the server-reflexive (or relay) candidates the STUN
and TURN servers would give, and they wait out the signaling timeouts (10 s) into the void.
Measured in the NAT lab (tests/test_natlab_drop.py): after a 10 s outage the links came back
19.5 s after the network did, the dials in flight having been sent while it was down.

:class:`NetWatch` tells a dial whose gathering came up short when the servers, silent at
first, answer again, so the dial is dropped and a fresh one (fresh candidates) goes at once.
One UDP STUN binding request per server per period while such a dial waits: no state on the
server, a few dozen bytes. Servers that answer the first probe mean no outage (a public host's
gathering also comes up short): nothing is dropped.
TCP-only TURN servers are not probed (a probe needs UDP); without a UDP server nothing is
watched and dials run their course.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable
from typing import Any, TypeVar

from mesh.errors import SignalingError
from mesh.net.ice import IceConfigError, IceServer, parse_url

__all__ = ["NetWatch", "NetworkBack", "stun_answers"]
T = TypeVar("T")

log = logging.getLogger(__name__)

BINDING_REQUEST = 0x0001
MAGIC_COOKIE = 0x2112A442


def _binding_request() -> tuple[bytes, bytes]:
    """A STUN binding request (RFC 5389, no attributes) and its transaction id."""
    tid = os.urandom(12)
    return BINDING_REQUEST.to_bytes(2, "big") + b"\0\0" + MAGIC_COOKIE.to_bytes(4, "big") + tid, tid


class NetworkBack(SignalingError):
    """The servers answer again: work begun while offline was dropped, to be redone."""


class _Probe(asyncio.DatagramProtocol):
    def __init__(self, tid: bytes) -> None:
        self.tid = tid
        self.answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # any response (success or error) to our transaction: the server is reachable
        if len(data) >= 20 and data[8:20] == self.tid and not self.answered.done():
            self.answered.set_result(None)

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable etc.: no answer
        pass


async def stun_answers(host: str, port: int, timeout: float) -> bool:
    """Whether the STUN server at ``host:port`` (UDP) answers a binding request within
    ``timeout`` (resolving a host name included)."""
    loop = asyncio.get_running_loop()
    request, tid = _binding_request()
    transport: asyncio.DatagramTransport | None = None
    try:
        async with asyncio.timeout(timeout):
            transport, probe = await loop.create_datagram_endpoint(
                lambda: _Probe(tid), remote_addr=(host, port), family=socket.AF_INET
            )
            transport.sendto(request)
            await probe.answered
            return True
    except (TimeoutError, OSError):  # no answer, no route, no address: not online
        return False
    finally:
        if transport is not None:
            transport.close()


class NetWatch:
    """Probes the UDP STUN/TURN servers of a node's ICE config."""

    def __init__(self, servers: tuple[IceServer, ...], period: float = 0.5) -> None:
        self.period = period
        self.targets: list[tuple[str, int]] = []
        for server in servers:
            try:
                parsed = parse_url(server.url)
            except IceConfigError:
                continue
            if parsed.get("transport") in (None, "udp") and parsed["scheme"] in ("stun", "turn"):
                self.targets.append((str(parsed["host"]), int(parsed["port"])))

    @property
    def usable(self) -> bool:
        return bool(self.targets)

    async def _answered(self) -> bool:
        return any(
            await asyncio.gather(*(stun_answers(h, p, self.period) for h, p in self.targets))
        )

    async def back_online(self) -> None:
        """Return once a server answers after one did not (the network came back); wait
        forever if the first probe answers: online all along, a short gathering has
        another cause (a public host: libwebrtc drops a srflx equal to its host candidate
        and may not report gathering complete in time) and must not abort anything."""
        if not self.targets or await self._answered():
            await asyncio.Event().wait()  # the caller's other wait decides
        while not await self._answered():
            pass  # each probe waits up to a period for its answer

    def watch(self) -> asyncio.Future[None]:
        """:meth:`back_online` as a running task: started with a dial's gathering, it has
        seen the outage by the time a short offer is ready (cancel it when done with it)."""
        return asyncio.ensure_future(self.back_online())

    async def unless_online(self, work: Awaitable[T], watch: asyncio.Future[None]) -> T:
        """``work``'s result, unless ``watch`` (:meth:`watch`) sees the network come back
        first: then ``work`` is cancelled and NetworkBack raised."""
        task = asyncio.ensure_future(work)
        both: list[asyncio.Future[Any]] = [task, watch]
        await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise NetworkBack("the network is back")
        return task.result()
