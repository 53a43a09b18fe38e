"""A user-space packet delayer on an NFQUEUE, for the NAT lab (mesh/launch/natlab.py).

This machine's kernel has neither ``sch_netem`` nor ``sch_fq``, so a link's delay cannot be a
qdisc. Instead iptables hands every packet crossing a lab router to queue N (``-j NFQUEUE``),
and this process, run inside that router's namespace, gives each packet its ACCEPT verdict
``delay`` seconds after it arrived. The delay is constant, so packets keep their order.

It speaks nfnetlink_queue directly over a netlink socket (no libnetfilter_queue binding is
needed): bind the queue, ask for packet metadata only, read packet ids, answer verdicts.
Prints ``ready`` on stdout once the queue is bound; runs until killed.

    ip netns exec ROUTER python -m mesh.launch.nfqdelay --queue 0 --delay-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import signal
import socket
import struct
import sys

from mesh.errors import Error

__all__ = ["NfqDelay", "NfqError", "main"]

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
NETLINK_NO_ENOBUFS = 5
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # not in the socket module
SOL_NETLINK = 270
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NF_ACCEPT = 1
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 1, 4
_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid (host order)
_NFGEN = struct.Struct("!BBH")  # nfgenmsg: family, version, queue number (network order)


class NfqError(Error):
    """The queue could not be bound (not root, no nfnetlink_queue, queue taken)."""


def _attr(kind: int, payload: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def _attrs(data: bytes) -> dict[int, bytes]:
    """Netlink attributes (type -> payload) of one message body."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, pos)
        if length < 4 or pos + length > len(data):
            break
        out[kind & 0x3FFF] = data[pos + 4 : pos + length]
        pos += (length + 3) & ~3
    return out


class NfqDelay:
    """Queue ``queue``'s packets, each accepted ``delay`` seconds after it arrived."""

    def __init__(self, queue: int, delay: float, maxlen: int = 65536) -> None:
        self.queue = queue
        self.delay = delay
        self.maxlen = maxlen
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._seq = 0
        self.delayed = 0

    def _message(self, msg: int, family: int, body: bytes, flags: int = 0) -> bytes:
        self._seq += 1
        payload = _NFGEN.pack(family, 0, self.queue) + body
        kind = (NFNL_SUBSYS_QUEUE << 8) | msg
        return _HDR.pack(_HDR.size + len(payload), kind, NLM_F_REQUEST | flags, self._seq, 0) + (
            payload
        )

    def _request(self, body: bytes) -> None:
        """A config message, and the kernel's acknowledgement of it (NfqError if refused)."""
        self.sock.send(self._message(NFQNL_MSG_CONFIG, socket.AF_UNSPEC, body, NLM_F_ACK))
        reply = self.sock.recv(65536)
        _, kind, _, _, _ = _HDR.unpack_from(reply)
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", reply, _HDR.size)
            if code != 0:
                raise NfqError(f"queue {self.queue}: {errno.errorcode.get(-code, code)}")

    def bind(self) -> None:
        self.sock.bind((0, 0))
        # Bulk transfers queue thousands of packets: a full socket buffer would drop them.
        for opt in (SO_RCVBUFFORCE, SO_SNDBUFFORCE):
            self.sock.setsockopt(socket.SOL_SOCKET, opt, 32 << 20)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self._request(_attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, 0)))
        self._request(_attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)))
        self._request(_attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", self.maxlen)))
        self.sock.setblocking(False)

    def _verdict(self, packet_id: int) -> None:
        body = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))
        try:
            self.sock.send(self._message(NFQNL_MSG_VERDICT, socket.AF_UNSPEC, body))
        except BlockingIOError:  # the kernel drops it after its queue timeout: a lost packet
            log.warning("verdict for packet %d not sent", packet_id)

    def _readable(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ENOBUFS: the kernel dropped messages; carry on
                log.warning("nfqueue read: %s", exc)
                return
            due = loop.time() + self.delay
            pos = 0
            while pos + _HDR.size <= len(data):
                length, kind, _, _, _ = _HDR.unpack_from(data, pos)
                if length < _HDR.size:
                    break
                if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    body = data[pos + _HDR.size + _NFGEN.size : pos + length]
                    hdr = _attrs(body).get(NFQA_PACKET_HDR)
                    if hdr is not None and len(hdr) >= 4:
                        (packet_id,) = struct.unpack_from("!I", hdr)
                        loop.call_at(due, self._verdict, packet_id)
                        self.delayed += 1
                pos += (length + 3) & ~3

    async def run(self, ready: asyncio.Event | None = None) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.sock.fileno(), self._readable, loop)
        if ready is not None:
            ready.set()
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            loop.remove_reader(self.sock.fileno())
            self.sock.close()


async def _amain(queue: int, delay: float) -> None:
    delayer = NfqDelay(queue, delay)
    delayer.bind()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = loop.create_task(delayer.run())
    print("ready", flush=True)
    await stop.wait()
    task.cancel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mesh.launch.nfqdelay", description=__doc__)
    p.add_argument("--queue", type=int, required=True, help="NFQUEUE number to serve")
    p.add_argument("--delay-ms", type=float, required=True, help="delay of every packet")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    try:
        asyncio.run(_amain(args.queue, args.delay_ms / 1000))
    except NfqError as exc:
        print(f"nfqdelay: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
