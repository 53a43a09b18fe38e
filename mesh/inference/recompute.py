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
from mesh.inference.sampling import SamplingParams, sample, top_logits
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
        row, outs, ms = len(payload) // n, [], 0.0
        for a in range(0, n, PREFILL_CHUNK):  # chunked as a prefill: bounded attention memory
            b = min(n, a + PREFILL_CHUNK)
            step = {"sid": sid, "n": b - a, "pos": b}
            cur, spec, chunk_out, own = await self._compute(step, payload[a * row : b * row])
            chunk_out = np.asarray(chunk_out, dtype=np.float32)
            outs.append(chunk_out.reshape(-1, chunk_out.shape[-1]))
            ms += own["ms"]
        own = dict(own, ms=round(ms, 3))
        out = np.concatenate(outs)
        if not spec.is_last:
            tail = np.ascontiguousarray(out[-rows:], dtype="<f4")
            return Reply({"rows": int(tail.shape[0]), "ms": own["ms"]}, tail.tobytes())
        logits = out[-1]
        try:
            sp = SamplingParams.from_wire(params.get("sample", {}))
        except ValueError as exc:
            raise ModelError(str(exc)) from None
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
