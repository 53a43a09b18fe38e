"""A Kademlia DHT (the ``kademlia`` package) that stores only signed, fresh, bounded records.

The package stores any value from anyone, so validation is ours, on store and on get:

* a **record** is ``[v, kind, key, peer_id, pk, seq, expires, body]`` plus an Ed25519 signature,
  msgpack-encoded, at most ``MAX_RECORD`` bytes. ``peer_id`` must be the hash of ``pk``; a
  ``peer`` record lives only under ``peer:<its own id>``; ``prov`` records (providers of a blob,
  members of a mesh) live under any ``prov:`` key. Expired records are refused; a newer
  ``seq`` from the same peer replaces an older one.
* a stored **value** is a msgpack list of records under one key (merged per peer), capped at
  ``MAX_RECORDS_PER_KEY`` and ``MAX_VALUE`` bytes.
* a record's ``seq`` is its signer's clock in ms and may lead ours by ``MAX_SEQ_AHEAD`` at most;
  a full key evicts from the sender that delivered the most of its records, so one sender
  displaces its own records, not the honest ones; a signer holds records under at most
  ``MAX_KEYS // SIGNER_SHARE`` keys.
* every sender (the key that signed the store datagram; an IP for stores made here) has a
  **quota** of stores per window; one that exceeds it is cut off (all its datagrams dropped)
  for ``ban_seconds``. Never its source address: UDP sources can be spoofed, and a captured
  datagram replayed from an honest contact's address got that contact banned. Requests carry
  their time and are refused stale or replayed (:mod:`dhtwire`). A datagram over
  ``MAX_DATAGRAM`` is dropped without penalty.
* a contact that sent us a request (its address unverified) is pinged back before it enters
  the routing table and is handed the records it should hold.

Node ids are the 20 bytes behind the peer id, so a DHT contact and a mesh peer share one id,
and they are bound to keys: every datagram is signed by its sender (:mod:`dhtwire`), a
request naming an id that is not its signer's is ignored, and a contact counts (routing
table, answers) only when the key of its id signed its answer.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import msgpack
from kademlia.crawling import ValueSpiderCrawl
from kademlia.network import Server
from kademlia.node import Node as KadNode
from kademlia.storage import IStorage

from mesh.discovery.dhtwire import (
    MAX_DATAGRAM,
    MAX_RECORD,
    MAX_RECORDS_PER_KEY,
    MAX_VALUE,
    _Protocol,
)
from mesh.errors import DiscoveryError
from mesh.net.handshake import Gate
from mesh.net.identity import Identity
from mesh.net.signed import Field, Format, check_expiry

__all__ = [
    "MAX_DATAGRAM",
    "MAX_VALUE",
    "MAX_RECORDS_PER_KEY",
    "Record",
    "make_record",
    "parse_record",
    "parse_value",
    "RecordStore",
    "MeshDHT",
    "dht_key",
    "MAX_RECORD",
]

log = logging.getLogger(__name__)
MAX_TTL = 24 * 3600.0
MAX_KEYS = 4096  # keys one node stores for others
SIGNER_SHARE = 8  # one signer may hold records under at most 1/8 of those keys
MAX_SEQ_AHEAD = 60.0  # seconds a record's seq (milliseconds of its signer's clock) may lead ours
_NO_BODY: Any = MappingProxyType({})  # a stored record's body (RecordStore keeps the bytes)
RECORD = Format(
    what="record",
    context=b"edgemesh/dht/v1\x00",
    fields=(
        Field("v", int, choices=(1,)),
        Field("kind", str, choices=("peer", "prov")),
        Field("key", str),
        Field("peer_id", str),
        Field("pk", bytes),
        Field("seq", int),
        Field("expires", float),
        Field("body", dict),
    ),
    error=DiscoveryError,
    max_size=MAX_RECORD,
    signer="peer_id",
)


def dht_key(key: str) -> bytes:
    """The 160-bit DHT key of a record key (kademlia's own digest: SHA-1)."""
    return hashlib.sha1(key.encode()).digest()


def node_id_of(peer_id: str) -> bytes:
    return base64.b32decode(peer_id.upper() + "=" * (-len(peer_id) % 8))


@dataclass(frozen=True)
class Record:
    kind: str
    key: str
    peer_id: str
    public_key: bytes
    seq: int
    expires: float
    body: dict[str, Any]
    raw: bytes


def make_record(
    identity: Identity,
    kind: str,
    key: str,
    body: dict[str, Any],
    ttl: float,
    seq: int | None = None,
    now: float | None = None,
) -> bytes:
    now = time.time() if now is None else now
    seq = int(now * 1000) if seq is None else seq
    values = [1, kind, key, identity.peer_id, identity.public_key, seq, now + ttl, body]
    return RECORD.make(identity, values)


def parse_record(raw: Any, now: float | None = None) -> Record:
    """Validate one record (pure). Raises DiscoveryError."""
    f = RECORD.parse(raw).fields
    pid, kind, key = f["peer_id"], f["kind"], f["key"]
    now = time.time() if now is None else now
    check_expiry(
        f["expires"], now, max_ttl=MAX_TTL, error=DiscoveryError, what=f"record from {pid[:12]}"
    )
    if f["seq"] > (now + MAX_SEQ_AHEAD) * 1000:
        # seq is its signer's clock in ms: one from the future would outrank every honest record
        raise DiscoveryError(f"record from {pid[:12]} has a seq ahead of the clock")
    if not key.startswith(kind + ":"):
        raise DiscoveryError(f"a {kind} record cannot live under {key!r}")
    if kind == "peer" and key != f"peer:{pid}":
        raise DiscoveryError("a peer record must live under its own id")
    return Record(kind, key, pid, f["pk"], f["seq"], float(f["expires"]), f["body"], raw)


def parse_value(
    value: Any,
    dkey: bytes | None = None,
    now: float | None = None,
) -> tuple[list[Record], int]:
    """Valid records of a stored value, and how many were refused."""
    if not isinstance(value, bytes) or len(value) > MAX_VALUE:
        return [], 1
    try:
        raws = msgpack.unpackb(
            value,
            raw=False,
            max_bin_len=MAX_RECORD,
            max_array_len=MAX_RECORDS_PER_KEY,
            max_str_len=0,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception:
        return [], 1
    if not isinstance(raws, list):
        return [], 1
    good, bad = [], 0
    for raw in raws:
        try:
            rec = parse_record(raw, now)
        except DiscoveryError as exc:
            log.debug("refused DHT record: %s", exc)
            bad += 1
            continue
        if dkey is not None and dht_key(rec.key) != dkey:
            bad += 1
            continue
        good.append(rec)
    return good, bad


def merge(records: list[Record]) -> list[Record]:
    """One record per peer (highest seq), the freshest ``MAX_RECORDS_PER_KEY``."""
    best: dict[str, Record] = {}
    for rec in records:
        if rec.peer_id not in best or rec.seq > best[rec.peer_id].seq:
            best[rec.peer_id] = rec
    return sorted(best.values(), key=lambda r: -r.seq)[:MAX_RECORDS_PER_KEY]


def _address(sender: Any) -> Any:
    """The part of a sender that costs something to change: its IP, not its port."""
    if isinstance(sender, (tuple, list)) and sender:
        return sender[0]
    return sender


def encode_value(records: list[Record]) -> bytes:
    return bytes(msgpack.packb([r.raw for r in records], use_bin_type=True))


class RecordStore(IStorage):  # type: ignore[misc]
    """Kademlia storage that validates, merges and bounds what it keeps."""

    def __init__(self, quota: int = 256, window: float = 60.0, ban_seconds: float = 300.0) -> None:
        self._data: dict[bytes, list[Record]] = {}
        self._origin: dict[bytes, dict[str, Any]] = {}  # key -> signer -> address it came from
        self._signer_keys: dict[str, int] = {}  # signer -> keys it has a record under
        self.quota = quota
        self.window = window
        self.ban_seconds = ban_seconds
        self._stores: dict[Any, list[float]] = {}
        self.banned: dict[Any, float] = {}
        self.refused = 0

    def is_banned(self, sender: Any) -> bool:
        address = _address(sender)
        until = self.banned.get(address)
        if until is None:
            return False
        if until < time.monotonic():
            del self.banned[address]
            return False
        return True

    def _over_quota(self, address: Any, ban: bool = True) -> bool:
        now = time.monotonic()
        recent = [t for t in self._stores.get(address, []) if now - t < self.window]
        recent.append(now)
        if len(self._stores) > 4 * MAX_KEYS:  # senders are bounded too
            self._stores.clear()
        self._stores[address] = recent
        if len(recent) <= self.quota:
            return False
        if not ban:
            return True
        self.banned[address] = now + self.ban_seconds
        log.warning(
            "DHT sender %s exceeded its quota of %d stores per %.0f s: cut off",
            address,
            self.quota,
            self.window,
        )
        return True

    def accept(
        self, dkey: bytes, value: Any, sender: Any = None, *, source: Any = None, origin: Any = None
    ) -> bool:
        """Store ``value`` under ``dkey`` if it is valid; count it against ``sender``'s quota
        (banned past it). ``source``: the UDP address it came from, whose stores past the
        quota are dropped but never banned (it may be spoofed). ``origin``: who delivered
        it, for the fairness of a full key (default: the sender)."""
        address = _address(sender)
        if address is not None and self._over_quota(address):
            self.refused += 1
            return False
        if source is not None and self._over_quota(("ip", _address(source)), ban=False):
            self.refused += 1
            return False
        address = _address(origin) if origin is not None else address
        if not isinstance(dkey, bytes) or len(dkey) != 20:
            self.refused += 1
            return False
        records, bad = parse_value(value, dkey)
        self.refused += bad
        # What the store serves is the signed bytes: a decoded body can hold ~50x its size
        # in Python objects (lists of empty lists), which over the store's 4096 x 32 records
        # came to gigabytes. Bodies are read again from the bytes where a lookup needs them.
        records = [replace(r, body=_NO_BODY) for r in records]
        if dkey not in self._data:
            per_signer = max(1, MAX_KEYS // SIGNER_SHARE)
            fresh = [r for r in records if self._signer_keys.get(r.peer_id, 0) < per_signer]
            self.refused += len(records) - len(fresh)
            records = fresh
        if not records:
            return False
        if dkey not in self._data and len(self._data) >= MAX_KEYS:
            self._cull()
            if len(self._data) >= MAX_KEYS:
                self.refused += 1
                return False
        kept = self._merge_fairly(dkey, records, address)
        return any(r in kept for r in records)

    def _merge_fairly(self, dkey: bytes, records: list[Record], address: Any) -> list[Record]:
        """One record per signer (highest seq); over the cap, the expired go first, then the
        lowest seq of the address that delivered the most records under this key."""
        origin = dict(self._origin.get(dkey, {}))
        best = {r.peer_id: r for r in self._data.get(dkey, [])}
        for rec in records:
            if rec.peer_id not in best or rec.seq > best[rec.peer_id].seq:
                best[rec.peer_id] = rec
                origin[rec.peer_id] = address
        now = time.time()
        if len(best) > MAX_RECORDS_PER_KEY:
            best = {pid: r for pid, r in best.items() if r.expires > now}
        while len(best) > MAX_RECORDS_PER_KEY:
            counts: dict[Any, int] = {}
            for pid in best:
                counts[origin.get(pid)] = counts.get(origin.get(pid), 0) + 1
            biggest = max(counts, key=lambda a: counts[a])
            victim = min(
                (r for r in best.values() if origin.get(r.peer_id) == biggest), key=lambda r: r.seq
            )
            del best[victim.peer_id]
        kept = sorted(best.values(), key=lambda r: -r.seq)
        self._set(dkey, kept, {pid: origin.get(pid) for pid in best})
        return kept

    def _set(self, dkey: bytes, records: list[Record], origin: dict[str, Any]) -> None:
        """Replace the records under ``dkey``, keeping the per-signer key counts right."""
        before = {r.peer_id for r in self._data.get(dkey, [])}
        after = {r.peer_id for r in records}
        for pid in before - after:
            left = self._signer_keys.get(pid, 1) - 1
            if left > 0:
                self._signer_keys[pid] = left
            else:
                self._signer_keys.pop(pid, None)
        for pid in after - before:
            self._signer_keys[pid] = self._signer_keys.get(pid, 0) + 1
        if records:
            self._data[dkey] = records
            self._origin[dkey] = origin
        else:
            self._data.pop(dkey, None)
            self._origin.pop(dkey, None)

    def records(self, dkey: bytes) -> list[Record]:
        now = time.time()
        records = self._data.get(dkey, [])
        live = [r for r in records if r.expires > now]
        if len(live) != len(records):
            origin = self._origin.get(dkey, {})
            self._set(dkey, live, {r.peer_id: origin.get(r.peer_id) for r in live})
        return live

    def _cull(self) -> None:
        for dkey in list(self._data):
            self.records(dkey)

    # -- IStorage ------------------------------------------------------------------------
    def __setitem__(self, key: bytes, value: Any) -> None:
        self.accept(key, value)

    def __getitem__(self, key: bytes) -> bytes:
        records = self.records(key)
        if not records:
            raise KeyError(key)
        return encode_value(records)

    def get(self, key: bytes, default: Any = None) -> Any:
        records = self.records(key)
        return encode_value(records) if records else default

    def iter_older_than(self, seconds_old: float) -> Iterator[tuple[bytes, bytes]]:
        # Republishing is the owners' job (they re-put before expiry); nothing to do here.
        return iter(())

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        self._cull()
        return iter([(k, encode_value(v)) for k, v in self._data.items() if v])

    def __len__(self) -> int:
        return len(self._data)

    def __bool__(self) -> bool:
        return True  # kademlia's Server does `storage or ForgetfulStorage()`


class MeshDHT(Server):  # type: ignore[misc]
    """The DHT endpoint of one node."""

    protocol_class = _Protocol

    def __init__(
        self, identity: Identity, store: RecordStore | None = None, gate: Gate | None = None
    ) -> None:
        self.identity = identity
        self.gate = gate
        self.store = store or RecordStore()
        super().__init__(
            ksize=20, alpha=3, node_id=node_id_of(identity.peer_id), storage=self.store
        )
        self.host = ""
        self.port = 0

    def _create_protocol(self) -> _Protocol:
        proto: _Protocol = self.protocol_class(
            self.node, self.storage, self.ksize, self.identity, self.gate
        )
        return proto

    @property
    def ignored(self) -> int:
        """Datagrams ignored: unsigned, malformed, or naming an id their key does not give."""
        proto = self.protocol
        return proto.ignored if isinstance(proto, _Protocol) else 0

    @property
    def not_member(self) -> int:
        """Datagrams ignored because the gate does not admit their signer."""
        proto = self.protocol
        return proto.not_member if isinstance(proto, _Protocol) else 0

    async def start(self, host: str, port: int, bootstrap: list[tuple[str, int]]) -> None:
        await self.listen(port, interface=host)
        sockname = self.transport.get_extra_info("sockname")
        self.host, self.port = sockname[0], sockname[1]
        if bootstrap:
            await self.bootstrap(bootstrap)

    async def put(self, raw_record: bytes) -> bool:
        rec = parse_record(raw_record)
        value = encode_value([rec])
        self.store.accept(dht_key(rec.key), value)  # we always hold our own records
        return bool(await self.set_digest(dht_key(rec.key), value))

    async def lookup(self, key: str) -> list[Record]:
        """Valid records under ``key``: ours merged with what the network returns."""
        dkey = dht_key(key)
        records, _ = parse_value(encode_value(self.store.records(dkey)), dkey)  # their bodies
        target = KadNode(dkey)
        nearest = self.protocol.router.find_neighbors(target)
        if nearest:
            crawl = ValueSpiderCrawl(self.protocol, target, nearest, self.ksize, self.alpha)
            found = await crawl.find()
            more, bad = parse_value(found, dkey)
            if bad:
                log.info("ignored %d invalid DHT records under %s", bad, key)
            records += more
        return merge(records)

    async def peer_record(self, peer_id: str) -> Record | None:
        for rec in await self.lookup(f"peer:{peer_id}"):
            if rec.peer_id == peer_id:
                return rec
        return None
