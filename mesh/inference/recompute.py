"""Spot checks of stage sessions: the inputs an audited session kept, and recomputing them.

A coordinator that audits a route asks a stage for the inputs it received (signed by the stage
before it) and has another peer recompute them on a fresh session (``stage_recompute``): a
stage whose outputs differ is caught (mesh.inference.verify decides what follows).
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from mesh.inference.audit import pack_entries
from mesh.inference.proofs import challenge_digest, check_challenge
from mesh.inference.sampling import MAX_DRAFT, SamplingParams, sample, top_logits
from mesh.inference.stages import MAX_SESSION_TOKENS, PREFILL_CHUNK, StageSessions
from mesh.net.rpc import CallContext, Reply
from runtimes.errors import ModelError

__all__ = ["AuditedStages"]


class AuditedStages(StageSessions):
    async def rpc_shard_challenge(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> dict[str, Any]:
        """SHA-256 of a nonce and a byte range of a shard object this node holds: the proof
        a coordinator asks of a peer claiming the bytes before preferring it as a verifier."""
        oid, offset, length, nonce = check_challenge(params)
        path = self.objects.store.data_path(oid)
        if path is None:
            raise ModelError("this node does not hold that object")
        digest = await asyncio.to_thread(challenge_digest, path, nonce, offset, length)
        return {"digest": digest}

    async def rpc_stage_audit(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> Reply:
        """The inputs an audited session received at positions [since, upto] (its owner only)."""
        sid, upto, since = params.get("sid"), params.get("upto"), params.get("since", 0)
        st = self.sessions.get(sid) if isinstance(sid, str) else None
        if st is None or st.owner != ctx.peer_id or st.audit is None:
            raise ModelError("no audited session of yours by that id")
        if type(upto) is not int or type(since) is not int:
            raise ModelError("upto and since must be positions")
        audit = st.audit
        entries = [e for e in audit.upto(upto) if e.end >= since]
        # Incomplete only if the positions asked for go past what the full log kept.
        short = audit.overflowed and (not audit.entries or upto > audit.entries[-1].end)
        return Reply({"n": len(entries)}, pack_entries(entries, short))

    async def rpc_stage_recompute(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> Reply:
        """A verifier's step: run a whole input history as one chunk on a fresh session and
        return the last ``rows`` outputs (a last stage: its token under the same sampling,
        the top logits and the logit of the token to check)."""
        sid, rows = params.get("sid"), params.get("rows")
        st = self.sessions.get(sid) if isinstance(sid, str) else None
        if st is None or st.owner != ctx.peer_id:
            raise ModelError("no session of yours by that id")
        if type(rows) is not int or rows <= 0:
            raise ModelError("rows must be a positive integer")
        n = params.get("n")
        if type(n) is not int or not 0 < n <= MAX_SESSION_TOKENS or len(payload) % n:
            raise ModelError("n must be a positive integer dividing the payload")
        claimed_rows = params.get("claimed_rows")
        if claimed_rows is not None and not (
            isinstance(claimed_rows, list)
            and 0 < len(claimed_rows) <= min(rows, n, MAX_DRAFT + 1)
            and all(type(t) is int for t in claimed_rows)
        ):
            raise ModelError(f"claimed_rows must be 1..{MAX_DRAFT + 1} token ids")
        tail_rows = len(claimed_rows) if claimed_rows is not None else 0
        # chunked as a prefill (bounded attention memory); a verify step's rows last, alone,
        # with every row's logits (as the step ran them)
        cuts = [*range(0, n - tail_rows, PREFILL_CHUNK), n - tail_rows, n]
        bounds = [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
        row, outs, ms = len(payload) // n, [], 0.0
        for a, b in [(a, min(b, a + PREFILL_CHUNK)) for a, b in bounds]:
            step = {"sid": sid, "n": b - a, "pos": b}
            every = tail_rows > 0 and b == n
            cur, spec, chunk_out, own = await self._compute(
                step, payload[a * row : b * row], all_logits=every
            )
            chunk_out = np.asarray(chunk_out, dtype=np.float32)
            outs.append(chunk_out.reshape(-1, chunk_out.shape[-1]))
            ms += own["ms"]
        own = dict(own, ms=round(ms, 3))
        out = np.concatenate(outs)
        if not spec.is_last:
            tail = np.ascontiguousarray(out[-rows:], dtype="<f4")
            return Reply({"rows": int(tail.shape[0]), "ms": own["ms"]}, tail.tobytes())
        try:
            sp = SamplingParams.from_wire(params.get("sample", {}))
        except ValueError as exc:
            raise ModelError(str(exc)) from None
        if claimed_rows is not None:
            return _verify_rows(out[-tail_rows:], claimed_rows, sp, params.get("pos"), own)
        logits = out[-1]
        pos, claimed = params.get("pos", 0), params.get("claimed")
        if type(claimed) is not int or not 0 <= claimed < logits.shape[-1]:
            raise ModelError("claimed must be a token id")
        token = sample(logits, sp, pos if type(pos) is int else 0)
        return Reply(
            {
                "token": token,
                "token_logit": float(logits[token]),
                "claimed_logit": float(logits[claimed]),
                "top": top_logits(logits, 8),
                "ms": own["ms"],
            }
        )


def _verify_rows(
    logits: np.ndarray[Any, Any], claimed: list[int], sp: SamplingParams, pos: Any, own: Any
) -> Reply:
    """A verify step's last-stage check: per row, the token the verifier samples (with the
    row's own position's stream) and the logits to judge the claimed one by."""
    if type(pos) is not int or not len(claimed) <= pos < 1 << 40:
        raise ModelError("a verify step's check needs its end position")
    first = pos - len(claimed) + 1
    out = []
    for j, (row, c) in enumerate(zip(logits, claimed, strict=True)):
        if not 0 <= c < row.shape[-1]:
            raise ModelError("claimed_rows must be token ids")
        token = sample(row, sp, first + j)
        out.append(
            {
                "token": token,
                "token_logit": float(row[token]),
                "claimed_logit": float(row[c]),
                "top": top_logits(row, 8),
            }
        )
    return Reply({"rows": out, "ms": own["ms"]})
