"""Signed, capped records: the one way to make and to check what a peer signs for others.

DHT records, signaling envelopes, mDNS announcements and the handshake all carry a peer's
claim, so they share the same hazards; the checks live here once, in this order:

1. the size cap, before anything is decoded (nothing the sender declares is allocated first);
2. msgpack decoding with every string, bin and container capped as well;
3. the shape: the number of fields and each field's type (some also an exact size or a fixed
   set of values), since verification needs the key and the signature as bytes;
4. the binding of the claimed peer id to the enclosed key (an id is its key's hash);
5. the Ed25519 signature over a domain-separation context plus the canonical msgpack of the
   fields in wire order. The decoded fields are encoded again, so a record that was not
   encoded canonically fails, and no two encodings of one claim both verify.

Only then do the fields reach the caller, who checks what they mean (times with
:func:`check_fresh` or :func:`check_expiry`, addressees, where a record may live). Every failure
raises the caller's own error class with a message that says what failed, so each layer keeps
its error type.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from mesh.errors import Error, IdentityError
from mesh.net.identity import Identity, peer_id_from_key, verify
from mesh.net.wire import check_depth

__all__ = [
    "Field",
    "Format",
    "Signed",
    "check_binding",
    "check_expiry",
    "check_fields",
    "check_fresh",
    "signed_bytes",
    "verify_signature",
]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_MIN_INT, _MAX_INT = -(1 << 63), 1 << 64  # msgpack's integers


@dataclass(frozen=True)
class Field:
    """One field of a record: its name and type, and optionally an exact size or fixed values.

    ``int`` means an int and not a bool; ``float`` a finite float or int (msgpack keeps whole
    numbers as ints); other types are checked with isinstance.
    """

    name: str
    kind: type
    size: int | None = None
    choices: tuple[Any, ...] = ()

    def describe(self) -> str:
        return f"{self.size}-byte {self.name}" if self.size else f"{self.kind.__name__} {self.name}"

    def _has_kind(self, value: Any) -> bool:
        if self.kind is int:
            return type(value) is int
        if self.kind is float:
            return type(value) in (int, float)
        return isinstance(value, self.kind)

    def check(self, value: Any, error: type[Error], what: str) -> None:
        if not self._has_kind(value) or (self.size is not None and len(value) != self.size):
            raise error(f"{what} carries no {self.describe()}")
        if self.kind is float and not math.isfinite(value):
            raise error(f"{what} {self.name} is not a finite number")
        if type(value) is int and not _MIN_INT <= value < _MAX_INT:
            # msgpack carries no more: from a text (an mDNS TXT value) a bigger one raised
            # OverflowError where its signature's bytes are built, before any check
            raise error(f"{what} {self.name} is out of range")
        if self.choices and value not in self.choices:
            raise error(f"{what} {self.name} {_short(value)} is not one of {self.choices}")


def check_fields(
    fields: Sequence[Field], values: Sequence[Any], error: type[Error], what: str
) -> dict[str, Any]:
    """The values by field name, each checked against its field (``error`` at the first bad)."""
    if len(values) != len(fields):
        raise error(f"{what} must have {len(fields)} fields")
    for field, value in zip(fields, values, strict=True):
        field.check(value, error, what)
    return {f.name: v for f, v in zip(fields, values, strict=True)}


def signed_bytes(context: bytes, values: Sequence[Any]) -> bytes:
    """What is signed: the context, then the canonical msgpack of the values in order."""
    return context + bytes(msgpack.packb(list(values), use_bin_type=True))


def check_binding(public_key: bytes, peer_id: str, error: type[Error], what: str) -> None:
    """``peer_id`` is the hash of ``public_key``: nobody can claim another peer's id."""
    try:
        derived = peer_id_from_key(public_key)
    except IdentityError as exc:
        raise error(f"{what}: {exc}") from None
    if derived != peer_id:
        raise error(
            f"{what}: peer id {peer_id[:12]} does not match its public key "
            f"(it is not the hash of its key, {derived[:12]})"
        )


def verify_signature(
    public_key: bytes,
    data: bytes,
    signature: bytes,
    error: type[Error],
    what: str,
    message: str | None = None,
) -> None:
    """Raise ``error(message)`` (by default ``"WHAT: bad signature"``) unless it verifies."""
    try:
        verify(public_key, data, signature)
    except IdentityError as exc:
        raise error(message or f"{what}: {exc}") from None


def check_fresh(
    ts: float, now: float, *, max_age: float, max_ahead: float, error: type[Error], what: str
) -> None:
    """``ts`` is at most ``max_age`` seconds old and ``max_ahead`` seconds ahead of ``now``."""
    if not math.isfinite(ts) or now - ts > max_age or ts - now > max_ahead:
        raise error(f"{what} is {now - ts:+.0f} s off (stale)")


def check_expiry(
    expires: float, now: float, *, max_ttl: float, error: type[Error], what: str
) -> None:
    """``expires`` is after ``now`` and at most ``max_ttl`` seconds after it."""
    if not math.isfinite(expires) or expires > now + max_ttl:
        raise error(f"{what} expiry too far in the future")
    if expires <= now:
        raise error(f"{what} expired {now - expires:.0f} s ago")


@dataclass(frozen=True)
class Signed:
    """A record whose shape, key binding and signature were checked, by field name."""

    fields: dict[str, Any]
    signer: str
    public_key: bytes
    raw: bytes


@dataclass(frozen=True)
class Format:
    """The wire layout of one kind of signed record: ``msgpack([*fields, signature])``.

    ``what`` names the record in error messages, ``context`` separates its signatures from
    every other kind's, ``signer`` and ``key`` name the fields with the claimed peer id and the
    public key, ``max_size`` caps the encoded record and ``max_items`` each container in it.
    """

    what: str
    context: bytes
    fields: tuple[Field, ...]
    error: type[Error]
    max_size: int
    signer: str = "from"
    key: str = "pk"
    max_items: int = 64

    def __post_init__(self) -> None:
        kinds = {f.name: f.kind for f in self.fields}
        if kinds.get(self.signer) is not str or kinds.get(self.key) is not bytes:
            raise ValueError(f"{self.what}: the signer must be a str field, the key bytes")

    def signed_bytes(self, values: Sequence[Any]) -> bytes:
        return signed_bytes(self.context, values)

    def sign(self, identity: Identity, values: Sequence[Any]) -> bytes:
        """The detached signature over ``values`` (for formats not carried as one list)."""
        return identity.sign(self.signed_bytes(values))

    def make(self, identity: Identity, values: Sequence[Any]) -> bytes:
        """The record on the wire; refused (``error``) if it exceeds ``max_size``."""
        raw = bytes(msgpack.packb([*values, self.sign(identity, values)], use_bin_type=True))
        if len(raw) > self.max_size:
            raise self.error(f"{self.what} of {len(raw)} bytes exceeds {self.max_size}")
        return raw

    def parse(self, raw: Any) -> Signed:
        """Cap, decode, check the shape, the key binding and the signature (pure)."""
        if not isinstance(raw, bytes):
            raise self.error(f"{self.what} must be bytes")
        if len(raw) > self.max_size:
            raise self.error(f"{self.what} of {len(raw)} bytes exceeds {self.max_size}")
        try:
            items = msgpack.unpackb(
                raw,
                raw=False,
                max_str_len=self.max_size,
                max_bin_len=self.max_size,
                max_array_len=self.max_items,
                max_map_len=self.max_items,
                max_ext_len=0,
            )
        except Exception as exc:  # msgpack raises a handful of types for bad input
            raise self.error(f"malformed {self.what}: {type(exc).__name__}") from None
        check_depth(items, self.error, self.what)
        if not isinstance(items, list) or len(items) != len(self.fields) + 1:
            raise self.error(f"{self.what} must be a list of {len(self.fields) + 1} fields")
        return self.check(items[:-1], items[-1], raw)

    def check(self, values: Sequence[Any], signature: Any, raw: bytes = b"") -> Signed:
        """Check decoded ``values`` and their ``signature`` (for layouts other than a list)."""
        named = check_fields(self.fields, values, self.error, self.what)
        if not isinstance(signature, bytes):
            raise self.error(f"{self.what} carries no signature")
        signer, key = named[self.signer], named[self.key]
        check_binding(key, signer, self.error, self.what)
        data = self.signed_bytes(values)
        verify_signature(key, data, signature, self.error, f"{self.what} from {signer[:12]}")
        return Signed(named, signer, key, raw)
