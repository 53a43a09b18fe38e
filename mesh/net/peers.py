"""The peer table: every peer learned from any source, with its link and state.

Discovery only adds hints; an entry becomes *proven* once a handshake proved its key, and only
proven entries are listed. An entry that has been disconnected for longer than ``expiry`` is
no longer listed (no ghosts), and is forgotten once nothing announces it any more.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mesh.errors import HandshakeError
from mesh.net.rpc import Link

__all__ = ["PeerEntry", "PeerTable", "MAX_PEERS"]

MAX_PEERS = 1024  # hints beyond this are ignored: an attacker can announce many ids
# A peer whose link broke the protocol (malformed frames) is refused, and not dialled, for
# PENALTY_BASE seconds, doubling with each such link up to PENALTY_MAX: otherwise it could
# make us set up a DTLS session and check its proofs four times a second, for ever.
PENALTY_BASE = 5.0
PENALTY_MAX = 300.0


@dataclass
class PeerEntry:
    peer_id: str
    addresses: list[str] = field(default_factory=list)  # signaling endpoints, "host:port"
    name: str = ""
    source: str = "mdns"  # the first source that named this peer
    announced_by: set[str] = field(default_factory=set)  # sources announcing it now
    via_mqtt: bool = False  # reachable through the broker's inbox
    static: bool = False  # configured with --peer: always redial
    last_seen: float = field(default_factory=time.time)  # wall clock, any source or link
    expires: float | None = None  # wall clock, when the announcing record lapses
    proven: bool = False
    link: Link | None = None
    dialing: asyncio.Task[None] | None = None
    dial_started: float = 0.0  # monotonic, of the dial in flight
    failures: int = 0
    handshake_failures: int = 0  # WebRTC connections with it that failed our handshake
    next_attempt: float = 0.0
    connected_since: float | None = None  # wall clock
    disconnected_at: float | None = None  # monotonic
    last_error: str | None = None
    protocol_errors: int = 0  # links with it that closed on a malformed frame
    shunned_until: float = 0.0  # monotonic: its offers refused, no dials, until then

    def link_closed(self, reason: str | None, grace: float) -> None:
        """Its link closed for ``reason``: redial after ``grace`` seconds, or after the
        penalty (see PENALTY_BASE) when the link broke the protocol."""
        now = time.monotonic()
        self.disconnected_at = now
        self.last_seen = time.time()
        self.last_error = reason
        self.next_attempt = now + grace
        if reason is not None and reason.startswith("protocol error"):
            self.protocol_errors += 1
            penalty = min(PENALTY_BASE * 2 ** (self.protocol_errors - 1), PENALTY_MAX)
            self.shunned_until = now + penalty
            self.next_attempt = max(self.next_attempt, self.shunned_until)

    @property
    def shunned(self) -> float:
        """Seconds left of its penalty (0: none)."""
        return max(0.0, self.shunned_until - time.monotonic())

    def failed(self, exc: BaseException) -> int:
        """A dial or inbound connection failed with ``exc``; 1 if our handshake failed."""
        self.last_error = str(exc)
        handshake = int(isinstance(exc, HandshakeError))
        self.handshake_failures += handshake
        return handshake

    @property
    def announced(self) -> bool:
        return bool(self.announced_by)

    @property
    def connected(self) -> bool:
        return self.link is not None and self.link.is_open

    @property
    def state(self) -> str:
        if self.connected:
            return "connected"
        if self.proven:
            return "reconnecting"
        if self.dialing is not None and not self.dialing.done():
            return "connecting"
        return "discovered"

    def as_dict(self) -> dict[str, Any]:
        link = self.link
        rtt = link.rtt_ms if link is not None and self.connected else None
        return {
            "peer_id": self.peer_id,
            "name": self.name,
            "state": self.state,
            "rtt_ms": round(rtt, 3) if rtt is not None else None,
            # the fastest quiet ping of the last seconds, and the frame size it makes
            "path_ms": _rounded(link.path_ms) if link is not None and self.connected else None,
            "frame_size": link.frame_size if link is not None and self.connected else None,
            # the ICE candidate pair in use: {"local", "remote", "protocol"[, "relay_protocol"]}
            "ice": _pair(link) if link is not None and self.connected else None,
            "offered": link.offerer if link is not None and self.connected else None,
            "source": self.source,
            "sources": sorted(self.announced_by | ({"static"} if self.static else set())),
            "last_seen": round(time.time() if self.connected else self.last_seen, 3),
            "expires": self.expires,
            "addresses": list(self.addresses),
            "connected_since": self.connected_since if self.connected else None,
            "bytes_sent": link.bytes_sent if link is not None else 0,
            "bytes_received": link.bytes_received if link is not None else 0,
            "last_error": self.last_error,
            "handshake_failures": self.handshake_failures,
            "protocol_errors": self.protocol_errors,
            "refused_for_s": round(self.shunned, 1),
            "copies": _copies(link) if link is not None and self.connected else None,
        }


def _rounded(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 3)


def _pair(link: Link) -> dict[str, Any] | None:
    """The candidate pair's types and protocols (not the engine's ``same_host`` flag)."""
    pair = link.path()
    return None if pair is None else {k: v for k, v in pair.items() if k != "same_host"}


def _copies(link: Link) -> dict[str, Any] | None:
    """Copies of small frames on the spare channel (mesh.net.copies): whether they are being
    sent, how many were, and how many frames a copy brought first (a loss it covered)."""
    if link.copies is None:
        return None
    sender, resequencer = link.copies
    return {
        "active": sender.active,
        "why": sender.reason if sender.active else None,  # "on", "path" or "stall"
        "stalls": link.stalls,  # pings far slower than the link's fastest
        "sent": sender.copies_sent,
        "used": resequencer.copies_used,
        "dropped": resequencer.copies_dropped,
        "held": resequencer.waiting,  # copies waiting for an earlier frame (at most 64)
    }


class PeerTable:
    def __init__(self, expiry: float) -> None:
        self.expiry = expiry
        self._entries: dict[str, PeerEntry] = {}

    def get(self, peer_id: str) -> PeerEntry | None:
        return self._entries.get(peer_id)

    def ensure(self, peer_id: str, source: str) -> PeerEntry | None:
        entry = self._entries.get(peer_id)
        if entry is None:
            if len(self._entries) >= MAX_PEERS:
                return None
            entry = self._entries[peer_id] = PeerEntry(peer_id, source=source)
        return entry

    def remove(self, peer_id: str) -> None:
        entry = self._entries.pop(peer_id, None)
        if entry is not None and entry.dialing is not None:
            entry.dialing.cancel()

    def evict_unproven(self, unproven: list[PeerEntry], busy: Callable[[PeerEntry], bool]) -> bool:
        """Make room for a new hint: forget the oldest unproven peer of the biggest bucket.

        Identities and announcements are free, so a full table must not refuse newcomers
        (that keeps real peers out); entries are bucketed by source and announced host, so a
        flood from one place displaces its own entries first. ``busy`` peers (being dialed,
        handshaking) and --peer entries stay."""
        buckets: dict[str, list[PeerEntry]] = {}
        for e in unproven:
            if not e.static and not busy(e):
                buckets.setdefault(_bucket(e), []).append(e)
        if not buckets:
            return False
        biggest = max(buckets.values(), key=len)
        victim = min(biggest, key=lambda e: e.last_seen)
        self.remove(victim.peer_id)
        return True

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def listed(self, now: float | None = None, *, everyone: bool = False) -> list[PeerEntry]:
        """Proven peers that are connected or were within ``expiry`` seconds; with
        ``everyone``, every peer heard of too (never linked, with its last error)."""
        now = time.monotonic() if now is None else now
        out = []
        for e in self._entries.values():
            if everyone:
                out.append(e)
                continue
            if not e.proven:
                continue
            if e.connected or (
                e.disconnected_at is not None and now - e.disconnected_at < self.expiry
            ):
                out.append(e)
        return sorted(out, key=lambda e: e.peer_id)

    def links(self) -> list[Link]:
        return [e.link for e in self._entries.values() if e.link is not None and e.connected]


def _bucket(entry: PeerEntry) -> str:
    """Where a hint came from: its source and the host it announced (ports are free)."""
    if not entry.addresses:
        return entry.source
    host = entry.addresses[0].rpartition(":")[0]
    return f"{entry.source} {host}"
