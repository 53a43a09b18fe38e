"""Links to peers: dialing, accepting, collisions, reconnects, and the hints that drive them.

Who dials: any side may. When both dial at once, the link offered by the lower peer id wins on
both sides (an inbound offer that collides with our own dial is refused by the lower id; when
two links complete anyway, both sides keep the one the lower id offered). For discovery hints
the higher id waits ``dial_grace`` before dialing, so two LAN peers rarely collide. A dropped
link is redialled with exponential backoff while some source still names the peer.

Membership comes first: with a :class:`~mesh.net.handshake.Gate` (the node's policy), a hint,
a static peer's info, an inbound offer, an answer and the handshake's hello must each carry a
certificate that admits the peer, checked before any peer connection is created for it.

Everything here is bounded: concurrent dials, handshakes in progress, unproven peers in the
table; an announcement flood can neither exhaust sockets nor crowd out real peers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from mesh.errors import EXPECTED, HandshakeError, NotAMember, PeerUnavailable, SignalingError
from mesh.net.handshake import Gate
from mesh.net.identity import Identity
from mesh.net.netwatch import NetWatch, NetworkBack
from mesh.net.peers import PeerEntry, PeerTable
from mesh.net.rpc import Handler, Link
from mesh.net.signaling import (
    Envelope,
    ReplayGuard,
    clean_endpoints,
    fetch_info,
    offer_by_every_route,
    open_envelope,
    seal,
)
from mesh.net.transport import (
    PendingConnection,
    Teardowns,
    TransportConfig,
    accept_offer,
    complete_offer,
    open_offer,
)

__all__ = ["ConnectionParams", "Connections"]

log = logging.getLogger(__name__)

Exchange = Callable[[str, bytes, bytes], Awaitable[bytes]]
Watch = asyncio.Future[None]  # NetWatch.watch(): done once the network is back
MAX_ANSWERS = 256  # offers whose answer is kept for their copies on other routes


@dataclass(frozen=True)
class ConnectionParams:
    # Timing: tests shrink these.
    tick: float = 0.25
    dial_grace: float = 1.5
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    peer_expiry: float = 10.0
    give_up_after: int = 8  # failed dials before a peer no source names is forgotten
    # Outages (issue 15): a peer lost within reconnect_window is redialled every reconnect_max
    # at most; a dial or handshake older than stale_dial (begun offline?) holds off no other.
    reconnect_window: float = 60.0
    reconnect_max: float = 2.0
    stale_dial: float = 3.0
    # Bounds.
    max_pending_inbound: int = 16  # handshakes in progress (slowloris bound)
    max_pending_per_address: int = 8  # of those, from one signaling address
    max_dials: int = 8  # concurrent outbound dials
    max_unproven: int = 64  # peers named by hints but never proven by a handshake
    max_banned: int = 4096  # oldest bans are forgotten first beyond this
    # Fault injection, off by default (0): seconds the first dial waits between the answer and
    # the identity handshake, so a fault test can kill or stop this node mid-connect.
    # Set by tests/fixtures/fault_node.py, never from the command line or the environment.
    dial_hold: float = 0.0


class Connections:
    """Owns the peer table and every link in it."""

    def __init__(
        self,
        identity: Identity,
        transport: TransportConfig,
        handlers: dict[str, Handler],
        guard: ReplayGuard,
        params: ConnectionParams,
        *,
        my_endpoints: Callable[[], list[str]],
        my_name: str,
        gate: Gate | None = None,
    ) -> None:
        self.identity = identity
        self.gate = gate
        self.transport = transport
        self.handlers = handlers
        self.guard = guard
        self.params = params
        self.my_endpoints = my_endpoints
        self.my_name = my_name
        self.peers = PeerTable(params.peer_expiry)
        self.mqtt_exchange: Exchange | None = None  # set when a broker is configured
        self.counters = {
            "handshake_failures": 0,
            "dial_failures": 0,
            "inbound_refused": 0,
            "banned_refused": 0,
            "unproven_evicted": 0,
            "lapsed_dropped": 0,
            "shunned_refused": 0,  # offers of a peer whose link broke the protocol, refused
        }
        self.not_member: dict[str, int] = {}  # refusals by where they came from
        self.banned: dict[str, str] = {}  # peer id -> reason (insertion ordered, bounded)
        self._http: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dial_slots = asyncio.Semaphore(params.max_dials)
        self._pending_inbound: dict[str, PendingConnection | None] = {}
        self._pending_from: dict[str, str] = {}  # peer id -> address of its pending handshake
        self._static: dict[str, str] = {}  # address -> peer id it proved to have
        # (peer id, offer id) -> the answer to that offer: the copies other routes bring
        self._answers: dict[tuple[str, bytes], asyncio.Future[bytes]] = {}
        self.teardowns = Teardowns()  # peer connections of closed links, still closing
        self._dial_held = False  # params.dial_hold is spent (the first dial only)
        self.netwatch = NetWatch(transport.servers)  # tells a dial gathered offline: back online
        self.closing = False

    @property
    def me(self) -> str:
        return self.identity.peer_id

    async def _fault_dial_hold(self) -> None:
        hold = self.params.dial_hold
        if hold > 0 and not self._dial_held:
            self._dial_held = True  # the first dial only: its retries connect normally
            log.warning("fault injection: dial held for %.1f s before the handshake", hold)
            await asyncio.sleep(hold)  # fault injection only: a window for a fault to land

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self._spawn(self._maintain())

    async def stop(self) -> None:
        self.closing = True
        for task in list(self._tasks):
            task.cancel()
        for entry in self.peers:
            if entry.link is not None:
                entry.link.close("node shutting down")
        for pending in list(self._pending_inbound.values()):
            if pending is not None:
                await pending.pc.close()
        if self._http is not None:
            await self._http.close()
        await self.teardowns.wait()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def admit(self, peer_id: str, cert: Any, source: str) -> None:
        """The first check on anything naming ``peer_id``: NotAMember unless its certificate
        admits it (counted by source; the policy counts by reason)."""
        if self.gate is None:
            return
        try:
            self.gate.admit(peer_id, cert)
        except NotAMember:
            self.not_member[source] = self.not_member.get(source, 0) + 1
            raise

    def _body(self, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` with our certificate, for offers and answers."""
        if self.gate is not None and self.gate.credential:
            body["cert"] = self.gate.credential
        return body

    def _ensure(self, peer_id: str, source: str) -> PeerEntry | None:
        if self.peers.get(peer_id) is None:
            unproven = [e for e in self.peers if not e.proven]
            full = len(unproven) >= self.params.max_unproven
            if full and not self.peers.evict_unproven(unproven, self._busy):
                n = len(unproven)
                log.warning("ignoring %s from %s: %d unproven peers", peer_id[:12], source, n)
                return None
            if full:
                self.counters["unproven_evicted"] += 1
        return self.peers.ensure(peer_id, source)

    # -- hints -----------------------------------------------------------------------------
    def hint(
        self,
        peer_id: str,
        source: str,
        addresses: list[str] | None = None,
        name: str | None = None,
        *,
        via_mqtt: bool = False,
        expires: float | None = None,
        cert: Any = None,
    ) -> None:
        """A discovery source names ``peer_id``: remember how to reach it, dial if needed.
        ``cert`` is the member certificate its record carried."""
        if peer_id == self.me:
            return
        if peer_id in self.banned:  # its mDNS, broker and DHT records are ignored
            self.counters["banned_refused"] += 1
            return
        try:
            self.admit(peer_id, cert, source)
        except NotAMember as exc:
            log.debug("ignoring %s from %s: %s", peer_id[:12], source, exc)
            return
        entry = self._ensure(peer_id, source)
        if entry is None:
            return
        fresh = source not in entry.announced_by
        entry.announced_by.add(source)
        entry.last_seen = time.time()
        entry.expires = expires
        if addresses:
            static = [a for a in entry.addresses if self._static.get(a) == peer_id]
            entry.addresses = list(dict.fromkeys(static + clean_endpoints(addresses)))[:8]
        entry.name = name[:63] if name else entry.name
        entry.via_mqtt = entry.via_mqtt or via_mqtt
        # Only a source that newly names the peer resets the backoff: re-announcements don't.
        if fresh and not entry.connected and not self._busy(entry):
            entry.failures = 0
            entry.next_attempt = max(time.monotonic() + self._grace(peer_id), entry.shunned_until)

    def unhint(self, peer_id: str, source: str) -> None:
        """A source no longer names ``peer_id`` (confirmed goodbye, will, lapsed record)."""
        entry = self.peers.get(peer_id)
        if entry is None:
            return
        entry.announced_by.discard(source)
        if source == "mqtt":
            entry.via_mqtt = False
        if not entry.announced and not entry.connected and not entry.static:
            if not self._busy(entry):
                self.peers.remove(peer_id)

    def _busy(self, entry: PeerEntry) -> bool:
        return self._busy_dialing(entry) or entry.peer_id in self._pending_inbound

    def _busy_dialing(self, entry: PeerEntry) -> bool:
        return entry.dialing is not None and not entry.dialing.done()

    def _stale_inbound(self, entry: PeerEntry, now: float) -> bool:
        """A known peer busy only with an old inbound handshake (its answer lost?): dial too."""
        pending = self._pending_inbound.get(entry.peer_id)
        if pending is None or not entry.proven or self._busy_dialing(entry):
            return False
        return now - pending.started > self.params.stale_dial

    def _grace(self, peer_id: str) -> float:
        return 0.0 if self.me < peer_id else self.params.dial_grace

    def add_static(self, address: str) -> None:
        self._spawn(self._static_peer(address))

    async def _static_peer(self, address: str) -> None:
        """Keep whoever listens at ``address`` in the table; re-learn it if its key changes."""
        assert self._http is not None
        delay = self.params.backoff_base
        while True:
            try:
                env = await fetch_info(self._http, address, self.me)
            except SignalingError as exc:
                log.info("static peer %s: %s (retrying in %.1f s)", address, exc, delay)
                await asyncio.sleep(delay)  # backoff between attempts
                delay = min(delay * 2, self.params.backoff_max)
                continue
            if env.sender == self.me:
                return
            try:
                self.admit(env.sender, env.body.get("cert"), "static")
            except NotAMember as exc:
                log.warning("static peer %s (%s): %s", address, env.sender[:12], exc)
                await asyncio.sleep(delay)  # it may be made a member: ask again, backing off
                delay = min(delay * 2, self.params.backoff_max)
                continue
            delay = self.params.backoff_base
            old = self._static.get(address)
            if old is not None and old != env.sender and (e := self.peers.get(old)) is not None:
                e.static = False  # the address now belongs to another key
            self._static[address] = env.sender
            entry = self._ensure(env.sender, "static")
            if entry is not None:
                entry.static = True
                entry.source = "static"
                if address not in entry.addresses:
                    entry.addresses.insert(0, address)
                name = env.body.get("name")
                entry.name = name[:63] if isinstance(name, str) else entry.name
                if not entry.connected:
                    entry.next_attempt = time.monotonic()
            # Ask again after repeated failures: the node may have come back with a new key.
            while True:
                await asyncio.sleep(self.params.backoff_max)  # re-check period
                cur = self.peers.get(env.sender)
                if cur is None or (not cur.connected and cur.failures >= 3):
                    break

    # -- maintenance -----------------------------------------------------------------------
    async def _maintain(self) -> None:
        while True:
            self.maintain_once(time.monotonic())
            await asyncio.sleep(self.params.tick)  # the maintenance period

    def maintain_once(self, now: float) -> None:
        p = self.params
        for entry in self.peers:
            if entry.connected:
                self._check_membership(entry)
                continue
            if self._busy(entry) and not self._stale_inbound(entry, now):
                continue
            if not entry.announced and not entry.static:
                stale = entry.disconnected_at is not None and now - entry.disconnected_at > (
                    p.peer_expiry
                )
                if not entry.proven or entry.failures >= p.give_up_after or stale:
                    self.peers.remove(entry.peer_id)
                    continue
            if (entry.addresses or entry.via_mqtt) and now >= entry.next_attempt:
                entry.next_attempt = now + p.backoff_max  # until the dial reports
                entry.dial_started = now
                entry.dialing = self._spawn(self._dial(entry))

    def _check_membership(self, entry: PeerEntry) -> None:
        """A certificate is checked when its link opens; a link whose certificate lapsed
        since (expired, revoked) is closed. The peer's redials and answers then carry the
        lapsed certificate, so they are refused until it presents a valid one."""
        if self.gate is None or entry.link is None or self.gate.still_admits(entry.peer_id):
            return
        self.counters["lapsed_dropped"] += 1
        log.warning("dropping %s: its member certificate lapsed", entry.peer_id[:12])
        entry.link.close("member certificate expired")

    def _backoff(self, entry: PeerEntry) -> None:
        p = self.params
        delay = min(p.backoff_base * 2**entry.failures, p.backoff_max)
        lost = entry.disconnected_at
        if entry.proven and lost is not None and time.monotonic() - lost < p.reconnect_window:
            # a peer linked moments ago is most likely behind a network that blinked
            delay = min(delay, p.reconnect_max)
        entry.failures += 1
        entry.next_attempt = time.monotonic() + delay * (0.75 + 0.5 * random.random())

    @property
    def handshakes_in_progress(self) -> int:
        """Inbound handshakes holding a slot now (at most ``max_pending_inbound``)."""
        return len(self._pending_inbound)

    # -- dialing ---------------------------------------------------------------------------
    async def _dial(self, entry: PeerEntry) -> None:
        pid = entry.peer_id
        pending: PendingConnection | None = None
        watch = self.netwatch.watch()  # sees an outage during the gathering, if any
        try:
            async with self._dial_slots:
                pending, offer_sdp = await open_offer(self.identity, self.transport, pid, self.gate)
                oid = os.urandom(16)
                offer = {"sdp": offer_sdp, "oid": oid, "name": self.my_name}
                body = self._body(offer | {"addrs": self.my_endpoints()})
                if short := pending.pc.gather_short:
                    log.info("dial %s: offer lacks %s (offline?)", pid[:12], ", ".join(short))
                raw = await self._exchange(entry, body, oid, watch if short else None)
                answer = open_envelope(raw, me=self.me, kind="answer", guard=self.guard)
                if answer.sender != pid or answer.body.get("re") != oid:
                    raise SignalingError("answer is not from the dialed peer or not for our offer")
                self.admit(pid, answer.body.get("cert"), "answer")
                sdp = answer.body.get("sdp")
                if not isinstance(sdp, str):
                    raise SignalingError("answer carries no SDP")
                await complete_offer(pending, sdp)
                await self._fault_dial_hold()
                link = await pending.establish(self.handlers, self._on_link_closed, self.teardowns)
        except asyncio.CancelledError:
            if pending is not None:
                await pending.pc.close()
            raise
        except Exception as exc:  # an OSError (no fds) must back off like any failure
            if pending is not None:
                await pending.pc.close()
            self.counters["dial_failures"] += 1
            self.counters["handshake_failures"] += entry.failed(exc)
            if not isinstance(exc, EXPECTED):
                log.exception("dial %s failed unexpectedly", pid[:12])
            log.warning("dial %s failed: %s", pid[:12], exc)
            self._backoff(entry)
            return
        finally:
            watch.cancel()
        self._adopt(pid, link)

    async def _exchange(
        self, entry: PeerEntry, body: dict[str, Any], oid: bytes, watch: Watch | None = None
    ) -> bytes:
        """The answer to an offer sent by every route at once (offer_by_every_route). With
        ``watch``, the offer lacks what the ICE servers give (likely built offline): it is
        dropped once the network is back, for a fresh dial, not left to wait out the
        signaling timeouts with candidates that cannot work."""
        assert self._http is not None
        mqtt = self.mqtt_exchange if entry.via_mqtt else None
        args = (self._http, self.identity, entry.peer_id, entry.addresses, mqtt, body, oid)
        if watch is None:
            return await offer_by_every_route(*args)
        try:
            return await self.netwatch.unless_online(offer_by_every_route(*args), watch)
        except NetworkBack:
            entry.failures = 0  # not a retry of a failure: the redial waits the first step only
            raise NetworkBack("the network is back: redialling with fresh candidates") from None

    # -- accepting -------------------------------------------------------------------------
    async def on_offer(self, env: Envelope, remote: str | None = None) -> bytes:
        """Answer a verified offer (direct or via the broker); the handshake runs after.

        ``remote`` is the address the offer came from, when known (direct signaling): one
        address may hold at most ``max_pending_per_address`` of the handshake slots."""
        pid = env.sender
        if self.closing:
            raise SignalingError("node is shutting down")
        if pid in self.banned:
            self.counters["banned_refused"] += 1
            raise SignalingError("banned")
        if (known := self.peers.get(pid)) is not None and known.shunned:
            self.counters["shunned_refused"] += 1
            raise SignalingError(f"refused for {known.shunned:.0f} s: its link broke the protocol")
        try:  # before any WebRTC work: a stranger costs one signature check
            self.admit(pid, env.body.get("cert"), "offer")
        except NotAMember as exc:
            raise SignalingError(str(exc)) from None
        sdp, oid = env.body.get("sdp"), env.body.get("oid")
        if not isinstance(sdp, str) or not isinstance(oid, bytes) or len(oid) > 32:
            raise SignalingError("offer carries no SDP or offer id")
        answered = self._answers.get((pid, oid))
        if answered is not None:  # another route's copy of an offer being (or) answered
            return await asyncio.shield(answered)
        if pid in self._pending_inbound:
            await self._supersede(pid)
        if len(self._pending_inbound) >= self.params.max_pending_inbound:
            self.counters["inbound_refused"] += 1
            raise SignalingError("too many handshakes in progress")
        if remote is not None and (
            sum(a == remote for a in self._pending_from.values())
            >= self.params.max_pending_per_address
        ):
            self.counters["inbound_refused"] += 1
            raise SignalingError("too many handshakes in progress from this address")
        entry = self.peers.get(pid) or self._ensure(pid, "inbound")
        if entry is None:
            self.counters["inbound_refused"] += 1
            raise SignalingError("too many unproven peers")
        if entry.dialing is not None and not entry.dialing.done():
            if self.me > pid:
                entry.dialing.cancel()
            elif time.monotonic() - entry.dial_started < self.params.stale_dial:
                raise SignalingError("simultaneous dial: the lower peer id dials")
            # else ours is stale (sent while one side was offline?) and this offer is fresh:
            # both go on; if both links complete, _adopt keeps ours on both sides.
        if not entry.addresses:
            entry.addresses = clean_endpoints(env.body.get("addrs"))
        name = env.body.get("name")
        entry.name = name[:63] if isinstance(name, str) and not entry.name else entry.name
        # The slot is taken before the first await: concurrent offers cannot overrun the cap.
        self._pending_inbound[pid] = None
        if remote is not None:
            self._pending_from[pid] = remote
        answer = self._answer_later(pid, oid)
        try:
            accepted = accept_offer(self.identity, self.transport, sdp, pid, self.gate)
            pending, answer_sdp = await accepted
        except EXPECTED as exc:
            del self._pending_inbound[pid]
            self._pending_from.pop(pid, None)
            self._answers.pop((pid, oid), None)
            answer.set_exception(SignalingError(str(exc)))
            raise SignalingError(str(exc)) from None
        self._pending_inbound[pid] = pending
        self._spawn(self._finish_inbound(pid, pending))
        sealed = seal(self.identity, "answer", pid, self._body({"sdp": answer_sdp, "re": oid}))
        answer.set_result(sealed)
        return sealed

    async def _supersede(self, pid: str) -> None:
        """A new offer from a peer whose earlier one is still connecting: the peer gave that
        dial up (it runs one per peer; e.g. one sent while it was offline), so the new offer
        takes its slot instead of being refused until the old one times out (20 s)."""
        old = self._pending_inbound.get(pid)
        if old is None:  # still being answered: this offer raced it
            raise SignalingError("a handshake with this peer is already in progress")
        log.info("a new offer from %s replaces its pending connection", pid[:12])
        del self._pending_inbound[pid]
        self._pending_from.pop(pid, None)
        await old.pc.close()
        if pid in self._pending_inbound:  # another offer took the slot meanwhile
            raise SignalingError("a handshake with this peer is already in progress")

    def _answer_later(self, pid: str, oid: bytes) -> asyncio.Future[bytes]:
        """The answer to offer ``oid`` of ``pid``, for the copies of it that other routes
        bring (the dialer sends one by each): they get this answer instead of a second
        connection. The last ``MAX_ANSWERS`` offers are remembered."""
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
        self._answers[(pid, oid)] = fut
        while len(self._answers) > MAX_ANSWERS:
            self._answers.pop(next(iter(self._answers)))
        return fut

    async def _finish_inbound(self, pid: str, pending: PendingConnection) -> None:
        try:
            link = await pending.establish(self.handlers, self._on_link_closed, self.teardowns)
        except Exception as exc:  # a bug too ends here: nobody awaits this task
            entry = self.peers.get(pid)
            if entry is not None:
                self.counters["handshake_failures"] += entry.failed(exc)
            elif isinstance(exc, HandshakeError):
                self.counters["handshake_failures"] += 1
            bug = not isinstance(exc, EXPECTED)  # its traceback goes to the log
            log.warning("inbound connection from %s failed: %s", pid[:12], exc, exc_info=bug)
            return
        finally:
            if self._pending_inbound.get(pid) is pending:  # not a newer offer's (_supersede)
                self._pending_inbound.pop(pid, None)
                self._pending_from.pop(pid, None)
        self._adopt(pid, link)

    # -- links -----------------------------------------------------------------------------
    def _preferred(self, link: Link) -> bool:
        """Whether ``link`` was offered by the lower id: both sides keep that one."""
        return link.offerer == (self.me < link.peer_id)

    def _adopt(self, pid: str, link: Link) -> None:
        if pid in self.banned:  # banned while its handshake was in flight
            link.close("banned")
            return
        entry = self.peers.get(pid) or self.peers.ensure(pid, "inbound")
        if entry is None:
            link.close("peer table full")
            return
        old = entry.link
        if old is not None and old is not link and old.is_open:
            # Two links completed: keep the same one as the peer does.
            if self._preferred(old) and not self._preferred(link):
                link.close("duplicate connection", notify=False)
                return
            old.close("replaced by a newer connection", notify=False)
        entry.link = link
        entry.proven = True
        entry.failures = 0
        entry.last_error = None
        entry.connected_since = time.time()
        entry.disconnected_at = None
        log.info("connected to %s (%s)", pid[:12], entry.name)

    def _on_link_closed(self, link: Link) -> None:
        entry = self.peers.get(link.peer_id)
        if entry is None or entry.link is not link:
            return
        entry.link_closed(link.close_reason, self._grace(link.peer_id))
        log.info("link to %s closed: %s", link.peer_id[:12], link.close_reason)

    def ban(self, peer_id: str, reason: str) -> None:
        """Refuse ``peer_id`` from now on: close its link, forget its addresses."""
        if peer_id == self.me:
            return
        self.banned.pop(peer_id, None)
        self.banned[peer_id] = reason[:200]
        while len(self.banned) > self.params.max_banned:
            self.banned.pop(next(iter(self.banned)))
        entry = self.peers.get(peer_id)
        if entry is not None:
            if entry.link is not None:
                entry.link.close(f"banned: {reason[:100]}")
            if entry.dialing is not None and not entry.dialing.done():
                entry.dialing.cancel()
            self.peers.remove(peer_id)
        log.warning("banned %s: %s", peer_id[:12], reason)

    def link(self, peer_id: str) -> Link:
        entry = self.peers.get(peer_id)
        if entry is None or entry.link is None or not entry.connected:
            raise PeerUnavailable(f"no link to {peer_id[:12]}")
        return entry.link
