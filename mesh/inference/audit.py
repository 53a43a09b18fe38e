"""Evidence for spot checks: signed stage steps, the audit log a stage keeps, comparisons.

A session opened with ``audit`` makes its stage (a) sign every activation it pushes to the
next stage, binding the receiving session id, the position and the bytes, and (b) keep the
inputs it received with the sender's signature. The coordinator can then pick a step after the
fact, fetch the suspect's inputs (signed by the stage before it: the suspect cannot invent
them) and its output (as the next stage received it, signed by the suspect: it cannot deny
it, and the next stage cannot frame it), and have another peer holding the same layers
recompute the step.

Parsers here are pure functions over bytes that raise :class:`AuditError`.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from mesh.errors import Error
from mesh.net.wire import check_depth

__all__ = [
    "AuditError",
    "AuditOverflow",
    "AuditEntry",
    "AuditLog",
    "step_message",
    "pack_entries",
    "unpack_entries",
    "relative_error",
    "token_deviation",
    "MAX_AUDIT_BYTES",
]

MAX_AUDIT_BYTES = 12 << 20  # per session; a reply must fit one 16 MiB message
MAX_AUDIT_ENTRIES = 16384
_DOMAIN = b"edgemesh/stage-step/v1\0"


class AuditError(Error, ValueError):
    """An audit log or a signed step is malformed, incomplete or does not verify."""


class AuditOverflow(AuditError):
    """The stage's log filled its cap before the positions asked for: ``kept`` bytes and
    ``count`` entries are what it holds from position 0 (an honest log stops only when full)."""

    def __init__(self, kept: int, count: int) -> None:
        super().__init__(f"the stage's audit log is incomplete ({kept} bytes, {count} entries)")
        self.kept = kept
        self.count = count


def step_message(sid: str, pos: int, n: int, body: bytes) -> bytes:
    """What a stage signs when it pushes ``body`` (n rows ending at ``pos``) to session
    ``sid``: the session binds the step to one generation, so it cannot be replayed."""
    sid_b = sid.encode()
    return (
        _DOMAIN
        + struct.pack(">H", len(sid_b))
        + sid_b
        + struct.pack(">QI", pos, n)
        + hashlib.sha256(body).digest()
    )


@dataclass(frozen=True)
class AuditEntry:
    """One step a stage received: ``n`` rows covering positions [pos - n, pos), of which the
    first ``keep`` stayed in the KV cache (a verify step whose rejected drafts were rolled
    back; None: all). The body stays whole: the signature covers all ``n`` rows."""

    pos: int
    n: int
    body: bytes
    sig: bytes  # the sender's signature over step_message(...); empty from the owner
    keep: int | None = None

    @property
    def rows(self) -> int:
        return self.n if self.keep is None else self.keep

    @property
    def end(self) -> int:
        """The position after the last kept row."""
        return self.pos - self.n + self.rows

    @property
    def kept_body(self) -> bytes:
        if self.keep is None:
            return self.body
        return self.body[: self.keep * (len(self.body) // self.n)]


@dataclass
class AuditLog:
    """The inputs of one audited session, oldest first, bounded in bytes and entries."""

    max_bytes: int = MAX_AUDIT_BYTES
    entries: list[AuditEntry] = field(default_factory=list)
    size: int = 0
    overflowed: bool = False

    def add(self, entry: AuditEntry) -> None:
        cost = len(entry.body) + len(entry.sig) + 32
        if self.overflowed or self.size + cost > self.max_bytes:
            self.overflowed = True  # keep what we have; later checks report "incomplete"
            return
        if len(self.entries) >= MAX_AUDIT_ENTRIES:
            self.overflowed = True
            return
        # Sessions refuse steps out of order (compute.py), so positions only grow; should an
        # earlier position arrive anyway, the tail it contradicts goes: the log stays contiguous.
        while self.entries and self.entries[-1].end >= entry.pos:
            old = self.entries.pop()
            self.size -= len(old.body) + len(old.sig) + 32
        self.entries.append(entry)
        self.size += cost

    def rollback(self, start: int) -> None:
        """The session rolled back to ``start`` positions (rejected drafts): entries past it
        go, and the one across it keeps only its rows before ``start``."""
        while self.entries and self.entries[-1].pos - self.entries[-1].n >= start:
            old = self.entries.pop()
            self.size -= len(old.body) + len(old.sig) + 32
        if self.entries and self.entries[-1].end > start:
            last = self.entries[-1]
            self.entries[-1] = replace(last, keep=start - (last.pos - last.n))

    def upto(self, pos: int) -> list[AuditEntry]:
        return [e for e in self.entries if e.end <= pos]


def pack_entries(entries: list[AuditEntry], overflowed: bool) -> bytes:
    items = [[e.pos, e.n, e.body, e.sig, *([] if e.keep is None else [e.keep])] for e in entries]
    return bytes(msgpack.packb({"entries": items, "overflowed": overflowed}, use_bin_type=True))


def unpack_entries(
    data: bytes, *, complete: bool = True, max_bytes: int = MAX_AUDIT_BYTES + (1 << 20)
) -> list[AuditEntry]:
    """Entries from a peer's ``stage_audit`` reply, type-checked, contiguous and ascending;
    ``complete``: they must start at position 0 (a whole history, not a tail)."""
    if len(data) > max_bytes:
        raise AuditError(f"audit reply of {len(data)} bytes exceeds {max_bytes}")
    try:
        obj = msgpack.unpackb(data, raw=False, max_ext_len=0, max_array_len=MAX_AUDIT_ENTRIES)
    except Exception as exc:  # msgpack raises several types on bad input
        raise AuditError(f"malformed audit reply: {type(exc).__name__}") from None
    check_depth(obj, AuditError, "audit reply")
    if not isinstance(obj, dict) or not isinstance(obj.get("entries"), list):
        raise AuditError("audit reply has no entry list")
    out: list[AuditEntry] = []
    for item in obj["entries"]:
        if not (isinstance(item, list) and len(item) in (4, 5)):
            raise AuditError("audit entry is not [pos, n, body, sig(, keep)]")
        pos, n, body, sig = item[:4]
        keep = item[4] if len(item) == 5 else None
        if type(pos) is not int or type(n) is not int or not 0 < n <= pos < 1 << 40:
            raise AuditError("audit entry has bad positions")
        if keep is not None and (type(keep) is not int or not 0 < keep < n):
            raise AuditError("audit entry keeps a bad number of rows")
        if not isinstance(body, bytes) or not isinstance(sig, bytes) or len(sig) > 64:
            raise AuditError("audit entry has a bad body or signature")
        if len(body) % n:
            raise AuditError("audit entry body is not n rows")
        if out and pos - n != out[-1].end:
            raise AuditError(f"audit entries are not contiguous at position {pos}")
        out.append(AuditEntry(pos, n, body, sig, keep))
    if complete and out and out[0].pos != out[0].n:
        raise AuditError("audit entries do not start at position 0")
    if obj.get("overflowed") is True:
        kept = sum(len(e.body) + len(e.sig) + 32 for e in out)
        raise AuditOverflow(kept, len(out))
    return out


def relative_error(reference: npt.NDArray[Any], claimed: npt.NDArray[Any]) -> float:
    """||claimed - reference|| / ||reference||: runtimes and hardware differ by well under a
    percent on activations; a perturbation that matters is far above that."""
    ref = np.asarray(reference, dtype=np.float64)
    got = np.asarray(claimed, dtype=np.float64)
    if ref.shape != got.shape:
        return math.inf
    if not np.all(np.isfinite(got)):
        return math.inf
    norm = float(np.linalg.norm(ref))
    return float(np.linalg.norm(got - ref)) / max(norm, 1e-12)


def token_deviation(
    top: list[tuple[int, float]], ref_token: int, ref_logit: float, claimed_logit: float
) -> float:
    """How far the claimed token's recomputed logit lies below that of the token the verifier
    sampled with the same parameters, as a fraction of the spread of the top logits (0: the
    same token; a near-tie that runtimes may break differently stays small)."""
    if not top or not math.isfinite(ref_logit):
        return math.inf
    if not math.isfinite(claimed_logit):
        return math.inf
    spread = max(top[0][1] - top[-1][1], 1e-6)
    return max(0.0, (ref_logit - claimed_logit) / spread)
