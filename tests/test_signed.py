"""The signed-record helper (mesh/net/signed.py) on its own: every check it promises."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any
from unittest import mock

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import Error
from mesh.net.identity import Identity
from mesh.net.signed import (
    Field,
    Format,
    check_binding,
    check_expiry,
    check_fields,
    check_fresh,
)

from .strategies import ANY

pytestmark = pytest.mark.badinput


class NoteError(Error):
    """A caller's own error class: everything the helper refuses must come out as this."""


NOTE = Format(
    what="note",
    context=b"edgemesh/test-note/v1\x00",
    fields=(
        Field("v", int, choices=(1,)),
        Field("from", str),
        Field("pk", bytes),
        Field("nonce", bytes, size=8),
        Field("time", float),
        Field("body", dict),
    ),
    error=NoteError,
    max_size=512,
)
A, B = Identity.generate(), Identity.generate()


def values(who: Identity = A, **changes: Any) -> list[Any]:
    fields = {"v": 1, "from": who.peer_id, "pk": who.public_key, "nonce": b"n" * 8}
    fields.update({"time": time.time(), "body": {"x": 1}}, **changes)
    return [fields[f.name] for f in NOTE.fields]


def resign(items: list[Any], who: Identity = A) -> bytes:
    """A record whose signature is genuine over whatever ``items`` holds."""
    return bytes(msgpack.packb([*items, NOTE.sign(who, items)], use_bin_type=True))


def test_roundtrip() -> None:
    raw = NOTE.make(A, values())
    rec = NOTE.parse(raw)
    assert rec.signer == A.peer_id and rec.public_key == A.public_key and rec.raw == raw
    assert rec.fields["body"] == {"x": 1} and rec.fields["nonce"] == b"n" * 8


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_tampered_byte_is_refused(data: st.DataObject) -> None:
    raw = bytearray(NOTE.make(A, values()))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(NoteError):
        NOTE.parse(bytes(raw))


def test_tampered_field_and_signature_fail_verification() -> None:
    items = msgpack.unpackb(NOTE.make(A, values()))
    items[5] = {"x": 2}
    with pytest.raises(NoteError, match="bad signature"):
        NOTE.parse(msgpack.packb(items))
    items = msgpack.unpackb(NOTE.make(A, values()))
    items[-1] = b"\0" * 64
    with pytest.raises(NoteError, match="bad signature"):
        NOTE.parse(msgpack.packb(items))


def test_signature_of_another_context_does_not_verify() -> None:
    other = dataclasses.replace(NOTE, context=b"edgemesh/other/v1\x00")
    with pytest.raises(NoteError, match="bad signature"):
        NOTE.parse(other.make(A, values()))


def test_id_must_be_the_hash_of_the_key() -> None:
    # B signs honestly but claims A's id: the signature verifies, the binding does not
    with pytest.raises(NoteError, match="not the hash of its key"):
        NOTE.parse(resign(values(B, **{"from": A.peer_id}), B))
    with pytest.raises(NoteError, match="32 bytes"):
        NOTE.parse(resign(values(pk=b"short")))
    with pytest.raises(NoteError, match="does not match its public key"):
        check_binding(B.public_key, A.peer_id, NoteError, "hello")


def test_oversized_input_is_refused_before_decoding() -> None:
    with mock.patch("mesh.net.signed.msgpack.unpackb") as unpack:
        with pytest.raises(NoteError, match="exceeds"):
            NOTE.parse(b"\x91" + b"\xc0" * 512)
        unpack.assert_not_called()
    with pytest.raises(NoteError, match="exceeds"):
        NOTE.make(A, values(body={"x": "y" * 600}))


def test_declared_lengths_past_the_cap_are_not_allocated() -> None:
    # a bin header that declares 4 GiB in a 5-byte input: refused by the decoder's caps
    with pytest.raises(NoteError, match="malformed"):
        NOTE.parse(b"\xc6\xff\xff\xff\xff")
    with pytest.raises(NoteError, match="malformed"):
        NOTE.parse(b"\xdd\x00\x01\x00\x00")  # an array of 65536 items


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"v": 2}, "v 2 is not one of"),
        ({"v": True}, "int v"),
        ({"from": b"x"}, "str from"),
        ({"pk": "k"}, "bytes pk"),
        ({"nonce": b"n" * 7}, "8-byte nonce"),
        ({"time": "now"}, "float time"),
        ({"time": math.nan}, "finite"),
        ({"time": math.inf}, "finite"),
        ({"body": [1]}, "dict body"),
    ],
)
def test_wrong_types_are_refused_even_when_signed(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(NoteError, match=match):
        NOTE.parse(resign(values(**changes)))


def test_wrong_shape_and_non_bytes() -> None:
    with pytest.raises(NoteError, match="list of 7 fields"):
        NOTE.parse(msgpack.packb(values()))
    with pytest.raises(NoteError, match="must be bytes"):
        NOTE.parse("text")
    with pytest.raises(NoteError, match="carries no signature"):
        NOTE.parse(msgpack.packb([*values(), "sig"]))
    with pytest.raises(NoteError, match="must have 1 fields"):
        check_fields((Field("x", int),), [], NoteError, "thing")


def test_stale_and_future_times() -> None:
    now = time.time()
    check_fresh(now - 59, now, max_age=60, max_ahead=60, error=NoteError, what="note")
    for ts in (now - 61, now + 61, math.nan):
        with pytest.raises(NoteError, match="stale"):
            check_fresh(ts, now, max_age=60, max_ahead=60, error=NoteError, what="note")
    check_expiry(now + 10, now, max_ttl=60, error=NoteError, what="record")
    with pytest.raises(NoteError, match="expired"):
        check_expiry(now, now, max_ttl=60, error=NoteError, what="record")
    for expires in (now + 61, math.inf, math.nan):
        with pytest.raises(NoteError, match="future"):
            check_expiry(expires, now, max_ttl=60, error=NoteError, what="record")


def test_a_format_needs_signer_and_key_fields() -> None:
    with pytest.raises(ValueError, match="signer"):
        Format("bad", b"c", (Field("from", bytes), Field("pk", bytes)), NoteError, 64)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=600),
        st.lists(ANY, max_size=8).map(lambda items: msgpack.packb(items)),
        ANY,
    )
)
def test_fuzz_only_the_callers_error_escapes(raw: Any) -> None:
    try:
        NOTE.parse(raw)
    except NoteError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(NOTE.fields) - 1), ANY)
def test_fuzz_one_signed_field_replaced(index: int, value: Any) -> None:
    """A genuine signature over a field the signer chose freely: either refused with the
    caller's error, or accepted with that field of its declared type."""
    items = values()
    items[index] = value
    rec = None
    try:
        rec = NOTE.parse(resign(items))
    except NoteError:
        pass
    field = NOTE.fields[index]
    if rec is not None:
        got = rec.fields[field.name]
        kinds = (int, float) if field.kind is float else field.kind
        assert type(got) is not bool and isinstance(got, kinds)
        if field.kind is float:
            assert math.isfinite(got)
