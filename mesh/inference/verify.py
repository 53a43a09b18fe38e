"""Spot checks: a sampled fraction of stage steps recomputed on another peer.

After each step, every stage of the route is checked with probability ``rate``, drawn from a
secret random source *after* the step ran (a stage cannot know which steps will be checked, so
it must be honest on all of them). A check takes the stage's inputs from its audit log (each
signed by the stage before it), its output as the next stage received it (signed by the
stage itself) or, for the last stage, the token it delivered, and has a verifier (another peer
that can hold the same units) rerun the whole input history on a fresh session. Every
prompt chunk is eligible, not only the last. Activations must agree within ``tolerance``
(relative L2 error); a token must be the verifier's choice or a near-tie. In an open mesh,
stages run by strangers (peers without a member certificate) are checked at ``strangers``
at least, whatever the request asked.

Verifiers are this node first, where it can hold the units (its own recomputation is
trusted alone), then peers drawn at random by this node: those that proved they hold the
stage's bytes (a challenge on a random range, :mod:`mesh.inference.proofs`), then those that
would pull them. Claims never order them, and a claimer that fails its challenge is left
out. A peer's mismatch is put to up to three more jurors. A ban on peers' word needs two
accusers and no defender (then the stage is banned), or two defenders against a lone accuser
(then the accuser is): two colluders can get no honest peer banned. Anything else is word
against word: an accuser that runs a stage of the route is first checked itself, at the
same step; if that clears nothing, the stage and its accusers are left out of this
generation, nobody is banned. A stage whose log or signatures do not hold up is banned
outright: an honest stage refuses unsigned input and never loses its log. Banning
(:meth:`Node.ban`) drops the peer's link and ignores its discovery and provider records; the
generation then restarts on a route without it.

A peer perturbing every step is caught after 1/rate checked steps on average, and escapes
``n`` steps with probability (1 - rate) ** n.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mesh.errors import EXPECTED, Error, IdentityError, RPCError
from mesh.inference.audit import (
    MAX_AUDIT_BYTES,
    MAX_AUDIT_ENTRIES,
    AuditEntry,
    AuditError,
    AuditOverflow,
    relative_error,
    step_message,
    token_deviation,
    unpack_entries,
)
from mesh.inference.compute import MAX_SESSION_TOKENS
from mesh.inference.host import CheckHost
from mesh.inference.proofs import prove_holds
from mesh.inference.routes import Stage, unit_memory
from mesh.inference.sampling import SamplingParams
from mesh.net.identity import verify
from runtimes.errors import ModelError

__all__ = ["VerifyParams", "VerificationFailed", "SpotChecker", "Step"]

log = logging.getLogger(__name__)

MAX_JURY = 4  # verifiers a disputed step is put to, the first included


class VerificationFailed(Error):
    """A stage's output did not survive a spot check: ``peer`` has been banned, or (``banned``
    false) only one other peer said so, and it is left out of this generation."""

    def __init__(
        self, peer: str, reason: str, banned: bool = True, accusers: tuple[str, ...] = ()
    ) -> None:
        super().__init__(f"{peer[:12]} failed a spot check: {reason}")
        self.peer = peer
        self.reason = reason
        self.banned = banned
        self.accusers = accusers  # a dispute's verifiers: no more trusted than the stage


@dataclass(frozen=True)
class VerifyParams:
    rate: float = 0.0  # probability that a given stage step is recomputed
    tolerance: float = 0.05  # relative L2 error allowed on activations
    token_tolerance: float = 0.1  # of the top-8 logit spread, for the last stage's token
    seed: int | None = None  # reproducible choice of checks (tests); None: secret
    strangers: float = 0.0  # the least rate for stages run by strangers of an open mesh

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0 or not 0.0 <= self.strangers <= 1.0:
            raise ValueError("verify rates must be in [0, 1]")
        if not 0.0 < self.tolerance < 1.0 or not 0.0 < self.token_tolerance < 1.0:
            raise ValueError("verify tolerances must be in (0, 1)")

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> VerifyParams:
        """From an API request: ``verify`` (rate), ``verify_tolerance``, ``verify_seed``."""
        rate = body.get("verify", 0.0)
        tol = body.get("verify_tolerance", 0.05)
        seed = body.get("verify_seed")
        if isinstance(rate, bool) or not isinstance(rate, int | float):
            raise ValueError("verify must be a number in [0, 1]")
        if isinstance(tol, bool) or not isinstance(tol, int | float):
            raise ValueError("verify_tolerance must be a number")
        if seed is not None and type(seed) is not int:
            raise ValueError("verify_seed must be an integer")
        return cls(float(rate), float(tol), seed=seed)


@dataclass
class _Stats:
    checks: int = 0
    passed: int = 0
    failed: int = 0
    unchecked: list[str] = field(default_factory=list)
    banned: list[dict[str, Any]] = field(default_factory=list)
    disputes: list[dict[str, Any]] = field(default_factory=list)  # one verifier's word only
    max_error: float = 0.0  # largest relative error among passed activation checks
    max_token_deviation: float = 0.0
    ms: float = 0.0
    first_failure_token: int | None = None


@dataclass(frozen=True)
class Step:
    """One step of a generation, as a check needs it: the route, and the step that consumed
    ``tokens[:pos]`` (its last chunk ``rows`` long) and produced ``tokens[pos]``."""

    stages: list[Stage]
    sids: list[str]
    tokens: list[int]
    pos: int
    rows: int
    sampling: SamplingParams
    index: int  # tokens generated before this one
    # The token the last stage gave, where it is not tokens[pos]: a prompt chunk before the
    # last (its token is dropped, but the stage's KV cache must still be right).
    claimed: int | None = None
    # A verify step (speculative decoding): the token the last stage gave after each of its
    # rows, all checked (the accepted drafts' and the rejected ones' alike).
    claimed_rows: tuple[int, ...] | None = None


@dataclass
class _Outcome:
    ok: bool
    deviation: float
    what: str


class SpotChecker:
    """Checks the steps of one generation; ``host`` is the node's coordinator."""

    def __init__(self, host: CheckHost, mid: str, params: VerifyParams) -> None:
        self.host = host
        self.mid = mid
        self.params = params
        self.rng: random.Random = (
            random.Random(params.seed) if params.seed is not None else random.SystemRandom()
        )
        self.stats = _Stats()
        self.excluded: set[str] = set()
        self._candidates: dict[tuple[int, int], list[str]] = {}  # per unit range, this run
        self._draw = random.SystemRandom()  # juries: never predictable, even in tests

    def summary(self) -> dict[str, Any]:
        s = self.stats
        return {
            "rate": self.params.rate,
            "tolerance": self.params.tolerance,
            "checks": s.checks,
            "passed": s.passed,
            "failed": s.failed,
            "unchecked": s.unchecked[:20],
            "banned": s.banned,
            "disputes": s.disputes[:20],
            "max_error": round(s.max_error, 6),
            "max_token_deviation": round(s.max_token_deviation, 6),
            "check_ms": round(s.ms, 1),
            "first_failure_token": s.first_failure_token,
        }

    async def after_step(self, step: Step) -> None:
        """Maybe check each stage's part in ``step``; raises :class:`VerificationFailed`
        after banning a stage of the route."""
        for s in range(len(step.stages)):
            rate = self.params.rate
            if self.host.is_stranger(step.stages[s].peer_id):
                rate = max(rate, self.params.strangers)
            if self.rng.random() >= rate:
                continue
            t0 = time.perf_counter()
            try:
                await self._check(step, s)
            finally:
                self.stats.ms += (time.perf_counter() - t0) * 1000

    # -- one check -------------------------------------------------------------------------
    async def _check(self, step: Step, s: int, forced: bool = False) -> None:
        stage = step.stages[s]
        suspect = stage.peer_id
        if suspect == self.host.mesh.me:
            return  # our own stage: nothing to gain from checking ourselves
        claimed: Any
        try:
            inputs, rows = await self._inputs(step, s)
            last = s == len(step.stages) - 1
            token = step.tokens[step.pos] if step.claimed is None else step.claimed
            claimed = token if last else await self._output(step, s)
            if last and step.claimed_rows is not None:
                claimed = list(step.claimed_rows)
        except _Blame as blame:
            self._ban(blame.peer, blame.reason, step)  # a stage of the route: raises
            return
        except _Skip as skip:
            self.stats.unchecked.append(str(skip))
            return
        self.stats.checks += 1
        verifiers = await self._verifiers(stage, suspect)
        if not verifiers:
            self.stats.unchecked.append(f"no verifier for units {list(stage.units)}")
            return
        evidence = (stage, inputs, step, rows, claimed)
        first = await self._recompute(verifiers[0], *evidence)
        if first is None:
            return
        if first.ok:
            self._passed(first)
            return
        self.stats.failed += 1
        reason = f"stage units {list(stage.units)} at position {step.pos}: {first.what}"
        if verifiers[0] == self.host.mesh.me:
            self._ban(suspect, reason, step)  # our own recomputation needs no second opinion
            return
        accusers, defenders = await self._jury(verifiers, evidence)
        await self._verdict(step, s, forced, reason, accusers, defenders)

    async def _jury(
        self, verifiers: list[str], evidence: tuple[Stage, bytes, Step, int, Any]
    ) -> tuple[list[str], list[str]]:
        """A peer's "mismatch" put to the rest of the jury, drawn at random like it: who
        says the stage erred (the first verifier among them), and who says it did not."""
        accusers, defenders = [verifiers[0]], list[str]()
        for verifier in verifiers[1:MAX_JURY]:
            verdict = await self._recompute(verifier, *evidence)
            if verdict is not None:
                (defenders if verdict.ok else accusers).append(verifier)
        return accusers, defenders

    async def _verdict(
        self,
        step: Step,
        s: int,
        forced: bool,
        reason: str,
        accusers: list[str],
        defenders: list[str],
    ) -> None:
        """What a jury's split means. Banning on peers' word takes two of them and nobody on
        the other side: two colluders (or Sybils) would otherwise ban any honest peer they
        were drawn to judge, or stood beside. Raises :class:`VerificationFailed`."""
        suspect = step.stages[s].peer_id
        if not defenders and len(accusers) > 1:
            self._ban(suspect, f"{reason} (by {len(accusers)} verifiers)", step)
        if len(accusers) == 1 and len(defenders) > 1:
            self.stats.passed += 1
            self._ban(accusers[0], f"verifier outvoted: {reason}", step)
            return  # the accuser runs no stage of this route: the check stands as passed
        # Word against word. An accuser that runs a stage of the route is checked itself
        # first, at this very step: a liar on the route is found by its own outputs.
        if not forced:
            for i, st in enumerate(step.stages):
                if st.peer_id in accusers and st.peer_id != self.host.mesh.me:
                    await self._check(step, i, forced=True)  # raises if it is caught
        # Still word against word: the stage and its accusers run and check none of the
        # rest of this generation (whoever vouched for the stage stays); nobody is banned.
        self.stats.disputes.append(
            {
                "stage": suspect,
                "verifier": accusers[0],
                "accusers": accusers,
                "defenders": defenders,
                "reason": reason,
            }
        )
        self.excluded.update((suspect, *accusers))
        self._candidates.clear()
        if self.stats.first_failure_token is None:
            self.stats.first_failure_token = step.index
        raise VerificationFailed(
            suspect, f"disputed by {accusers[0][:12]}: {reason}", False, tuple(accusers)
        )

    def _passed(self, outcome: _Outcome) -> None:
        self.stats.passed += 1
        if outcome.what.startswith("token"):
            self.stats.max_token_deviation = max(self.stats.max_token_deviation, outcome.deviation)
        else:
            self.stats.max_error = max(self.stats.max_error, outcome.deviation)

    def _ban(self, peer: str, reason: str, step: Step) -> None:
        """Ban ``peer``; if it runs a stage of the route, its tokens cannot be trusted:
        raise :class:`VerificationFailed` so the generation restarts without it."""
        self.stats.banned.append({"peer": peer, "reason": reason})
        self.host.mesh.ban(peer, f"spot check: {reason}")
        self.excluded.add(peer)
        self._candidates.clear()
        if any(st.peer_id == peer for st in step.stages):
            if self.stats.first_failure_token is None:
                self.stats.first_failure_token = step.index
            raise VerificationFailed(peer, reason)

    async def _audit(self, peer: str, sid: str, upto: int, since: int = 0) -> list[AuditEntry]:
        try:
            reply = await self.host.mesh.call(
                peer, "compute.stage_audit", {"sid": sid, "upto": upto, "since": since}, timeout=30
            )
            return unpack_entries(reply.payload, complete=since == 0)
        except AuditOverflow as full:
            if since:  # measure what it kept: ask for the log from position 0
                return await self._audit(peer, sid, upto, 0)
            # An honest log stops only when (nearly) full; a short one is a dodge.
            if full.kept >= MAX_AUDIT_BYTES // 2 or full.count >= MAX_AUDIT_ENTRIES - 1:
                raise _Skip(f"audit log of {peer[:12]} full at {full.kept} bytes") from None
            raise _Blame(peer, f"claims a full audit log of {full.kept} bytes") from None
        except AuditError as exc:
            raise _Blame(peer, f"bad audit log: {exc}") from None
        except RPCError as exc:
            raise _Blame(peer, f"refused its audit log: {exc}") from None

    async def _inputs(self, step: Step, s: int) -> tuple[bytes, int]:
        """Stage ``s``'s whole input history up to the step, and the step's rows: token ids
        for the first stage (we sent them), else its log, each entry signed by the stage
        before it."""
        stages, sids, pos = step.stages, step.sids, step.pos
        if s == 0:
            return np.asarray(step.tokens[:pos], dtype="<i4").tobytes(), step.rows
        peer = stages[s].peer_id
        entries = await self._audit(peer, sids[s], pos)
        if not entries or entries[-1].end != pos:
            raise _Blame(peer, f"audit log does not reach position {pos}")
        prev_key = self.host.mesh.peer_key(stages[s - 1].peer_id)
        for e in entries:  # signed whole; a verify step's rejected rows are then left out
            try:
                verify(prev_key, step_message(sids[s], e.pos, e.n, e.body), e.sig)
            except IdentityError:
                raise _Blame(peer, f"logged input at {e.pos} not signed by its sender") from None
        return b"".join(e.kept_body for e in entries), entries[-1].rows

    async def _output(self, step: Step, s: int) -> np.ndarray[Any, Any]:
        """What stage ``s`` sent at the step, as the next stage logged it under ``s``'s key."""
        stages, sids, pos = step.stages, step.sids, step.pos
        nxt = stages[s + 1].peer_id
        entries = await self._audit(nxt, sids[s + 1], pos, since=pos)
        if not entries or entries[-1].end != pos:
            raise _Blame(nxt, f"audit log has no entry at {pos}")
        e = entries[-1]
        try:
            key = self.host.mesh.peer_key(stages[s].peer_id)
            verify(key, step_message(sids[s + 1], e.pos, e.n, e.body), e.sig)
        except IdentityError:
            raise _Blame(nxt, f"logged input at {pos} not signed by its sender") from None
        if len(e.body) % (4 * e.n):
            raise _Blame(nxt, "logged activation size is not n x d")
        return np.frombuffer(e.kept_body, dtype="<f4").reshape(e.rows, -1)

    async def _verifiers(self, stage: Stage, suspect: str) -> list[str]:
        """The jury for ``stage``: this node first where it can hold the units (we trust our
        own recomputation), then peers that proved they hold the bytes, then peers that
        would pull them; each group in an order drawn at random, never by claims (a Sybil
        claiming every blob would otherwise always be drawn). A peer claiming the bytes
        that fails its challenge is caught lying and left out. Drawn once per unit range
        and run; a ban or a verifier that fails draws again."""
        cached = self._candidates.get(stage.units)
        if cached is None:
            cached = await self._draw_jury(stage)
            self._candidates[stage.units] = cached
        return [p for p in cached if p != suspect][:MAX_JURY]

    async def _draw_jury(self, stage: Stage) -> list[str]:
        skip = set(self.excluded)
        try:
            views, manifest = await self.host.views(self.mid, skip)
        except EXPECTED as exc:
            self.stats.unchecked.append(f"no views: {exc}")
            return []
        a, b = stage.units
        need = unit_memory([u.nbytes for u in manifest.units], a, b)
        me = self.host.mesh.me
        fits = [v for v in views if v.free >= need and v.peer_id not in skip]
        mine = [v.peer_id for v in fits if v.peer_id == me]
        others = [v for v in fits if v.peer_id != me]
        self._draw.shuffle(others)
        own: list[tuple[str, str, Path]] = [
            (blob.sha256, blob.object, path)
            for blob in manifest.blobs_for(a, b)
            if blob.object and (path := self.host.object_path(blob.object)) is not None
        ]
        proven: list[str] = []
        pulling: list[str] = []
        for v in others:
            if len(proven) + len(pulling) > MAX_JURY:  # one spare: the suspect of a later check
                break
            claimed = [(oid, path) for sha, oid, path in own if sha in v.held]
            if not claimed:  # claims nothing we can check: it would pull the bytes
                pulling.append(v.peer_id)
                continue
            oid, path = self._draw.choice(claimed)
            if await prove_holds(self.host.mesh, v.peer_id, oid, path, self._draw):
                proven.append(v.peer_id)
            else:
                self.stats.unchecked.append(f"{v.peer_id[:12]} failed a shard challenge")
                self.excluded.add(v.peer_id)
        return mine + proven + pulling

    async def _recompute(
        self,
        verifier: str,
        stage: Stage,
        inputs: bytes,
        step: Step,
        rows: int,
        claimed: Any,
    ) -> _Outcome | None:
        """The verifier's verdict, or None when it could not run the check."""
        pos = step.pos
        sid = os.urandom(12).hex()
        mesh = self.host.mesh
        opened = False
        try:
            await mesh.call(
                verifier,
                "compute.stage_open",
                {
                    "sid": sid,
                    "model_id": self.mid,
                    "units": list(stage.units),
                    "next": None,
                    "max_tokens": min(MAX_SESSION_TOKENS, pos + 1),
                    "source": mesh.me if self.host.holds_manifest(self.mid) else None,
                },
                timeout=600,
            )
            opened = True
            params: dict[str, Any] = {"sid": sid, "n": pos, "rows": rows}
            if isinstance(claimed, list):
                params.update(claimed_rows=claimed, pos=pos, sample=step.sampling.to_wire())
            elif not isinstance(claimed, np.ndarray):
                params.update(claimed=int(claimed), pos=pos, sample=step.sampling.to_wire())
            reply = await mesh.call(
                verifier, "compute.stage_recompute", params, inputs, timeout=120
            )
        except (RPCError, ModelError) as exc:
            self.stats.unchecked.append(f"verifier {verifier[:12]}: {exc}"[:200])
            self._candidates.pop(stage.units, None)  # ask the mesh again next time
            return None
        finally:
            if opened:
                try:
                    await mesh.call(verifier, "compute.stage_close", {"sid": sid}, timeout=5)
                except RPCError:
                    pass
        try:
            return self._judge(reply.result, reply.payload, claimed)
        except _Malformed as exc:
            # The verifier's failure, not the stage's: no accusation, the check stands
            # unchecked and the next check asks the mesh for verifiers again.
            self.stats.unchecked.append(f"verifier {verifier[:12]}: malformed answer: {exc}")
            self._candidates.pop(stage.units, None)
            return None

    def _judge(self, result: dict[str, Any], payload: bytes, claimed: Any) -> _Outcome:
        """The verifier's answer against the claim; :class:`_Malformed` where it is no
        answer at all (it is a peer's word, type-checked before use)."""
        if isinstance(claimed, np.ndarray):
            if len(payload) != claimed.nbytes:
                raise _Malformed("a different shape")
            ref = np.frombuffer(payload, dtype="<f4").reshape(claimed.shape)
            err = relative_error(ref, claimed)
            ok = err <= self.params.tolerance
            return _Outcome(
                ok, err, f"activation error {err:.4f} (tolerance {self.params.tolerance})"
            )
        if isinstance(claimed, list):  # a verify step: every row, the worst one counts
            rows = result.get("rows")
            if not isinstance(rows, list) or len(rows) != len(claimed):
                raise _Malformed("no rows")
            outcomes = [
                self._judge(r if isinstance(r, dict) else {}, b"", c)
                for r, c in zip(rows, claimed, strict=True)
            ]
            return max(outcomes, key=lambda o: (not o.ok, o.deviation))
        top, token = result.get("top"), result.get("token")
        ref_logit, claimed_logit = result.get("token_logit"), result.get("claimed_logit")
        if not (isinstance(ref_logit, int | float) and isinstance(claimed_logit, int | float)):
            raise _Malformed("no logits")
        if not (_finite(ref_logit) and _finite(claimed_logit)):
            raise _Malformed("non-finite logits")
        if type(token) is not int or not isinstance(top, list):
            raise _Malformed("no token or no top logits")
        top = top[:8]
        if not all(
            isinstance(p, list | tuple) and len(p) == 2 and type(p[0]) is int and _finite(p[1])
            for p in top
        ):
            raise _Malformed("top logits that are not (token, logit) pairs")
        pairs = [(int(p[0]), float(p[1])) for p in top]
        dev = token_deviation(pairs, token, float(ref_logit), float(claimed_logit))
        ok = dev <= self.params.token_tolerance
        return _Outcome(
            ok, dev, f"token {claimed} deviates {dev:.3f} from the verifier's {result.get('token')}"
        )


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


class _Malformed(Exception):
    """Internal: a verifier's answer is no answer (wrong types, shapes or non-finite values)."""


class _Skip(Exception):
    """Internal: the check cannot be made (an honest limit, not misbehaviour)."""


class _Blame(Exception):
    """Internal: ``peer`` provably misbehaved while a check gathered its evidence."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(reason)
        self.peer = peer
        self.reason = reason
