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

from mesh.errors import Error
from mesh.inference.prompts import MAX_PIECE_BYTES
from mesh.inference.sampling import MAX_DRAFT
from mesh.net.rpc import Reply

__all__ = [
    "DEFAULT_DRAFT",
    "BadVerifyReply",
    "SpecParams",
    "PromptLookup",
    "SpecStats",
    "accepted_prefix",
    "verified_tokens",
]

DEFAULT_DRAFT = 6  # drafted tokens per verify step when the request says only "true"
MAX_NGRAM = 4  # longest suffix looked up


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


def verified_tokens(reply: Reply, rows: int) -> tuple[list[int], list[bytes], list[bool] | None]:
    """The last stage's verify answer, checked (it is a peer's word): a token per row, the
    text it claims for each (empty where it sent none) and its end-of-sequence flags."""
    r = reply.result
    tokens, lens, eos = r.get("tokens"), r.get("lens"), r.get("eos")
    if (
        not isinstance(tokens, list)
        or len(tokens) != rows
        or not all(type(t) is int and 0 <= t < 1 << 31 for t in tokens)
    ):
        raise BadVerifyReply(f"a verify step of {rows} rows got no {rows} token ids back")
    pieces = [b""] * rows
    if isinstance(lens, list) and len(lens) == rows:
        if not all(type(n) is int and 0 <= n <= MAX_PIECE_BYTES for n in lens):
            raise BadVerifyReply("a verify step's text lengths are out of range")
        if sum(lens) != len(reply.payload):
            raise BadVerifyReply("a verify step's text does not match its lengths")
        at = 0
        for j, n in enumerate(lens):
            pieces[j] = reply.payload[at : at + n]
            at += n
    flags = None
    if isinstance(eos, list) and len(eos) == rows and all(isinstance(e, bool) for e in eos):
        flags = [bool(e) for e in eos]
    return tokens, pieces, flags
