import asyncio
import os

import pytest

from mesh.errors import DeadlineExceeded, PeerUnavailable, RemoteError, TooManyRequests
from mesh.rpc import Link, LinkParams, Reply, handlers_of

from .memchannel import pair, until


class Service:
    def __init__(self):
        self.started = 0
        self.cancelled = 0
        self.release = asyncio.Event()

    async def rpc_echo(self, ctx, params, payload):
        return Reply({"n": len(payload), "p": params}, payload)

    async def rpc_block(self, ctx, params, payload):
        self.started += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return {}

    async def rpc_boom(self, ctx, params, payload):
        raise ValueError("kaput")


def make_links(params=None):
    ca, cb = pair()
    sa, sb = Service(), Service()
    la = Link(ca, "b" * 32, b"", handlers_of(sa), params)
    lb = Link(cb, "a" * 32, b"", handlers_of(sb), params)
    ca.link, cb.link = la, lb
    return la, lb, sa, sb, ca, cb


async def test_echo_small_and_large():
    la, lb, *_ = make_links()
    r = await la.call("echo", {"k": 1}, b"x" * 10)
    assert r.result == {"n": 10, "p": {"k": 1}} and r.payload == b"x" * 10
    big = bytes(range(256)) * 20000
    r = await la.call("echo", {}, big)
    assert r.payload == big


async def test_unknown_method_and_handler_error():
    la, *_ = make_links()
    with pytest.raises(RemoteError, match="NotFound"):
        await la.call("nope")
    with pytest.raises(RemoteError, match="kaput") as info:
        await la.call("boom")
    assert info.value.code == "InternalError"


async def test_deadline_travels_and_cancels_remote_handler():
    la, lb, sa, sb, *_ = make_links()
    with pytest.raises(DeadlineExceeded):
        await la.call("block", timeout=0.2)
    # the caller's cancel (or the propagated deadline) stops the remote handler
    await until(lambda: not (lb.inflight_in))
    assert sb.cancelled == 1


async def test_caller_cancellation_cancels_remote():
    la, lb, sa, sb, *_ = make_links()
    task = asyncio.ensure_future(la.call("block", timeout=30))
    await until(lambda: not (sb.started == 0))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: not (lb.inflight_in))
    assert sb.cancelled == 1


async def test_inbound_inflight_cap_refuses_excess():
    params = LinkParams(max_inflight_in=3, max_inflight_out=10)
    la, lb, sa, sb, *_ = make_links(params)
    calls = [asyncio.ensure_future(la.call("block", timeout=10)) for _ in range(5)]
    done, _ = await asyncio.wait(calls, timeout=5, return_when=asyncio.FIRST_EXCEPTION)
    errors = [t.exception() for t in done]
    assert len(errors) == 2 and all(isinstance(e, TooManyRequests) for e in errors)
    assert lb.inflight_in == 3
    sb.release.set()
    results = await asyncio.gather(*[c for c in calls if c not in done])
    assert len(results) == 3


async def test_outbound_cap_queues_calls():
    params = LinkParams(max_inflight_in=64, max_inflight_out=2)
    la, lb, sa, sb, *_ = make_links(params)
    calls = [asyncio.ensure_future(la.call("block", timeout=10)) for _ in range(5)]
    await until(lambda: not (sb.started < 2))
    await asyncio.sleep(0.05)  # give a wrongly uncapped caller time to overshoot
    assert sb.started == 2 and lb.inflight_in == 2
    sb.release.set()
    await asyncio.gather(*calls)
    assert sb.started == 5


async def test_backpressure_waits_for_buffer_to_drain():
    params = LinkParams(high_water=100_000, low_water=10_000)
    la, lb, sa, sb, ca, cb = make_links(params)
    ca.paused = True
    task = asyncio.ensure_future(la.call("echo", {}, os.urandom(1_024_000), timeout=10))
    await until(lambda: not (ca.bufferedAmount <= params.high_water and not task.done()))
    frames_when_full = ca.sent_frames
    await asyncio.sleep(0.05)
    assert ca.sent_frames == frames_when_full, "kept sending above the high-water mark"
    assert not task.done()
    ca.paused = False
    ca.flush()
    r = await task
    assert len(r.payload) == 1_024_000


async def test_close_fails_pending_calls():
    la, lb, *_ = make_links()
    task = asyncio.ensure_future(la.call("block", timeout=10))
    await asyncio.sleep(0.01)
    la.close("test")
    with pytest.raises(PeerUnavailable):
        await task
    with pytest.raises(PeerUnavailable):
        await la.call("echo")


async def test_protocol_violation_closes_link():
    la, lb, *_ = make_links()
    lb.feed(b"garbage that is not a frame")
    assert not lb.is_open and "protocol error" in lb.close_reason


async def test_silent_peer_is_closed():
    params = LinkParams(ping_interval=0.05, dead_after=0.2)
    la, lb, sa, sb, ca, cb = make_links(params)
    cb.paused = True  # b never answers
    la.start()
    await asyncio.wait_for(la.closed.wait(), 3)
    assert "silent" in la.close_reason


async def test_ping_measures_rtt():
    params = LinkParams(ping_interval=0.02, dead_after=1.0)
    la, lb, *_ = make_links(params)
    la.start()
    await until(lambda: la.rtt_ms is not None)
    assert la.rtt_ms >= 0
    la.close()
