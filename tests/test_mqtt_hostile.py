"""A hostile client on the broker: any MQTT client may publish to any peer's inbox and, with
no mesh key, read every offer. Two nodes' MQTT signaling run in-process against a real
mosquitto (the ``broker`` fixture); the attacker is a real aiomqtt client with its own key."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import aiomqtt
import pytest

from mesh.discovery.mqtt import MqttConfig, MqttSignaling
from mesh.launch.localmesh import LocalBroker, wait_for
from mesh.net.identity import Identity
from mesh.net.signaling import (
    Envelope,
    ReplayGuard,
    offer_by_every_route,
    open_envelope,
    parse_envelope,
    seal,
)

MESH = "hostile"


def _signaling(
    me: Identity,
    broker: LocalBroker,
    on_offer: Callable[[Envelope], Awaitable[bytes]],
    on_presence: Callable[[str, dict[str, Any]], None] = lambda pid, body: None,
) -> MqttSignaling:
    return MqttSignaling(
        me,
        MqttConfig(url=broker.url, mesh=MESH, answer_timeout=5.0),
        on_offer=on_offer,
        on_presence=on_presence,
        on_absence=lambda pid: None,
        presence_body=dict,
        guard=ReplayGuard(),
    )


def _answerer(me: Identity, sdp: str = "v=0 real") -> Callable[[Envelope], Awaitable[bytes]]:
    """An on_offer that answers like a node: its own signed answer naming the offer's id."""

    async def on_offer(env: Envelope) -> bytes:
        return seal(me, "answer", env.sender, {"sdp": sdp, "re": env.body["oid"]})

    return on_offer


async def _dial(dialer: MqttSignaling, pid: str) -> Envelope:
    """What a node's dial does with the broker as its only route (ConnectionManager._dial)."""
    oid = os.urandom(16)
    body = {"sdp": "v=0 offer", "oid": oid}
    raw = await offer_by_every_route(
        None,  # type: ignore[arg-type]  # no direct addresses: no HTTP session is used
        dialer.identity,
        pid,
        [],
        dialer.exchange,
        body,
        oid,
    )
    answer = open_envelope(raw, me=dialer.identity.peer_id, kind="answer", guard=ReplayGuard())
    assert answer.body.get("re") == oid
    return answer


def _client(broker: LocalBroker) -> aiomqtt.Client:
    host, port = broker.url.removeprefix("mqtt://").split(":")
    return aiomqtt.Client(host, int(port))


async def test_wrong_typed_fields_in_broker_messages_leave_signaling_working(
    broker: LocalBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """Answers whose ``re`` is a list, a map, missing or oversized, presences with a malformed
    session, and a message that makes a callback raise: each one is refused (or dropped) on
    its own, and the broker connection, presence and offer/answer exchange go on."""
    caplog.set_level(logging.DEBUG, logger="mesh.discovery.mqtt")
    caplog.set_level(logging.INFO, logger="mesh.discovery.mqtt.paho")
    a_id, b_id, x = Identity.generate(), Identity.generate(), Identity.generate()
    marker = asyncio.Event()  # the hostile client's last message reached a's on_offer

    a_answer = _answerer(a_id)

    async def a_on_offer(env: Envelope) -> bytes:
        if env.sender == x.peer_id:
            marker.set()
        return await a_answer(env)

    def a_on_presence(pid: str, body: dict[str, Any]) -> None:
        if pid == x.peer_id:
            raise KeyError("a bug in a callback, reached by a well-formed message")

    a = _signaling(a_id, broker, a_on_offer, a_on_presence)
    b = _signaling(b_id, broker, _answerer(b_id))
    await a.start()
    await b.start()
    try:
        inbox = f"edgemesh/v1/{MESH}/inbox/{a_id.peer_id}"
        bad_answers: list[Any] = [[1], {"a": 1}, None, 7, "text", b"o" * 1000, [b"o"]]
        async with _client(broker) as hostile:
            for re in bad_answers:
                body = {"sdp": "v=0", "re": re} if re is not None else {"sdp": "v=0"}
                await hostile.publish(inbox, seal(x, "answer", a_id.peer_id, body), qos=1)
            presence = f"edgemesh/v1/{MESH}/presence/{x.peer_id}"
            for s in ([1], {"s": 1}, b"s" * 1000):
                await hostile.publish(presence, seal(x, "presence", "*", {"s": s}), qos=1)
            await hostile.publish(presence, seal(x, "presence", "*", {"s": b"12345678"}), qos=1)
            # the last one, on the inbox: handled once every one before it was
            offer = seal(x, "offer", a_id.peer_id, {"sdp": "v=0", "oid": b"m" * 16})
            await hostile.publish(inbox, offer, qos=1)
            # each is refused, and so are the three malformed sessions and the presence the
            # callback raised on (the broker keeps order per topic only: both are waited on)
            refusals = len(bad_answers) + 3 + 1
            await wait_for(
                lambda: (
                    (marker.is_set() and a.rejected >= refusals)
                    or (a._task is not None and a._task.done())
                ),
                10,
                "a to handle the hostile messages",
            )
        assert a._task is not None and not a._task.done(), a._task.exception()
        assert a._connected.is_set()
        assert a.rejected == refusals
        assert x.peer_id[:12] in caplog.text  # refusals name their sender
        (bug,) = [r for r in caplog.records if r.exc_info and r.exc_info[0] is KeyError]
        assert x.peer_id[:12] in bug.getMessage()
        # the broker connection still carries an exchange, both ways
        assert (await _dial(a, b_id.peer_id)).sender == b_id.peer_id
        assert (await _dial(b, a_id.peer_id)).sender == a_id.peer_id
    finally:
        await a.stop()
        await b.stop()


async def test_a_forged_answer_that_comes_first_does_not_defeat_the_dial(
    broker: LocalBroker,
) -> None:
    """Without a mesh key anyone on the broker reads offers: a hostile client answers one
    before its peer does, signed with its own key. That answer is refused and the dialer goes
    on waiting; the peer's answer, later, completes the dial."""
    a_id, b_id, x = Identity.generate(), Identity.generate(), Identity.generate()
    release = asyncio.Event()  # b answers once the forged answer reached a
    b_answer = _answerer(b_id)

    async def b_on_offer(env: Envelope) -> bytes:
        await asyncio.wait_for(release.wait(), 10)
        return await b_answer(env)

    a = _signaling(a_id, broker, _answerer(a_id))
    b = _signaling(b_id, broker, b_on_offer)
    await a.start()
    await b.start()
    try:
        async with _client(broker) as hostile:
            await hostile.subscribe(f"edgemesh/v1/{MESH}/inbox/{b_id.peer_id}", qos=1)
            dial = asyncio.ensure_future(_dial(a, b_id.peer_id))
            async with asyncio.timeout(10):
                async for message in hostile.messages:
                    assert isinstance(message.payload, bytes)
                    seen = parse_envelope(message.payload)
                    break
            forged = seal(x, "answer", a_id.peer_id, {"sdp": "v=0 forged", "re": seen.body["oid"]})
            await hostile.publish(f"edgemesh/v1/{MESH}/inbox/{a_id.peer_id}", forged, qos=1)
            await wait_for(lambda: a.rejected or dial.done(), 10, "a to handle the forgery")
            release.set()
            answer = await asyncio.wait_for(dial, 10)
        assert answer.sender == b_id.peer_id, "the dial took the hostile client's answer"
        assert answer.body["sdp"] == "v=0 real"
        assert a.rejected == 1
    finally:
        await a.stop()
        await b.stop()


def test_a_socket_closed_before_paho_watches_it_is_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broker going away between paho asking for its socket to be watched and the loop
    running that request: the loop logged the failed ``add_writer`` callback at ERROR, and
    the broker-restart fault test saw an error where none happened (a flake of CI). Demoted
    to INFO; any other callback error still reaches the loop's handler as before."""
    import logging

    import uvloop

    from mesh.discovery.mqtt import quiet_closed_sockets

    loop = uvloop.new_event_loop()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        quiet_closed_sockets(loop)
        quiet_closed_sockets(loop)  # once per loop
        closed = RuntimeError("unable to perform operation on <UVPoll closed=True>")
        with caplog.at_level(logging.INFO, logger="mesh.discovery.mqtt"):
            loop.call_exception_handler(
                {"message": "Exception in callback <bound method Loop.add_writer of <Loop>>",
                 "exception": closed}
            )  # fmt: skip
        assert not seen and "closed before it was watched" in caplog.text
        other = {"message": "Exception in callback f()", "exception": RuntimeError("bug")}
        loop.call_exception_handler(other)
        assert seen == [other]
    finally:
        loop.close()
