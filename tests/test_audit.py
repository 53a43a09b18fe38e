"""Unit tests of the spot-check evidence: signed steps, bounded audit logs, their parser,
the comparisons, bans (bounded, persisted, applied to records)."""

from __future__ import annotations

import math
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import IdentityError
from mesh.inference.audit import (
    AuditEntry,
    AuditError,
    AuditLog,
    pack_entries,
    relative_error,
    step_message,
    token_deviation,
    unpack_entries,
)
from mesh.inference.verify import VerifyParams
from mesh.net.connections import ConnectionParams
from mesh.net.identity import Identity, verify
from mesh.node import Node, NodeConfig


def entries(n: int, d: int = 4) -> list[AuditEntry]:
    out, pos = [], 0
    for i in range(n):
        rows = 3 if i == 0 else 1
        pos += rows
        out.append(AuditEntry(pos, rows, bytes(4 * rows * d), bytes(64)))
    return out


def test_step_signature_binds_session_position_and_bytes() -> None:
    ident = Identity.generate()
    body = np.arange(8, dtype="<f4").tobytes()
    sig = ident.sign(step_message("ab" * 8, 12, 1, body))
    verify(ident.public_key, step_message("ab" * 8, 12, 1, body), sig)
    for other in (
        step_message("cd" * 8, 12, 1, body),  # another session: no replay across sessions
        step_message("ab" * 8, 13, 1, body),  # another position: no reordering
        step_message("ab" * 8, 12, 1, body[:-1] + b"\x01"),  # altered bytes
    ):
        with pytest.raises(IdentityError):
            verify(ident.public_key, other, sig)


def test_audit_log_is_bounded_and_flags_overflow() -> None:
    log = AuditLog(max_bytes=1000)
    for e in entries(100, d=16):
        log.add(e)
    assert log.size <= 1000 and log.overflowed
    with pytest.raises(AuditError, match="incomplete"):
        unpack_entries(pack_entries(log.entries, log.overflowed))


def test_audit_log_round_trip_and_replayed_positions_replace_the_tail() -> None:
    log = AuditLog()
    es = entries(5)
    for e in es:
        log.add(e)
    log.add(es[2])  # a replayed step: what came after it is dropped
    assert [e.pos for e in log.entries] == [3, 4, 5]
    got = unpack_entries(pack_entries(log.upto(4), False))
    assert [e.pos for e in got] == [3, 4]


@pytest.mark.parametrize(
    "mangle, match",
    [
        (lambda es: es[1:], "position 0"),  # a history that skips its start
        (lambda es: [es[0], es[2]], "contiguous"),  # a gap
        (lambda es: [es[1], es[0]], "contiguous"),  # reordered
    ],
)
def test_incomplete_or_reordered_logs_are_refused(mangle, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AuditError, match=match):
        unpack_entries(pack_entries(mangle(entries(4)), False))


def test_oversized_audit_reply_is_refused_before_parsing() -> None:
    with pytest.raises(AuditError, match="exceeds"):
        unpack_entries(b"\x00" * 100, max_bytes=99)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_unpack_entries_raises_only_audit_error(data: bytes) -> None:
    try:
        unpack_entries(data)
    except AuditError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.lists(
            st.one_of(st.integers(-5, 1 << 41), st.binary(max_size=80), st.none()), max_size=5
        ),
        max_size=6,
    ),
    st.booleans(),
)
def test_fuzz_structured_audit_replies(items: list[list[object]], complete: bool) -> None:
    data = msgpack.packb({"entries": items, "overflowed": False}, use_bin_type=True)
    try:
        got = unpack_entries(data, complete=complete)
    except AuditError:
        return
    for a, b in zip(got, got[1:], strict=False):
        assert b.pos - b.n == a.pos


def test_relative_error_and_token_deviation() -> None:
    ref = np.linspace(-1, 1, 64, dtype=np.float32)
    assert relative_error(ref, ref) == 0.0
    assert 0.09 < relative_error(ref, ref * 1.1) < 0.11
    assert relative_error(ref, ref[:32]) == math.inf
    assert relative_error(ref, np.full_like(ref, np.nan)) == math.inf
    top = [(5, 10.0), (7, 9.0), (1, 2.0)]
    assert token_deviation(top, 5, 10.0, 10.0) == 0.0
    assert token_deviation(top, 5, 10.0, 9.0) == pytest.approx(1 / 8)
    assert token_deviation(top, 5, 10.0, float("nan")) == math.inf


def test_verify_params_validation() -> None:
    assert VerifyParams.from_json({"verify": 0.5, "verify_seed": 3}).rate == 0.5
    for bad in (
        {"verify": 2},
        {"verify": "x"},
        {"verify": True},
        {"verify_tolerance": 0},
        {"verify_seed": 1.5},
    ):
        with pytest.raises(ValueError):
            VerifyParams.from_json(bad)


async def test_bans_are_bounded_persisted_and_drop_provider_records(tmp_path: Path) -> None:
    cfg = NodeConfig(data_dir=tmp_path / "n", connections=ConnectionParams(max_banned=3))
    node = Node(cfg)
    oid = "ab" * 32
    from mesh.storage.providers import Provider

    node.objects.providers.table[oid] = {"p1": Provider("p1", True, "z", 1e12)}
    for i in range(5):
        node.ban(f"p{i}", "lied")
    assert list(node.conns.banned) == ["p2", "p3", "p4"]  # oldest forgotten first
    node.ban("p1", "lied again")
    assert "p1" not in node.objects.providers.table.get(oid, {})
    node.conns.hint("p1", "mdns", ["127.0.0.1:1"])  # its discovery records are ignored
    assert node.peers.get("p1") is None and node.conns.counters["banned_refused"] == 1
    node.ban(node.me, "never")  # a node cannot ban itself
    assert node.me not in node.conns.banned
    again = Node(cfg)  # a restart keeps the bans
    assert set(again.conns.banned) == {"p3", "p4", "p1"}


async def test_a_full_audit_log_leaves_a_check_undone_a_short_claim_is_blamed() -> None:
    """An honest stage's log stops at its cap: the check is skipped, nobody is banned. A log
    that claims to be full while holding little is a dodge and blames its stage."""
    from types import SimpleNamespace

    from mesh.inference.audit import MAX_AUDIT_BYTES, AuditEntry
    from mesh.inference.verify import SpotChecker, _Blame, _Skip
    from mesh.net.rpc import Reply

    row = bytes(1 << 20)
    full = AuditLog()
    pos = 0
    while not full.overflowed:
        pos += 256
        full.add(AuditEntry(pos, 256, row, b"s" * 64))
    assert full.size > MAX_AUDIT_BYTES // 2
    short = AuditLog()
    short.add(AuditEntry(4, 4, bytes(64), b"s" * 64))

    calls: list[dict[str, int]] = []

    class Mesh:
        log = full

        async def call(self, peer: str, method: str, params: dict, **kw: object) -> Reply:
            calls.append(params)
            kept = self.log.upto(params["upto"])
            picked = [e for e in kept if e.pos >= params["since"]]
            return Reply({}, pack_entries(picked, True))

    mesh = Mesh()
    checker = SpotChecker(SimpleNamespace(mesh=mesh), "m" * 64, VerifyParams(rate=1.0))
    with pytest.raises(_Skip):
        await checker._audit("p" * 32, "ab" * 8, upto=pos + 256)
    # asked for a tail only: the whole log is fetched to measure what it kept
    with pytest.raises(_Skip):
        await checker._audit("p" * 32, "ab" * 8, upto=pos + 256, since=pos)
    assert [c["since"] for c in calls] == [0, pos, 0]
    mesh.log = short
    with pytest.raises(_Blame, match="claims a full audit log"):
        await checker._audit("p" * 32, "ab" * 8, upto=100)
