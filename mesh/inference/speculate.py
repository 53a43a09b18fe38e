"""Speculative decoding by prompt lookup: draft tokens from the text so far, verify them in one
step through the route, keep the longest agreeing prefix.

Every generated token otherwise pays one trip around the ring; a verify step carries the last
token and ``k`` drafted ones, each stage runs the ``k + 1`` positions as one chunk, and the
last stage returns the token after every position (:func:`~mesh.inference.sampling.
sample_rows`). Drafts are kept up to the first that differs from the model's own token, which
is then kept too, so a step gives 1 to ``k + 1`` tokens, exactly those of the run without
speculation (greedy and sampled alike, under one seed). The next step starts right after the
kept positions: each stage rolls its KV cache back over the rejected ones (stage sessions
allow that only right after a verify step).

Drafting needs no second model: the longest recent n-gram at the end of the prompt and
output is looked up in the earlier text, and what followed it there is the draft (prompt
lookup decoding, as in llama.cpp's ``lookup`` and vLLM's ``ngram`` speculator). It pays on
repetitive generations: code edits, summaries quoting their text, lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from mesh.errors import Error
from mesh.inference.prompts import MAX_PIECE_BYTES
from mesh.inference.sampling import MAX_DRAFT, MAX_LOGPROBS, MAX_TOP, logprobs, top_logits
from mesh.net.rpc import Reply

__all__ = [
    "DEFAULT_DRAFT",
    "BadVerifyReply",
    "SpecParams",
    "PromptLookup",
    "SpecStats",
    "MAX_ROW_RECORDS",
    "ROW_RECORD",
    "Verified",
    "accepted_prefix",
    "pack_row_extras",
    "verified_tokens",
]

DEFAULT_DRAFT = 6  # drafted tokens per verify step when the request says only "true"
MAX_NGRAM = 4  # longest suffix looked up
# A verify step's per-row top logits and logprobs travel after its text in the payload (17
# rows of 20 alternatives outgrow the 4 KiB header): fixed records, the rows one after another.
ROW_RECORD = np.dtype([("id", "<i4"), ("v", "<f8")])
MAX_ROW_RECORDS = MAX_TOP + 1 + MAX_LOGPROBS  # a row's top, its token's logprob, alternatives


class BadVerifyReply(Error, ValueError):
    """A last stage's answer to a verify step is malformed."""


@dataclass(frozen=True)
class SpecParams:
    """``draft``: tokens drafted per step (0: speculation off); ``ngram``: the longest
    suffix of the text looked up."""

    draft: int = 0
    ngram: int = 3

    def __post_init__(self) -> None:
        if not 0 <= self.draft <= MAX_DRAFT:
            raise ValueError(f"speculative draft length must be in 0..{MAX_DRAFT}")
        if not 1 <= self.ngram <= MAX_NGRAM:
            raise ValueError(f"speculative ngram must be in 1..{MAX_NGRAM}")

    @classmethod
    def from_json(cls, value: Any) -> SpecParams:
        """From a request's ``speculative``: false/absent (off), true (the default draft
        length), an integer (the draft length) or ``{"draft": k, "ngram": n}``."""
        if value is None or value is False:
            return cls()
        if value is True:
            return cls(DEFAULT_DRAFT)
        if type(value) is int:
            return cls(value)
        if isinstance(value, dict) and set(value) <= {"draft", "ngram"}:
            draft, ngram = value.get("draft", DEFAULT_DRAFT), value.get("ngram", 3)
            if type(draft) is int and type(ngram) is int:
                return cls(draft, ngram)
        raise ValueError(
            'speculative must be a boolean, a draft length or {"draft": k, "ngram": n}'
        )

    @property
    def on(self) -> bool:
        return self.draft > 0


class PromptLookup:
    """Drafts from the text so far: for n from ``ngram`` down to 1, the most recent earlier
    occurrence of the last n tokens, and the tokens that followed it. An index of every
    n-gram with a continuation is kept as tokens arrive: a draft costs O(ngram)."""

    def __init__(self, ngram: int = 3) -> None:
        self.ngram = ngram
        self.tokens: list[int] = []
        # per n: n-gram -> index of the token that followed its latest occurrence
        self._index: list[dict[tuple[int, ...], int]] = [{} for _ in range(ngram + 1)]

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            self.tokens.append(t)
            end = len(self.tokens) - 1  # the new token continues the n-grams ending before it
            for n in range(1, self.ngram + 1):
                if end - n >= 0:
                    self._index[n][tuple(self.tokens[end - n : end])] = end

    def draft(self, k: int) -> list[int]:
        if k <= 0:
            return []
        toks = self.tokens
        for n in range(min(self.ngram, len(toks)), 0, -1):
            at = self._index[n].get(tuple(toks[-n:]))
            if at is not None:
                return toks[at : at + k]
        return []


@dataclass
class SpecStats:
    steps: int = 0  # verify steps
    drafted: int = 0
    accepted: int = 0
    plain_steps: int = 0  # decode steps without a draft (nothing matched)
    per_step: list[int] = field(default_factory=list)  # tokens each verify step gave (capped)

    def record(self, drafted: int, accepted: int) -> None:
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        if len(self.per_step) < 256:
            self.per_step.append(accepted + 1)

    def summary(self, params: SpecParams) -> dict[str, Any]:
        return {
            "draft": params.draft,
            "ngram": params.ngram,
            "verify_steps": self.steps,
            "plain_steps": self.plain_steps,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance": round(self.accepted / self.drafted, 4) if self.drafted else 0.0,
        }


def accepted_prefix(drafts: list[int], tokens: list[int]) -> int:
    """How many drafts agree with the model: ``tokens[j]`` follows ``drafts[:j]``."""
    m = 0
    while m < len(drafts) and drafts[m] == tokens[m]:
        m += 1
    return m


@dataclass(frozen=True)
class Verified:
    """A verify step's answer, checked: per row its token, the text the last stage claims
    for it (empty where it sent none), its end-of-sequence flag (None: none sent) and what
    a plain step's result would carry for it (``top``, ``logprobs``; empty if not asked)."""

    tokens: list[int]
    pieces: list[bytes]
    eos: list[bool] | None
    extras: list[dict[str, Any]]


def pack_row_extras(
    rows: npt.NDArray[np.float32], tokens: list[int], top: int, k: int | None
) -> tuple[bytes, int, int | None]:
    """Each row's ``top`` largest logits and, when ``k`` is not None, its token's logprob
    and ``k`` alternatives, as :data:`ROW_RECORD` records; with the counts each row holds
    (a vocabulary smaller than ``top`` or ``k`` gives fewer)."""
    out: list[tuple[int, float]] = []
    n_top, n_alt = 0, None
    for row, token in zip(rows, tokens, strict=True):
        pairs = top_logits(row, top) if top else []
        n_top = len(pairs)
        if k is not None:
            lp, alts = logprobs(row, token, k)
            n_alt = len(alts)
            pairs += [(token, lp)] + [(int(t), float(v)) for t, v in alts]
        out.extend(pairs)
    return np.array(out, dtype=ROW_RECORD).tobytes(), n_top, n_alt


def _row_extras(result: dict[str, Any], block: bytes, rows: int) -> list[dict[str, Any]]:
    """The rows' ``top`` and ``logprobs`` from the records after a verify step's text."""
    n_top, n_alt = result.get("row_top", 0), result.get("row_logprobs")
    if type(n_top) is not int or not 0 <= n_top <= MAX_TOP:
        raise BadVerifyReply("a verify step's top count is out of range")
    if n_alt is not None and (type(n_alt) is not int or not 0 <= n_alt <= MAX_LOGPROBS):
        raise BadVerifyReply("a verify step's logprobs count is out of range")
    width = n_top + (0 if n_alt is None else 1 + n_alt)
    if len(block) != rows * width * ROW_RECORD.itemsize:
        raise BadVerifyReply("a verify step's rows of logits do not match their counts")
    if not width:
        return [{} for _ in range(rows)]
    recs = np.frombuffer(block, dtype=ROW_RECORD).reshape(rows, width)
    if (recs["id"] < 0).any() or not np.isfinite(recs["v"]).all():
        raise BadVerifyReply("a verify step's rows of logits hold a bad token or value")
    ids, values = recs["id"].tolist(), recs["v"].tolist()
    extras: list[dict[str, Any]] = []
    for r_ids, r_vals in zip(ids, values, strict=True):
        pairs = [[t, v] for t, v in zip(r_ids, r_vals, strict=True)]
        extra: dict[str, Any] = {}
        if n_top:
            extra["top"] = pairs[:n_top]
        if n_alt is not None:
            extra["logprobs"] = [pairs[n_top][1], pairs[n_top + 1 :]]
        extras.append(extra)
    return extras


def verified_tokens(reply: Reply, rows: int) -> Verified:
    """The last stage's verify answer, checked (it is a peer's word): a token per row, the
    text it claims for each, its end-of-sequence flags and the rows' logits asked for."""
    r = reply.result
    tokens, lens, eos = r.get("tokens"), r.get("lens"), r.get("eos")
    if (
        not isinstance(tokens, list)
        or len(tokens) != rows
        or not all(type(t) is int and 0 <= t < 1 << 31 for t in tokens)
    ):
        raise BadVerifyReply(f"a verify step of {rows} rows got no {rows} token ids back")
    pieces, text = [b""] * rows, 0
    if isinstance(lens, list) and len(lens) == rows:
        if not all(type(n) is int and 0 <= n <= MAX_PIECE_BYTES for n in lens):
            raise BadVerifyReply("a verify step's text lengths are out of range")
        text = sum(lens)
        if text > len(reply.payload):
            raise BadVerifyReply("a verify step's text does not match its lengths")
        at = 0
        for j, n in enumerate(lens):
            pieces[j] = reply.payload[at : at + n]
            at += n
    extras = _row_extras(r, reply.payload[text:], rows)
    flags = None
    if isinstance(eos, list) and len(eos) == rows and all(isinstance(e, bool) for e in eos):
        flags = [bool(e) for e in eos]
    return Verified(tokens, pieces, flags, extras)
