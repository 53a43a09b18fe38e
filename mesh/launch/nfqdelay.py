"""A user-space packet delayer on an NFQUEUE, for the NAT lab (mesh/launch/natlab.py).

This machine's kernel has neither ``sch_netem`` nor ``sch_fq``, so a link's delay cannot be a
qdisc. Instead iptables hands every packet crossing a lab router to queue N (``-j NFQUEUE``),
and this process, run inside that router's namespace, gives each packet its ACCEPT verdict
``delay`` seconds after it arrived. The delay is constant, so packets keep their order. One
thread reads and stamps packets, another sleeps to each verdict's time (to the microsecond,
where event-loop timers would be up to a millisecond late). Both run at a real-time priority
where the kernel allows it: a lab router shares the CPU with the lab's nodes, and a node
computing on every core would otherwise hold each packet a millisecond or more past its time
(a real router has its own CPU).

It speaks nfnetlink_queue directly over a netlink socket (no libnetfilter_queue binding is
needed): bind the queue, ask for packet metadata only, read packet ids, answer verdicts.
Prints ``ready`` on stdout once the queue is bound; runs until killed.

    ip netns exec ROUTER python -m mesh.launch.nfqdelay --queue 0 --delay-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import errno
import logging
import os
import queue
import signal
import socket
import struct
import sys
import threading
import time

from mesh.errors import Error

__all__ = ["NfqDelay", "NfqError", "main"]

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
PR_SET_TIMERSLACK = 29
RT_PRIORITY = 50  # SCHED_FIFO: ahead of every ordinary process (the nodes, their threads)
_MAX_EARLY = 200e-6  # a sleep is cut short by at most this; the rest is a short spin
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


def _fine_timer_slack() -> None:
    """Wake this thread's sleeps 1 ns after their time, not Linux's default 50 us slack."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the default slack, a little later
        pass


def realtime_priority() -> bool:
    """Run this process's threads (and those it starts) before every ordinary process:
    SCHED_FIFO. False where the kernel refuses (no CAP_SYS_NICE) or has no such policy.
    Linux's real-time throttling (95 % of each second by default) keeps a runaway from
    freezing the machine; the threads sleep or block between packets."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(RT_PRIORITY))
    except (OSError, AttributeError) as exc:
        log.info("nfqdelay: no real-time priority (%s); delays will stretch under load", exc)
        return False
    return True


class NfqDelay:
    """Queue ``queue``'s packets, each accepted ``delay`` seconds after it arrived."""

    def __init__(self, queue: int, delay: float, maxlen: int = 65536) -> None:
        self.queue = queue
        self.delay = delay
        self.maxlen = maxlen
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._seq = 0
        self._stop = threading.Event()
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

    def _verdict(self, packet_id: int) -> None:
        body = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))
        try:
            self.sock.send(self._message(NFQNL_MSG_VERDICT, socket.AF_UNSPEC, body))
        except OSError as exc:  # the kernel drops it after its queue timeout: a lost packet
            log.warning("verdict for packet %d not sent: %s", packet_id, exc)

    @staticmethod
    def _packet_ids(data: bytes) -> list[int]:
        """The packet ids of the queue messages in one netlink read."""
        ids = []
        pos = 0
        while pos + _HDR.size <= len(data):
            length, kind, _, _, _ = _HDR.unpack_from(data, pos)
            if length < _HDR.size:
                break
            if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                body = data[pos + _HDR.size + _NFGEN.size : pos + length]
                hdr = _attrs(body).get(NFQA_PACKET_HDR)
                if hdr is not None and len(hdr) >= 4:
                    ids.append(struct.unpack_from("!I", hdr)[0])
            pos += (length + 3) & ~3
        return ids

    def _read(self, due: queue.SimpleQueue[tuple[float, int] | None]) -> None:
        """Thread: stamp each packet as it arrives (its verdict is due ``delay`` later)."""
        while not self._stop.is_set():
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError as exc:  # ENOBUFS: the kernel dropped messages; carry on
                if self._stop.is_set() or exc.errno == errno.EBADF:
                    break
                log.warning("nfqueue read: %s", exc)
                continue
            at = time.monotonic() + self.delay
            for packet_id in self._packet_ids(data):
                due.put((at, packet_id))
                self.delayed += 1
        due.put(None)

    def _release(self, due: queue.SimpleQueue[tuple[float, int] | None]) -> None:
        """Thread: each verdict at its time. The delay is constant, so arrival order is due
        order. ``time.sleep`` waits to the microsecond; the event loop's timers round up to
        the next millisecond (every packet ~0.5 ms late, twice per lab crossing)."""
        _fine_timer_slack()
        late = 0.0  # how late a sleep wakes (moving average, capped): we sleep that much less
        while (item := due.get()) is not None:
            at, packet_id = item
            wait = at - time.monotonic()
            if wait > late:
                time.sleep(wait - late)
                woke = time.monotonic()
                late = min(_MAX_EARLY, max(0.0, 0.9 * late + 0.1 * (woke - at + late)))
                while woke < at:  # woken early: never release a packet before its time
                    woke = time.monotonic()
            self._verdict(packet_id)

    async def run(self, ready: asyncio.Event | None = None) -> None:
        self.sock.settimeout(0.2)  # the reader's period of looking at the stop flag
        due: queue.SimpleQueue[tuple[float, int] | None] = queue.SimpleQueue()
        threads = [
            threading.Thread(target=self._read, args=(due,), name="nfq-read", daemon=True),
            threading.Thread(target=self._release, args=(due,), name="nfq-verdict", daemon=True),
        ]
        for t in threads:
            t.start()
        if ready is not None:
            ready.set()
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            self._stop.set()
            for t in threads:
                await asyncio.to_thread(t.join, 5)
            self.sock.close()


async def _amain(queue: int, delay: float) -> None:
    delayer = NfqDelay(queue, delay)
    delayer.bind()
    realtime_priority()  # before the threads start: they inherit it
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
