"""DHT datagrams signed by their sender's key, so that a contact's node id is its key's.

kademlia (through rpcudp) sends ``type(1) + msg_id(20) + msgpack`` datagrams in which the
sender names any node id it likes: an attacker could choose ids next to a key and eclipse it.
Ours wrap the same inner bytes: ``b"\\x02" + pk(32) + sig(64) + n(1) + cert(n) + inner``,
the Ed25519 signature over a context, the certificate and ``inner``. The sender's node id
is the first 20 bytes of SHA-256 of ``pk`` (the bytes behind its peer id), so nobody can
pick an id without finding a key for it. A request whose node id is not its signer's is
refused (:func:`parse_request`); the protocol ignores an answer from a key other than the
one of the id it asked.

A datagram also carries its sender's member certificate (``len(1) + cert`` after the
signature, signed with the rest), so a node of a private mesh answers members only.

The parsers are pure functions; everything they refuse raises
:class:`~mesh.errors.DiscoveryError`. ``_Protocol`` is kademlia's protocol speaking these
datagrams (:class:`mesh.discovery.dht.MeshDHT` runs it).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
from kademlia.node import Node as KadNode
from kademlia.protocol import KademliaProtocol

from mesh.errors import DiscoveryError, IdentityError, NotAMember
from mesh.net.handshake import Gate
from mesh.net.identity import Identity, peer_id_from_key, verify
from mesh.net.wire import check_depth

__all__ = [
    "Datagram",
    "REQUEST",
    "RESPONSE",
    "seal_datagram",
    "open_datagram",
    "request_id",
    "parse_request",
    "parse_answer",
    "node_id_of_key",
]

log = logging.getLogger(__name__)
MAX_RECORD = 1024  # bytes of one DHT record (mesh.discovery.dht)
MAX_RECORDS_PER_KEY = 32
MAX_VALUE = MAX_RECORDS_PER_KEY * MAX_RECORD + 64
MAX_DATAGRAM = MAX_VALUE + 1024
MAX_VERIFYING = 64  # unverified DHT contacts being pinged back at once
# A request's 20-byte message id starts with its sending time (ms, 8 bytes big-endian), which
# its signature covers: one outside MAX_SKEW of our clock is refused, and one seen within it
# is a replay (a captured datagram sent again, from any source address), refused too.
MAX_SKEW = 60.0
MAX_SEEN = 16384  # request ids remembered (the newest; each is good for 2 x MAX_SKEW)
# 3: requests' ids carry their time (MAX_SKEW below). A node of version 2 sends random ids,
# which this version would refuse as stale: its datagrams are refused as another version's.
MAGIC = b"\x03"
REQUEST, RESPONSE = 0, 1
_KEY, _SIG, _MSG_ID = 32, 64, 20
_HEADER = 1 + _KEY + _SIG
_CONTEXT = b"edgemesh/dht-datagram/v1\x00"
# The RPCs a node answers, and how many arguments each takes (the first is the sender's id).
ARITY = {"ping": 1, "store": 3, "find_node": 2, "find_value": 2}
MAX_CONTACTS = 64  # contacts in one find answer (kademlia sends ksize = 20)
MAX_CERT = 255  # bytes of the certificate a datagram carries (the policy caps it further)


@dataclass(frozen=True)
class Datagram:
    sender: bytes  # the node id the signing key gives
    peer_id: str  # the peer id of the signing key
    kind: int  # REQUEST or RESPONSE
    msg_id: bytes
    body: Any
    cert: bytes | None  # the member certificate it carried


def node_id_of_key(public_key: bytes) -> bytes:
    """The node id of a key: the 20 bytes behind its peer id."""
    return hashlib.sha256(public_key).digest()[:20]


def seal_datagram(
    identity: Identity, kind: int, msg_id: bytes, body: Any, cert: bytes | None = None
) -> bytes:
    cert = cert or b""
    if len(cert) > MAX_CERT:
        raise DiscoveryError(f"a certificate of {len(cert)} bytes does not fit a datagram")
    inner = bytes([kind]) + msg_id + bytes(msgpack.packb(body, use_bin_type=True))
    signed = bytes([len(cert)]) + cert + inner
    return MAGIC + identity.public_key + identity.sign(_CONTEXT + signed) + signed


def open_datagram(data: bytes, max_value: int) -> Datagram:
    """Check the signature of a datagram (its size already capped) and decode its body."""
    if len(data) < _HEADER + 2 + _MSG_ID or data[:1] != MAGIC:
        raise DiscoveryError("not a signed DHT datagram")
    pk, sig, signed = data[1 : 1 + _KEY], data[1 + _KEY : _HEADER], data[_HEADER:]
    try:
        verify(pk, _CONTEXT + signed, sig)
    except IdentityError:
        raise DiscoveryError("DHT datagram with a bad signature") from None
    cert, inner = signed[1 : 1 + signed[0]], signed[1 + signed[0] :]
    if len(inner) < 1 + _MSG_ID:
        raise DiscoveryError("DHT datagram too short for its certificate")
    kind = inner[0]
    if kind not in (REQUEST, RESPONSE):
        raise DiscoveryError(f"DHT datagram of unknown type {kind}")
    try:
        body = msgpack.unpackb(
            inner[1 + _MSG_ID :],
            raw=False,
            max_bin_len=max_value,
            max_str_len=64,
            max_array_len=MAX_CONTACTS,
            max_map_len=1,
            max_ext_len=0,
        )
    except Exception:  # msgpack raises several unrelated types on bad input
        raise DiscoveryError("malformed DHT datagram body") from None
    check_depth(body, DiscoveryError, "DHT datagram body")
    return Datagram(
        node_id_of_key(pk), peer_id_from_key(pk), kind, inner[1 : 1 + _MSG_ID], body, cert or None
    )


def request_id(now: float | None = None) -> bytes:
    """A request's message id: its sending time (ms) and 12 random bytes."""
    ms = int((time.time() if now is None else now) * 1000)
    return ms.to_bytes(8, "big") + os.urandom(_MSG_ID - 8)


def parse_request(dg: Datagram) -> tuple[str, list[Any]]:
    """The RPC name and arguments of a request whose node id is its signer's."""
    body = dg.body
    if not isinstance(body, list) or len(body) != 2:
        raise DiscoveryError("DHT request is not [name, args]")
    name, args = body
    if not isinstance(name, str) or name not in ARITY:
        raise DiscoveryError(f"unknown DHT request {name!r}")
    if not isinstance(args, list) or len(args) != ARITY[name]:
        raise DiscoveryError(f"DHT {name} with the wrong arguments")
    if args[0] != dg.sender:
        raise DiscoveryError(f"DHT {name} claims a node id its signing key does not give")
    if name != "ping" and not (isinstance(args[1], bytes) and len(args[1]) == 20):
        raise DiscoveryError(f"DHT {name} for a key that is not 20 bytes")
    return name, args


def parse_answer(name: str, dg: Datagram) -> Any:
    """The answer to our ``name`` request, cleaned: contacts that do not parse are dropped."""
    body = dg.body
    if name == "ping":
        if body != dg.sender:
            raise DiscoveryError("DHT ping answered with a node id its signing key does not give")
        return body
    if name == "store":
        if not isinstance(body, bool):
            raise DiscoveryError("DHT store answer is not a bool")
        return body
    if name == "find_value" and isinstance(body, dict):
        if not isinstance(body.get("value"), bytes):
            raise DiscoveryError("DHT value answer without bytes")
        return {"value": body["value"]}
    if not isinstance(body, list):
        raise DiscoveryError(f"DHT {name} answer is not a list of contacts")
    return [c for c in (_contact(item) for item in body) if c is not None]


def _contact(item: Any) -> tuple[bytes, str, int] | None:
    if not isinstance(item, list) or len(item) != 3:
        return None
    node_id, ip, port = item
    if not isinstance(node_id, bytes) or len(node_id) != 20 or not isinstance(ip, str):
        return None
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        return None
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return None
    return node_id, ip, port


class Storage(Protocol):
    """What the protocol needs of the record store (mesh.discovery.dht.RecordStore)."""

    def is_banned(self, sender: Any) -> bool: ...

    def accept(
        self, dkey: bytes, value: Any, sender: Any = None, *, source: Any = None, origin: Any = None
    ) -> bool: ...


@dataclass
class _Call:
    """One request of ours awaiting its answer."""

    future: asyncio.Future[tuple[bool, Any]]
    timer: asyncio.TimerHandle
    name: str
    expect: bytes | None  # the node id whose key must sign the answer (None: any key's)


class _Protocol(KademliaProtocol):  # type: ignore[misc]
    """kademlia's protocol over signed datagrams (:mod:`mesh.discovery.dhtwire`): every
    request names its signer's node id, every answer comes from the key of the id asked."""

    storage: Storage

    def __init__(
        self,
        source_node: KadNode,
        storage: Storage,
        ksize: int,
        identity: Identity,
        gate: Gate | None = None,
    ) -> None:
        super().__init__(source_node, storage, ksize)
        self.identity = identity
        self.gate = gate  # the membership policy: only its members are heard (None: anyone)
        self.not_member = 0  # datagrams of peers the gate does not admit
        # rpcudp waits 5 s for a reply; one dead contact would stall every lookup that long.
        self._wait_timeout = 2.0
        self._verifying: set[tuple[str, int]] = set()
        self._calls: dict[bytes, _Call] = {}
        self.ignored = 0  # datagrams unsigned, malformed, or naming an id not their key's
        self.replayed = 0  # requests refused as stale or seen already
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # request id -> when it came

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) > MAX_DATAGRAM:
            # Dropped without penalty: UDP source addresses can be spoofed, and a ban here
            # would let anyone cut an honest contact off.
            log.debug("dropped a DHT datagram of %d bytes from %s", len(data), addr)
            self.ignored += 1
            return
        asyncio.ensure_future(self._guarded(data, addr))

    def welcome_if_new(self, node: KadNode) -> None:
        """A request came from ``node``: its address is unverified (UDP), so ping it back and
        welcome it (routing table, the records it should hold) only once it answers."""
        if not self.router.is_new_node(node) or len(self._verifying) >= MAX_VERIFYING:
            return
        address = (node.ip, node.port)
        if address in self._verifying:
            return
        self._verifying.add(address)
        task = asyncio.ensure_future(self._verify(node, address))
        task.add_done_callback(lambda _: self._verifying.discard(address))

    async def _verify(self, node: KadNode, address: tuple[str, int]) -> None:
        result = await self.ping(address, self.source_node.id)
        if result[0] and result[1] == node.id:
            KademliaProtocol.welcome_if_new(self, node)

    def handle_call_response(self, result: Any, node: KadNode) -> Any:
        # An answer to our own request: the address is verified, welcome it at once.
        if not result[0]:
            log.info("no response from %s, removing from router", node)
            self.router.remove_contact(node)
            return result
        KademliaProtocol.welcome_if_new(self, node)
        return result

    async def _guarded(self, data: bytes, addr: Any) -> None:
        try:
            await self._solve_datagram(data, addr)
        except Exception as exc:  # a handler failing on a peer's arguments
            log.debug("DHT datagram from %s failed: %r", addr, exc)

    async def _solve_datagram(self, data: bytes, address: Any) -> None:
        try:
            dg = open_datagram(data, MAX_VALUE)
            if dg.kind == REQUEST:
                name, args = parse_request(dg)
        except DiscoveryError as exc:
            self.ignored += 1
            log.debug("ignored a DHT datagram from %s: %s", address, exc)
            return
        # Bans and quotas are the signer's: a UDP source address can be spoofed, and one
        # banned for a flood sent in its name (or replayed from it) cut an honest contact off.
        if self.storage.is_banned(dg.peer_id) or not self._admitted(dg):
            return
        if dg.kind == RESPONSE:
            self._answered(dg)
            return
        if not self._fresh(dg.msg_id):
            self.replayed += 1
            log.debug("ignored a stale or replayed DHT %s from %s", name, address)
            return
        if name == "store":
            nodeid, key, value = args
            response: Any = self.rpc_store(address, nodeid, key, value, signer=dg.peer_id)
        else:
            response = getattr(self, f"rpc_{name}")(address, *args)
        if asyncio.iscoroutine(response):
            response = await response
        self.transport.sendto(self._seal(RESPONSE, dg.msg_id, response), address)

    def _fresh(self, msg_id: bytes) -> bool:
        """Whether a request's id is from within MAX_SKEW and not seen before (noted)."""
        now = time.time()
        sent = int.from_bytes(msg_id[:8], "big") / 1000
        if abs(now - sent) > MAX_SKEW or msg_id in self._seen:
            return False
        while self._seen and next(iter(self._seen.values())) < now - 2 * MAX_SKEW:
            self._seen.popitem(last=False)
        if len(self._seen) >= MAX_SEEN:
            # Full of ids still good for a replay: evicting one would let a flood of cheap
            # pings reopen the window for a captured store, so the new request waits.
            return False
        self._seen[msg_id] = now
        return True

    def _seal(self, kind: int, msg_id: bytes, body: Any) -> bytes:
        cert = self.gate.credential if self.gate is not None else None
        return seal_datagram(self.identity, kind, msg_id, body, cert)

    def _admitted(self, dg: Datagram) -> bool:
        """Whether the gate admits the signer: a member known already (a dict lookup), or
        one whose certificate, carried by this datagram, verifies."""
        gate = self.gate
        if gate is None or gate.still_admits(dg.peer_id):
            return True
        try:
            gate.admit(dg.peer_id, dg.cert)
        except NotAMember as exc:
            self.not_member += 1
            log.debug("ignored a DHT datagram of %s: %s", dg.peer_id[:12], exc)
            return False
        return True

    def _answered(self, dg: Datagram) -> None:
        call = self._calls.pop(dg.msg_id, None)
        if call is None:
            return
        call.timer.cancel()
        try:
            if call.expect is not None and dg.sender != call.expect:
                raise DiscoveryError("answered by a key that does not give the id asked")
            result: tuple[bool, Any] = (True, parse_answer(call.name, dg))
        except DiscoveryError as exc:
            self.ignored += 1
            log.debug("DHT %s answer refused: %s", call.name, exc)
            result = (False, None)
        if not call.future.done():
            call.future.set_result(result)

    def _request(
        self, address: Any, name: str, args: tuple[Any, ...], expect: bytes | None
    ) -> asyncio.Future[tuple[bool, Any]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        msg_id = request_id()
        data = self._seal(REQUEST, msg_id, [name, list(args)])
        if len(data) > MAX_DATAGRAM:
            future.set_result((False, None))  # the receiver would drop it
            return future
        timer = loop.call_later(self._wait_timeout, self._expired, msg_id)
        self._calls[msg_id] = _Call(future, timer, name, expect)
        self.transport.sendto(data, address)
        return future

    def _expired(self, msg_id: bytes) -> None:
        call = self._calls.pop(msg_id, None)
        if call is not None and not call.future.done():
            call.future.set_result((False, None))

    # The requests kademlia makes (rpcudp would build them by name, unsigned).
    def ping(self, address: Any, nodeid: bytes) -> asyncio.Future[tuple[bool, Any]]:
        return self._request(address, "ping", (nodeid,), None)

    def store(self, address: Any, *args: Any) -> asyncio.Future[tuple[bool, Any]]:
        return self._request(address, "store", args, None)

    def find_node(self, address: Any, *args: Any) -> asyncio.Future[tuple[bool, Any]]:
        return self._request(address, "find_node", args, None)

    def find_value(self, address: Any, *args: Any) -> asyncio.Future[tuple[bool, Any]]:
        return self._request(address, "find_value", args, None)

    async def _call(self, node: KadNode, name: str, *args: Any) -> Any:
        """Ask a contact: its answer must be signed by the key its id was derived from."""
        me = self.source_node.id
        result = await self._request((node.ip, node.port), name, (me, *args), node.id)
        return self.handle_call_response(result, node)

    async def call_ping(self, node_to_ask: KadNode) -> Any:
        return await self._call(node_to_ask, "ping")

    async def call_store(self, node_to_ask: KadNode, key: bytes, value: bytes) -> Any:
        return await self._call(node_to_ask, "store", key, value)

    async def call_find_node(self, node_to_ask: KadNode, node_to_find: KadNode) -> Any:
        return await self._call(node_to_ask, "find_node", node_to_find.id)

    async def call_find_value(self, node_to_ask: KadNode, node_to_find: KadNode) -> Any:
        return await self._call(node_to_ask, "find_value", node_to_find.id)

    def rpc_store(
        self, sender: Any, nodeid: Any, key: Any, value: Any, signer: str | None = None
    ) -> bool:
        """Store for ``signer`` (the request's key; its quota), from ``sender`` (address)."""
        if not isinstance(nodeid, bytes) or len(nodeid) != 20:
            return False
        self.welcome_if_new(KadNode(nodeid, sender[0], sender[1]))
        if signer is None:
            return self.storage.accept(key, value, sender)
        # A full key displaces records of whoever delivered the most: a member's key where
        # a gate admits members, the address where keys are free (an open mesh's Sybils).
        origin = signer if self.gate is not None else sender
        return self.storage.accept(key, value, signer, source=sender, origin=origin)
