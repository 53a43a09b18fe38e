"""The membership policy every entry point asks: is this peer, with this certificate, in?

``admit(peer_id, cert)`` returns the verified :class:`MemberCert` or raises
:class:`~mesh.errors.NotAMember` with the reason (and counts it). In an *open* mesh (chosen
explicitly at ``edgemesh mesh create --open``) strangers are admitted but marked: services ask
:meth:`MembershipPolicy.is_member` before granting what only members get (batch jobs,
replication requests; spot checks stay on for strangers).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

from mesh.errors import IdentityError, NotAMember
from mesh.net.identity import Identity
from mesh.trust.cert import (
    CLOCK_SKEW,
    MemberCert,
    Revocation,
    cert_bytes,
    parse_revocation,
    verify_cert,
)
from mesh.trust.keys import CERT_FILE, REVOCATIONS_FILE, Anchor, read_capped, write_private

__all__ = ["MembershipPolicy", "Revocations", "load_policy"]

log = logging.getLogger(__name__)
MAX_REVOCATIONS = 4096
MAX_MEMBERS = 4096  # admitted certificates remembered for is_member (oldest dropped first)
_MAX_REVOCATIONS_FILE = MAX_REVOCATIONS * 200 + 1024


class Revocations:
    """Owner-signed revocations, by peer id; persisted in ``revocations.json`` when a path
    is given. Only records that verify against the anchor are ever kept."""

    def __init__(self, anchor: Anchor, path: Path | None = None) -> None:
        self.anchor = anchor
        self.path = path
        self.by_peer: dict[str, Revocation] = {}
        self.mtime = 0.0

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self.by_peer

    def __len__(self) -> int:
        return len(self.by_peer)

    def raw(self) -> list[bytes]:
        return [r.raw for r in self.by_peer.values()]

    def add_raw(self, items: Iterable[bytes]) -> list[Revocation]:
        """Verify and keep ``items``; return those that are new (forged ones are skipped)."""
        new, forged, reason = [], 0, ""
        for raw in items:
            try:
                rev = parse_revocation(raw, self.anchor.owner_key, self.anchor.mesh_id)
            except NotAMember as exc:
                forged, reason = forged + 1, reason or str(exc)
                continue
            if rev.peer_id in self.by_peer or len(self.by_peer) >= MAX_REVOCATIONS:
                continue
            self.by_peer[rev.peer_id] = rev
            new.append(rev)
        if forged:  # one line a message: 1024 forged records made 1024 warnings (log growth)
            log.warning("ignored %d revocation(s), the first because: %s", forged, reason)
        return new

    def reload(self) -> list[Revocation]:
        """Pick up records another process (``edgemesh mesh revoke``) wrote to the file."""
        if self.path is None:
            return []
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return []
        if mtime == self.mtime:
            return []
        self.mtime = mtime
        try:
            data = read_capped(self.path, _MAX_REVOCATIONS_FILE) or b"{}"
            texts = json.loads(data).get("revocations", [])
            items = [bytes.fromhex(t) for t in texts if isinstance(t, str)]
        except (IdentityError, ValueError, AttributeError) as exc:
            log.warning("%s unreadable: %s", self.path, exc)
            return []
        return self.add_raw(items)

    def save(self) -> None:
        if self.path is None:
            return
        # Merge with the file first: the CLI may have added records since we last read it.
        self.reload()
        body = {"revocations": [r.hex() for r in self.raw()]}
        write_private(self.path, (json.dumps(body) + "\n").encode())
        with contextlib.suppress(OSError):
            self.mtime = self.path.stat().st_mtime


class MembershipPolicy:
    def __init__(
        self,
        anchor: Anchor | None,
        *,
        own_cert: MemberCert | None = None,
        credential: bytes | None = None,
        revocations: Revocations | None = None,
        skew: float = CLOCK_SKEW,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.anchor = anchor
        self.own_cert = own_cert
        self._credential = own_cert.raw if own_cert is not None else credential
        if revocations is None and anchor is not None:
            revocations = Revocations(anchor)  # in memory only
        self.revocations = revocations
        self.skew = skew
        self.clock = clock
        self.refused: Counter[str] = Counter()
        self.strangers = 0
        self._members: OrderedDict[str, MemberCert] = OrderedDict()

    @property
    def open(self) -> bool:
        return self.anchor is not None and self.anchor.open

    @property
    def credential(self) -> bytes | None:
        """This node's own certificate, attached to its records, offers and hellos (sent
        even when it does not verify here: the receivers judge it, and say why)."""
        return self._credential

    @property
    def credential_text(self) -> str | None:
        """The same as base64url text: for records that end up in JSON (DHT, mDNS TXT)."""
        raw = self._credential
        return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=") if raw else None

    @property
    def mesh_id(self) -> str:
        return self.anchor.mesh_id if self.anchor else ""

    def admit(self, peer_id: str, cert: bytes | str | None) -> MemberCert:
        """The peer's verified certificate; a stranger's marker in an open mesh; else
        NotAMember (counted by reason). A revoked peer is refused even in an open mesh."""
        try:
            return self._admit(peer_id, cert)
        except NotAMember as exc:
            if self.open and exc.reason != "revoked":
                self.strangers += 1
                return MemberCert.for_stranger(peer_id)
            self.refused[exc.reason] += 1
            raise

    def _admit(self, peer_id: str, cert: bytes | str | None) -> MemberCert:
        if self.anchor is None:
            raise NotAMember("no_mesh", "this node belongs to no mesh")
        if self.revocations is not None and peer_id in self.revocations:
            raise NotAMember("revoked", f"{peer_id[:12]} was revoked by the mesh owner")
        raw = cert_bytes(cert)
        if not raw:
            raise NotAMember("missing", "no member certificate")
        member = verify_cert(
            raw,
            self.anchor.owner_key,
            self.anchor.mesh_id,
            peer_id,
            now=self.clock(),
            skew=self.skew,
        )
        known = self._members.pop(peer_id, None)
        # Keep the certificate that lasts longest: a replayed older one (certificates are
        # public) must not cut a member's link short.
        keep = known if known is not None and known.expires > member.expires else member
        self._members[peer_id] = keep
        while len(self._members) > MAX_MEMBERS:
            self._members.popitem(last=False)
        return member

    def is_member(self, peer_id: str) -> bool:
        """Whether ``peer_id`` showed a valid certificate of this mesh (not revoked, not
        expired since). Strangers of an open mesh are not members."""
        cert = self._members.get(peer_id)
        if cert is None:
            return False
        if self.revocations is not None and peer_id in self.revocations:
            return False
        return not cert.expired(self.clock(), self.skew)

    def still_admits(self, peer_id: str) -> bool:
        """Whether a peer admitted earlier (its link is up) is still in now: its certificate
        has not expired since (nor been revoked). Asked on every live link, so a certificate
        that lapses drops its link. In an open mesh a lapsed member stays, as a stranger."""
        if self.revocations is not None and peer_id in self.revocations:
            return False
        return self.open or self.is_member(peer_id)

    def counters(self) -> dict[str, int]:
        """For /v1/info: refusals by reason, and strangers admitted to an open mesh."""
        out = {f"not_member_{reason}": n for reason, n in sorted(self.refused.items())}
        out["not_member_refused"] = sum(self.refused.values())
        out["strangers_admitted"] = self.strangers
        return out


def load_policy(data_dir: Path, *, clock: Callable[[], float] = time.time) -> MembershipPolicy:
    """The policy from a data dir's trust files (a node of no mesh refuses everyone)."""
    data_dir = Path(data_dir)
    anchor = Anchor.load(data_dir)
    if anchor is None:
        return MembershipPolicy(None, clock=clock)
    revocations = Revocations(anchor, data_dir / REVOCATIONS_FILE)
    revocations.reload()
    own: MemberCert | None = None
    text = read_capped(data_dir / CERT_FILE, 1024)
    raw: bytes | None = None
    if text is not None:
        try:
            raw = cert_bytes(text.decode("ascii", "replace").strip())
            own = verify_cert(
                raw or b"",
                anchor.owner_key,
                anchor.mesh_id,
                _own_peer_id(data_dir),
                now=clock(),
            )
        except NotAMember as exc:
            log.warning("this node's certificate is not valid: %s", exc)
    return MembershipPolicy(
        anchor, own_cert=own, credential=raw, revocations=revocations, clock=clock
    )


def _own_peer_id(data_dir: Path) -> str:
    return Identity.load_or_create(data_dir).peer_id
