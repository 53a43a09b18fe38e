"""STUN binding probes from inside a NAT lab host (mesh/launch/natlab.py): the round trip to
the lab's coturn through the host's router, and the address the server saw (the mapping)."""

from __future__ import annotations

import asyncio
import socket
import time

from aioice import stun

from mesh.launch.natlab import WAN_IP, Host, in_netns

__all__ = ["STUN_PORT", "stun_bindings"]

STUN_PORT = 3478


async def stun_bindings(
    host: Host, count: int, timeout: float = 1.0, gap: float = 0.0
) -> list[tuple[float, str]]:
    """``count`` bindings to the lab's coturn from ``host``, one at a time, ``gap`` s apart:
    (round trip in s, mapped "ip:port") of each answered within ``timeout``."""
    sock = in_netns(host.ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    out = []
    try:
        for _ in range(count):
            req = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
            t0 = time.perf_counter()
            await loop.sock_sendto(sock, bytes(req), (WAN_IP, STUN_PORT))
            try:
                async with asyncio.timeout(timeout):
                    while True:
                        reply = stun.parse_message(await loop.sock_recv(sock, 2048))
                        if reply.transaction_id == req.transaction_id:
                            break
            except TimeoutError:
                continue
            mapped = reply.attributes["XOR-MAPPED-ADDRESS"]
            out.append((time.perf_counter() - t0, f"{mapped[0]}:{mapped[1]}"))
            if gap:
                await asyncio.sleep(gap)
    finally:
        sock.close()
    return out
