"""DHT datagrams signed by their sender's key, so that a contact's node id is its key's.

kademlia (through rpcudp) sends ``type(1) + msg_id(20) + msgpack`` datagrams in which the
sender names any node id it likes: an attacker could choose ids next to a key and eclipse it.
Ours wrap the same inner bytes: ``b"\\x02" + pk(32) + sig(64) + inner``, the Ed25519
signature over a context and ``inner``. The sender's node id is the first 20 bytes of SHA-256
of ``pk`` (the bytes behind its peer id), so nobody can pick an id without finding a key for
it. A request whose node id is not its signer's is refused (:func:`parse_request`); the
protocol ignores an answer from a key other than the one of the id it asked.

Pure functions; everything they refuse raises :class:`~mesh.errors.DiscoveryError`.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Any

import msgpack

from mesh.errors import DiscoveryError, IdentityError
from mesh.net.identity import Identity, verify

__all__ = [
    "Datagram",
    "REQUEST",
    "RESPONSE",
    "seal_datagram",
    "open_datagram",
    "parse_request",
    "parse_answer",
    "node_id_of_key",
]

MAGIC = b"\x02"
REQUEST, RESPONSE = 0, 1
_KEY, _SIG, _MSG_ID = 32, 64, 20
_HEADER = 1 + _KEY + _SIG
_CONTEXT = b"edgemesh/dht-datagram/v1\x00"
# The RPCs a node answers, and how many arguments each takes (the first is the sender's id).
ARITY = {"ping": 1, "store": 3, "find_node": 2, "find_value": 2}
MAX_CONTACTS = 64  # contacts in one find answer (kademlia sends ksize = 20)


@dataclass(frozen=True)
class Datagram:
    sender: bytes  # the node id the signing key gives
    kind: int  # REQUEST or RESPONSE
    msg_id: bytes
    body: Any


def node_id_of_key(public_key: bytes) -> bytes:
    """The node id of a key: the 20 bytes behind its peer id."""
    return hashlib.sha256(public_key).digest()[:20]


def seal_datagram(identity: Identity, kind: int, msg_id: bytes, body: Any) -> bytes:
    inner = bytes([kind]) + msg_id + bytes(msgpack.packb(body, use_bin_type=True))
    return MAGIC + identity.public_key + identity.sign(_CONTEXT + inner) + inner


def open_datagram(data: bytes, max_value: int) -> Datagram:
    """Check the signature of a datagram (its size already capped) and decode its body."""
    if len(data) < _HEADER + 1 + _MSG_ID or data[:1] != MAGIC:
        raise DiscoveryError("not a signed DHT datagram")
    pk, sig, inner = data[1 : 1 + _KEY], data[1 + _KEY : _HEADER], data[_HEADER:]
    try:
        verify(pk, _CONTEXT + inner, sig)
    except IdentityError:
        raise DiscoveryError("DHT datagram with a bad signature") from None
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
    return Datagram(node_id_of_key(pk), kind, inner[1 : 1 + _MSG_ID], body)


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
