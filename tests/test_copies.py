"""Copies of small frames on the spare channel (mesh.net.copies): the resequencer's order and
bounds, and real connections with each engine pair where the main channel stalls (as SCTP does
waiting to retransmit a lost packet) while the copies carry the link on."""

import asyncio
import dataclasses
import random
import struct

import pytest

from mesh.launch.localmesh import wait_for
from mesh.net import copies
from mesh.net.copies import COPY_MAX, MAX_AHEAD, STALL_HOLD, WINDOW, CopySender, Resequencer
from mesh.net.identity import Identity
from mesh.net.rpc import LinkParams, Reply
from mesh.net.stalls import RttFloor, StallWatch
from mesh.net.transport import TransportConfig, accept_offer, complete_offer, open_offer
from tests.test_transport import CFG, PAIRS


def numbered(seq: int, frame: bytes) -> bytes:
    return struct.pack(">Q", seq) + frame


def test_frames_come_out_once_and_in_order_whichever_channel_is_first():
    got: list[bytes] = []
    r = Resequencer()
    r.attach(got.append)
    r.main(b"1")
    r.copy(numbered(1, b"1"))  # late copy: dropped
    r.copy(numbered(3, b"3"))  # ahead of a missing frame: waits
    assert got == [b"1"] and r.waiting == 1
    r.copy(numbered(2, b"2"))  # the missing one: both go
    assert got == [b"1", b"2", b"3"] and r.copies_used == 2
    r.main(b"2")
    r.main(b"3")  # the main channel catching up brings nothing twice
    r.main(b"4")
    assert got == [b"1", b"2", b"3", b"4"] and r.waiting == 0


def test_copies_before_the_link_wait_for_it():
    got: list[bytes] = []
    r = Resequencer()
    r.copy(numbered(1, b"a"))
    r.copy(numbered(2, b"b"))
    assert got == []
    r.attach(got.append)
    assert got == [b"a", b"b"]
    r.main(b"a")
    r.main(b"b")
    r.main(b"c")
    assert got == [b"a", b"b", b"c"]


def test_what_a_peer_can_make_the_resequencer_hold_is_bounded():
    r = Resequencer()
    r.attach(lambda frame: None)
    r.copy(b"\x00" * 8)  # no frame after the number
    r.copy(numbered(WINDOW + 5, b"far"))  # far past anything in flight
    r.copy(numbered(2, b"x" * (COPY_MAX + 1)))  # bigger than any frame a sender copies
    assert r.copies_dropped == 3 and r.waiting == 0
    for seq in range(2, 2 + MAX_AHEAD + 10):  # frame 1 never comes: the rest wait, up to a cap
        r.copy(numbered(seq, b"x" * 100))
    assert r.waiting == MAX_AHEAD and r.copies_dropped == 13


class Sink:
    label = "edgemesh"
    readyState = "open"
    bufferedAmount = 0
    burst = None

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def close(self) -> None:
        pass


def test_copy_sender_modes():
    with pytest.raises(ValueError):
        CopySender(Sink(), Sink(), "sometimes")  # type: ignore[arg-type]
    lan = CopySender(Sink(), Sink(), "auto", lambda: {"local": "host", "remote": "prflx"})
    wan = CopySender(Sink(), Sink(), "auto", lambda: {"local": "srflx", "remote": "host"})
    off = CopySender(Sink(), Sink(), "off", lambda: {"local": "relay", "remote": "relay"})
    assert not lan.active and wan.active and not off.active
    assert CopySender(Sink(), None, "on").active is False  # no spare channel: nothing to copy on


def test_auto_copies_turn_on_after_a_stall_for_a_while(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(copies.time, "monotonic", lambda: clock[0])
    host = lambda: {"local": "host", "remote": "host", "same_host": False}  # noqa: E731
    lan, on, off = (CopySender(Sink(), Sink(), m, host) for m in ("auto", "on", "off"))
    loop = CopySender(Sink(), Sink(), "auto", lambda: {"local": "host", "same_host": True})
    loop.stalled(450.0)
    assert not loop.active  # a loopback path: a slow ping is a busy machine, not a loss
    assert not lan.active and lan.reason is None
    for s in (lan, on, off):
        s.stalled(450.0)
    assert lan.active and lan.reason == "stall"
    assert on.active and on.reason == "on" and not off.active  # explicit modes keep theirs
    clock[0] += STALL_HOLD - 1
    assert lan.active  # still within the hold
    lan.stalled(300.0)  # a second stall re-arms it
    clock[0] += STALL_HOLD - 1
    assert lan.active
    clock[0] += 2
    assert not lan.active and lan.reason is None


def test_a_ping_far_slower_than_the_links_fastest_is_a_stall():
    seen: list[float] = []
    watch = StallWatch(stall_ms=200, factor=4, window=120)
    watch.on_stall = seen.append
    t = [0.0]

    def pong(sample: float, quiet: bool = True, peer_lag: int = 0) -> None:
        t[0] += 1.0  # a ping a second; each pong settles the slow one before it
        watch.pong(t[0], sample, quiet, peer_lag)

    for sample in (300.0, 60.0, 230.0, 239.0, 250.0, 61.0):  # the first sets the floor
        pong(sample)
    assert seen == [250.0] and watch.stalls == 1 and watch.floor.value == 60.0
    pong(199.0)  # 4 x 60 ms but under 200 ms: a slow path, not a stall
    pong(900.0, quiet=False)  # a megabyte moved meanwhile: behind it, not lost
    pong(900.0)
    watch.woke(t[0] + 0.5, 0.4)  # our own loop woke late while the ping was out
    pong(61.0)
    pong(900.0)
    pong(61.0, peer_lag=400)  # the peer's loop says it was 400 ms late meanwhile
    assert watch.stalls == 1 and seen == [250.0]
    pong(900.0)
    pong(61.0, peer_lag=20)
    assert watch.stalls == 2 and seen == [250.0, 900.0]


def test_the_lateness_a_pong_reports_covers_the_last_seconds():
    watch = StallWatch(stall_ms=200, factor=4, window=120)
    assert watch.recent_lag_ms(0.0) == 0
    watch.woke(10.0, 0.3)
    watch.woke(11.0, 0.002)
    assert watch.recent_lag_ms(11.5) == 300
    assert watch.recent_lag_ms(13.5) == 2  # the late wake-up is over 3 s old
    for at in range(20, 40):
        watch.woke(float(at), 0.001)
    assert len(watch._wakes) <= 4  # bounded however long the link lives


def test_a_path_that_got_slower_for_good_stops_looking_stalled():
    """The link's fastest ping is that of the last window: after a move to a slower path
    (LAN to a far relay) its pings are stalls only until the old samples age out, not for
    the rest of the link's life."""
    watch = StallWatch(stall_ms=200, factor=4, window=30)
    for at in range(1, 11):  # ten seconds on a 2 ms path
        watch.pong(float(at), 2.0, True, 0)
    assert watch.floor.value == 2.0
    for at in range(11, 80):  # then a 260 ms path, for good
        watch.pong(float(at), 260.0, True, 0)
    assert watch.floor.value == 260.0
    assert 15 <= watch.stalls <= 31  # flagged while the 2 ms samples were in the window only
    assert len(watch.floor) <= 31  # the window holds no more than its samples


def test_the_rtt_floor_is_a_sliding_minimum():
    rng = random.Random(5)
    floor, seen = RttFloor(window=10.0, cap=1024), []
    for at in range(500):
        sample = rng.uniform(1, 100)
        seen.append((float(at), sample))
        floor.add(float(at), sample)
        assert floor.value == min(s for t, s in seen if t >= at - 10.0)
    tiny = RttFloor(window=1e9, cap=8)
    for at in range(100):  # rising samples: each one could become the minimum later
        tiny.add(float(at), float(at))
    assert len(tiny) == 8 and tiny.value == 92.0  # the cap drops the oldest first


class Stalled:
    """A main channel whose frames from the n-th on are held back, in order, until release:
    what SCTP's ordered delivery does while it waits to retransmit a lost packet."""

    def __init__(self, inner, after: int) -> None:
        self._inner = inner
        self._after = after
        self._count = 0
        self.held: list[bytes] = []
        self.label = inner.label

    @property
    def bufferedAmount(self) -> int:  # noqa: N802
        return self._inner.bufferedAmount

    @property
    def readyState(self) -> str:  # noqa: N802
        return self._inner.readyState

    def send(self, data: bytes) -> None:
        self._count += 1
        if self._count >= self._after and self.held is not None:
            self.held.append(data)
        else:
            self._inner.send(data)

    def release(self) -> None:
        held, self.held = self.held, None
        for frame in held:
            self._inner.send(frame)

    def close(self) -> None:
        self._inner.close()


async def echo(ctx, params, payload):
    return Reply({"n": len(payload)}, payload)


@pytest.mark.parametrize("engines", PAIRS)
async def test_a_stalled_main_channel_is_carried_by_the_copies(engines):
    a, b = Identity.generate(), Identity.generate()
    ca = dataclasses.replace(CFG, engine=engines[0], copies="on")
    cb = dataclasses.replace(CFG, engine=engines[1], copies="on")
    pa, offer = await open_offer(a, ca, b.peer_id)
    pb, answer = await accept_offer(b, cb, offer, a.peer_id)
    await complete_offer(pa, answer)
    la, lb = await asyncio.gather(pa.establish({"echo": echo}), pb.establish({"echo": echo}))
    sender, _ = la.copies
    stalled = Stalled(sender._main, after=1)
    sender._main = stalled
    for i in range(20):  # small calls, each while every frame since sits behind the "loss"
        reply = await asyncio.wait_for(la.call("echo", {}, bytes([i]) * 2000), 10)
        assert reply.payload == bytes([i]) * 2000
    assert len(stalled.held) >= 20  # none of them came by the main channel
    _, received = lb.copies
    assert received.copies_used >= 20
    stalled.release()  # the "retransmission": every frame again, dropped as seen
    for _ in range(5):
        reply = await asyncio.wait_for(la.call("echo", {}, b"z" * 70_000), 10)  # too big to copy
        assert reply.payload == b"z" * 70_000
    assert received.waiting == 0
    la.close("done")
    await asyncio.wait_for(lb.closed.wait(), 10)


@pytest.mark.parametrize("engines", PAIRS)
async def test_a_host_link_that_stalls_turns_its_copies_on(engines):
    """auto mode on a host pair (loopback, read as a LAN's): no copies until it stalls once; from
    then on a stall of the main channel is carried by the copies."""
    fast = LinkParams(ping_interval=0.05, dead_after=5.0)
    a, b = Identity.generate(), Identity.generate()
    ca = dataclasses.replace(CFG, engine=engines[0], copies="auto", link=fast)
    cb = dataclasses.replace(CFG, engine=engines[1], copies="auto", link=fast)
    pa, offer = await open_offer(a, ca, b.peer_id)
    pb, answer = await accept_offer(b, cb, offer, a.peer_id)
    await complete_offer(pa, answer)
    la, lb = await asyncio.gather(pa.establish({"echo": echo}), pb.establish({"echo": echo}))
    sender, _ = la.copies
    assert sender._path()["same_host"] is True  # which never turns copies on by a stall ...
    sender._path = lambda: {"local": "host", "remote": "host", "same_host": False}  # a LAN
    await wait_for(lambda: la.rtt_min_ms, 10, "a first RTT sample")
    await la.call("echo", {}, b"x" * 2000)
    assert not sender.active and sender.copies_sent == 0  # a host pair: auto keeps them off
    main = sender._main
    held = Stalled(main, after=1)
    sender._main = held
    await asyncio.sleep(0.4)  # the outage itself (every frame held, pings included), not a wait
    held.release()
    sender._main = main
    await wait_for(lambda: la.stalls or None, 10, "the held ping's pong")
    assert sender.active and sender.reason == "stall"
    stalled = Stalled(main, after=1)
    sender._main = stalled
    for i in range(10):
        reply = await asyncio.wait_for(la.call("echo", {}, bytes([i]) * 2000), 10)
        assert reply.payload == bytes([i]) * 2000
    _, received = lb.copies
    assert received.copies_used >= 10
    stalled.release()
    la.close("done")
    await asyncio.wait_for(lb.closed.wait(), 10)


class Counting:
    """A main channel that counts what it is given."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.sizes: list[int] = []
        self.label = inner.label

    @property
    def bufferedAmount(self) -> int:  # noqa: N802
        return self._inner.bufferedAmount

    @property
    def readyState(self) -> str:  # noqa: N802
        return self._inner.readyState

    def send(self, data: bytes) -> None:
        self.sizes.append(len(data))
        self._inner.send(data)

    def close(self) -> None:
        self._inner.close()


@pytest.mark.parametrize("engines", PAIRS)
async def test_a_long_path_carries_bursts_and_copies_only_small_messages(engines):
    """Real connections, loopback read as a long path: with libwebrtc a prompt goes as frames
    of one burst each (and is not copied), a decode step as one frame and its copy."""
    long = LinkParams(ping_interval=0.05, dead_after=5.0, long_path_ms=0.0)
    a, b = Identity.generate(), Identity.generate()
    ca = dataclasses.replace(CFG, engine=engines[0], copies="on", link=long)
    cb = dataclasses.replace(CFG, engine=engines[1], copies="on", link=long)
    pa, offer = await open_offer(a, ca, b.peer_id)
    pb, answer = await accept_offer(b, cb, offer, a.peer_id)
    await complete_offer(pa, answer)
    la, lb = await asyncio.gather(pa.establish({"echo": echo}), pb.establish({"echo": echo}))
    await wait_for(lambda: la.stall_watch.path.value is not None, 10, "a quiet ping")
    sender, _ = la.copies
    counting, spare = Counting(sender._main), Counting(sender._spare)
    sender._main, sender._spare = counting, spare
    prompt = random.randbytes(84_000)
    reply = await asyncio.wait_for(la.call("echo", {}, prompt), 10)
    assert reply.payload == prompt
    sizes = [n for n in counting.sizes if n > 100]  # not the pings and pongs
    burst = sender.burst
    if engines[0] == "aiortc":  # it sends all its window allows: frames of the cap
        assert burst is None and len(sizes) == 2
    else:
        assert len(sizes) >= len(prompt) // burst + 1 and max(sizes) <= burst
    step = random.randbytes(2000)  # (random: lz4 leaves it as it is)
    reply = await asyncio.wait_for(la.call("echo", {}, step), 10)
    assert reply.payload == step
    # The step's copy leaves after any a prompt's frame could have had.
    await wait_for(lambda: any(n > 2000 for n in spare.sizes) or None, 10, "the step's copy")
    assert [n for n in spare.sizes if n > 100] == [max(spare.sizes)] and max(spare.sizes) < 2100
    la.close("done")
    await asyncio.wait_for(lb.closed.wait(), 10)


def test_the_copies_mode_is_checked_with_the_config():
    from mesh.errors import TransportError

    with pytest.raises(TransportError):
        TransportConfig(copies="maybe")


def test_a_link_that_broke_the_protocol_costs_a_doubling_penalty():
    from mesh.net.peers import PENALTY_BASE, PENALTY_MAX, PeerEntry

    e = PeerEntry("p" * 32)
    e.link_closed("peer said bye: stopping", grace=0.25)
    assert e.shunned == 0 and e.protocol_errors == 0
    waits = []
    for _ in range(10):
        e.link_closed("protocol error: bad magic", grace=0.25)
        waits.append(e.shunned)
        assert e.next_attempt >= e.shunned_until  # no dial of ours before it either
    assert PENALTY_BASE - 1 < waits[0] <= PENALTY_BASE
    assert 2 * PENALTY_BASE - 1 < waits[1] <= 2 * PENALTY_BASE
    assert PENALTY_MAX - 1 < waits[-1] <= PENALTY_MAX and e.protocol_errors == 10
