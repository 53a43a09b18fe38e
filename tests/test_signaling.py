import asyncio
import logging
import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import SignalingError
from mesh.net.identity import Identity
from mesh.net.signaling import (
    MAX_ENVELOPE,
    ReplayGuard,
    open_envelope,
    parse_endpoint,
    parse_envelope,
    seal,
)

A, B = Identity.generate(), Identity.generate()


def test_roundtrip():
    raw = seal(A, "offer", B.peer_id, {"sdp": "v=0"})
    env = open_envelope(raw, me=B.peer_id, kind="offer", guard=ReplayGuard())
    assert env.sender == A.peer_id and env.body == {"sdp": "v=0"}


@pytest.mark.badinput
def test_replay_refused():
    guard = ReplayGuard()
    raw = seal(A, "offer", B.peer_id, {"sdp": "v=0"})
    open_envelope(raw, me=B.peer_id, kind="offer", guard=guard)
    with pytest.raises(SignalingError, match="replayed"):
        open_envelope(raw, me=B.peer_id, kind="offer", guard=guard)


@pytest.mark.badinput
def test_stale_refused():
    raw = seal(A, "offer", B.peer_id, {"sdp": "v=0"}, now=time.time() - 3600)
    with pytest.raises(SignalingError, match="stale"):
        open_envelope(raw, me=B.peer_id, kind="offer", guard=ReplayGuard())


def test_misaddressed_and_wrong_kind():
    raw = seal(A, "offer", A.peer_id, {"sdp": "v=0"})
    with pytest.raises(SignalingError, match="addressed"):
        open_envelope(raw, me=B.peer_id, kind="offer", guard=ReplayGuard())
    raw = seal(A, "answer", B.peer_id, {"sdp": "v=0"})
    with pytest.raises(SignalingError, match="expected a offer"):
        open_envelope(raw, me=B.peer_id, kind="offer", guard=ReplayGuard())


def test_altered_sdp_fails_signature():
    fields = msgpack.unpackb(seal(A, "offer", B.peer_id, {"sdp": "a=fingerprint:sha-256 AA"}))
    fields[7]["sdp"] = "a=fingerprint:sha-256 BB"
    with pytest.raises(SignalingError, match="bad signature"):
        parse_envelope(msgpack.packb(fields))


def test_resigned_with_other_key_claiming_sender_fails():
    fields = msgpack.unpackb(seal(B, "offer", B.peer_id, {"sdp": "x"}))
    fields[2] = A.peer_id  # claims to be A but carries B's key
    with pytest.raises(SignalingError, match="not the hash of its key"):
        parse_envelope(msgpack.packb(fields))


def test_oversized_refused():
    with pytest.raises(SignalingError, match="exceeds"):
        parse_envelope(b"\x00" * (MAX_ENVELOPE + 1))


def test_replay_guard_is_bounded_and_fails_closed():
    guard = ReplayGuard(capacity=100)
    now = time.time()
    for _ in range(100):
        guard.check(parse_envelope(seal(A, "offer", B.peer_id, {}, now=now)), now)
    with pytest.raises(SignalingError, match="too many"):
        guard.check(parse_envelope(seal(A, "offer", B.peer_id, {}, now=now)), now)
    assert len(guard) == 100
    # two windows later the old nonces are gone and new messages pass again
    later = now + 2 * guard.window + 1
    guard.check(parse_envelope(seal(A, "offer", B.peer_id, {}, now=later)), later)
    assert len(guard) == 1


def test_nan_time_refused():
    fields = msgpack.unpackb(seal(A, "offer", B.peer_id, {}))
    fields[6] = float("nan")
    fields[8] = A.sign(b"edgemesh/signal/v1\x00" + msgpack.packb(fields[:8]))
    with pytest.raises(SignalingError, match="finite"):
        parse_envelope(msgpack.packb(fields))


@pytest.mark.parametrize(
    "text,ok",
    [
        ("127.0.0.1:80", True),
        ("[::1]:443", True),
        ("10.0.0.1:0", False),
        ("evil.example:80", False),
        ("1.2.3.4:80/path", False),
        ("1.2.3.4", False),
        ("1.2.3.4:\u00b2", False),  # a digit to str.isdigit(), not to int()
        (5, False),
    ],
)
def test_parse_endpoint(text, ok):
    assert (parse_endpoint(text) is not None) == ok


SCALARS = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.binary(max_size=40),
    st.text(max_size=10),
    st.floats(),
    st.dictionaries(st.text(max_size=3), st.integers(0, 9)),
)


@pytest.mark.badinput
@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=400), st.lists(SCALARS, max_size=10).map(msgpack.packb)))
def test_fuzz_parse_envelope(data):
    try:
        parse_envelope(data)
    except SignalingError:
        pass


async def test_a_late_broker_answer_to_an_offer_answered_by_another_route_is_dropped_quietly():
    """A dial sends its offer by every route: when the direct answer wins, the broker's copy
    of the answer arrives for an offer no longer waiting. That one is dropped without a
    refusal; an answer to an offer never sent is still refused."""
    from mesh.discovery.mqtt import MqttConfig, MqttSignaling

    me, peer = Identity.generate(), Identity.generate()

    async def no_offers(env):
        raise AssertionError("no offer is delivered here")

    mqtt = MqttSignaling(
        me,
        MqttConfig(url="mqtt://127.0.0.1:1", answer_timeout=0.05),
        on_offer=no_offers,
        on_presence=lambda pid, body: None,
        on_absence=lambda pid: None,
        presence_body=dict,
        guard=ReplayGuard(),
    )

    async def published(to, data):  # no broker: the offer "goes out" and nobody answers
        return None

    mqtt._publish = published
    with pytest.raises(SignalingError, match="no answer"):
        await mqtt.exchange(peer.peer_id, b"offer", b"oid-1")
    late = seal(peer, "answer", me.peer_id, {"sdp": "x", "re": b"oid-1"})
    mqtt._handle_inbox(late)  # no exception: quietly dropped
    stray = seal(peer, "answer", me.peer_id, {"sdp": "x", "re": b"oid-never"})
    with pytest.raises(SignalingError, match="no offer of ours"):
        mqtt._handle_inbox(stray)


def _mqtt(me, on_offer=None, answer_timeout=5.0):
    from mesh.discovery.mqtt import MqttConfig, MqttSignaling

    async def no_offers(env):
        raise AssertionError("no offer is delivered here")

    return MqttSignaling(
        me,
        MqttConfig(url="mqtt://127.0.0.1:1", answer_timeout=answer_timeout),
        on_offer=on_offer or no_offers,
        on_presence=lambda pid, body: None,
        on_absence=lambda pid: None,
        presence_body=dict,
        guard=ReplayGuard(),
    )


async def test_an_offer_goes_again_when_its_peer_comes_back_to_the_broker():
    """A peer away from the broker (a network outage) misses an offer published meanwhile:
    its new broker session's presence has the offer published again, not the dialer's 10 s
    timeout. The same session's periodic presence does not."""
    from mesh.launch.localmesh import wait_for

    me, peer = Identity.generate(), Identity.generate()
    mqtt = _mqtt(me)
    sent: list[tuple[str, bytes]] = []

    async def published(to, data):
        sent.append((to, data))

    mqtt._publish = published

    def presence(session: bytes) -> bytes:
        return seal(peer, "presence", "*", {"s": session})

    mqtt._handle_presence(peer.peer_id, presence(b"session-1"))
    dial = asyncio.ensure_future(mqtt.exchange(peer.peer_id, b"the offer", b"oid-1"))
    await wait_for(lambda: sent, 5, "the offer")
    mqtt._handle_presence(peer.peer_id, presence(b"session-1"))  # its periodic re-announce
    mqtt._handle_presence(peer.peer_id, presence(b"session-2"))  # back after an outage
    await wait_for(lambda: len(sent) >= 2 or None, 5, "the offer again")
    assert sent == [(peer.peer_id, b"the offer")] * 2
    mqtt._handle_inbox(seal(peer, "answer", me.peer_id, {"sdp": "x", "re": b"oid-1"}))
    assert parse_envelope(await asyncio.wait_for(dial, 5)).body["re"] == b"oid-1"


async def test_an_answer_the_broker_did_not_take_goes_on_the_next_connection():
    """The dialer's offer, republished after an outage, is a replay to us: the answer we
    could not send is kept, and sent on the next broker connection while it is awaited."""
    from mesh.launch.localmesh import wait_for

    me, peer = Identity.generate(), Identity.generate()

    async def answer(env):
        return b"our answer"

    mqtt = _mqtt(me, on_offer=answer)
    sent: list[tuple[str, bytes]] = []

    async def broken(to, data):
        raise SignalingError("not connected to the broker")

    async def published(to, data):
        sent.append((to, data))

    mqtt._publish = broken
    mqtt._handle_inbox(seal(peer, "offer", me.peer_id, {"sdp": "x"}))
    await wait_for(lambda: mqtt._unsent, 5, "the answer kept")
    # An offer 5.1 s old: its dialer (5 s timeout) no longer waits for our answer.
    mqtt._handle_inbox(seal(peer, "offer", me.peer_id, {"sdp": "y"}, now=time.time() - 5.1))
    await wait_for(lambda: len(mqtt._unsent) == 2 or None, 5, "both answers kept")
    mqtt._publish = published
    mqtt._on_connected()
    await wait_for(lambda: sent, 5, "the kept answer")
    assert sent == [(peer.peer_id, b"our answer")] and mqtt._unsent == []


def test_paho_reports_a_lost_broker_as_info_and_its_other_errors_as_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broker going away is expected (the reconnect loop warns itself); an exception in a
    callback is a bug and stays an error."""
    from mesh.discovery.mqtt import _paho_logger

    paho = _paho_logger()
    assert _paho_logger() is paho and len(paho.filters) == 1  # added once
    with caplog.at_level(logging.DEBUG, logger=paho.name):
        paho.error("failed to receive on socket: %s", BrokenPipeError(32, "Broken pipe"))
        paho.error("timeout on socket: %s", TimeoutError())
        paho.error("Caught exception in on_message: %s", ValueError("x"))
    levels = [r.levelname for r in caplog.records]
    assert levels == ["INFO", "INFO", "ERROR"], levels
