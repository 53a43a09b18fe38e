"""Prompts to tokens and tokens to text, where the model's tokenizer is (the blobs with the
embedding or the output head).

Neither is taken on one peer's word: the coordinator tokenizes the prompt and detokenizes
every generated token itself when it holds the tokenizer; otherwise the answer of one holder
is cross-checked with a second one (:func:`tokenize_prompt`, :class:`Pieces`). The last
stage's text for a token is never what the client sees (it could inject text, or grow the
coordinator by megabytes a token).

``tokenize`` takes the prompt's UTF-8 bytes as its payload and answers int32 little-endian
tokens in the reply's payload: both outgrow the 4 KiB RPC header for any real prompt.
``detokenize`` takes int32 token ids and answers their texts, concatenated, with lengths.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from mesh.errors import RPCError
from mesh.inference.routes import RouteError
from mesh.net.callers import MeshCaller
from mesh.net.rpc import CallContext, Reply
from runtimes.errors import ModelError
from runtimes.shards import Manifest

__all__ = [
    "MAX_PIECE_BYTES",
    "MAX_PROMPT_BYTES",
    "Pieces",
    "Tokenizers",
    "tokenize_prompt",
    "tokenizer_blobs",
    "tokens_of",
]

log = logging.getLogger(__name__)

MAX_PROMPT_BYTES = 1 << 20  # as the HTTP API's request cap
MAX_PIECE_BYTES = 256  # one token's text (llama.cpp vocabularies stay far below)
MAX_DETOKENIZE = 64  # token ids per detokenize call
_MAX_CACHED_PIECES = 1 << 16


def tokenizer_blobs(manifest: Manifest) -> set[str]:
    """The blobs that carry the model's tokenizer: those of the embedding and of the head."""
    n = len(manifest.units)
    return {b.sha256 for b in manifest.blobs_for(0, 1) + manifest.blobs_for(n - 1, n)}


def tokens_of(reply: Reply) -> list[int]:
    """The tokens of a ``tokenize`` reply, size-capped and checked (it is untrusted)."""
    n, data = reply.result.get("n"), reply.payload
    # llama.cpp gives at most one token per byte of text, plus BOS
    if len(data) % 4 or len(data) > 4 * (MAX_PROMPT_BYTES + 1) or n != len(data) // 4:
        raise ModelError("malformed tokenize reply")
    tokens = np.frombuffer(data, "<i4")
    if tokens.size and int(tokens.min()) < 0:
        raise ModelError("tokenize reply holds a negative token id")
    return [int(t) for t in tokens]


async def tokenize_prompt(
    mesh: MeshCaller,
    mid: str,
    tok: Any | None,
    holders: list[str],
    text: str,
    chat: bool = False,
) -> list[int]:
    """The prompt's tokens: by this node's tokenizer ``tok`` when it holds one; else by the
    first two of ``holders`` (other peers holding a tokenizer blob, best first), which must
    agree: a lone peer's tokens would be the ground truth every spot check compares with.
    ``chat``: a rendered chat template (special tokens parsed, no BOS added: the template
    writes it), as llama.cpp tokenizes one."""
    if len(text.encode()) > MAX_PROMPT_BYTES:
        raise ModelError(f"a prompt over {MAX_PROMPT_BYTES} bytes")
    if tok is not None:
        return [int(t) for t in await asyncio.to_thread(tok.encode, text, not chat, chat)]
    answers: list[tuple[str, list[int]]] = []
    failure: Exception | None = None
    params: dict[str, Any] = {"model_id": mid}
    if chat:
        params.update(add_bos=False, special=True)
    for peer in holders[:4]:
        try:
            reply = await mesh.call(peer, "prompts.tokenize", params, text.encode())
            answers.append((peer, tokens_of(reply)))
        except (RPCError, ModelError) as exc:
            failure = exc
            log.info("tokenizing on %s failed: %s", peer[:12], exc)
        if len(answers) == 2:
            break
    if not answers:
        raise RouteError(f"no peer could tokenize the prompt ({failure or 'no tokenizer held'})")
    if len(answers) == 2 and answers[0][1] != answers[1][1]:
        a, b = answers[0][0][:12], answers[1][0][:12]
        raise ModelError(f"tokenizer holders {a} and {b} tokenize the prompt differently")
    if len(answers) == 1:
        log.warning("prompt tokenized by %s alone: no second holder", answers[0][0][:12])
    return answers[0][1]


class Pieces:
    """Each generated token's text as the client sees it. With this node's tokenizer ``tok``
    that is the truth; else a holder other than the last stage says it (cached per token id),
    and it must equal what the last stage sent: two peers that disagree stop the generation
    rather than show either's text. With no other holder the last stage's text stands, capped
    at MAX_PIECE_BYTES."""

    def __init__(self, mesh: MeshCaller, mid: str, tok: Any | None, holders: list[str]) -> None:
        self.mesh = mesh
        self.mid = mid
        self.tok = tok
        self.holders = holders
        self.eos_id: int | None = int(tok.eos_id) if tok is not None else None
        self._cache: dict[int, bytes] = {}

    async def piece(self, token: int, claimed: bytes, last: str) -> bytes:
        if self.tok is not None:
            return bytes(self.tok.token_bytes(token))
        if len(claimed) > MAX_PIECE_BYTES:
            raise ModelError(f"last stage {last[:12]} sent {len(claimed)} bytes of text a token")
        known = self._cache.get(token)
        if known is None:
            known = await self._ask(token, last)
        if known is None:
            return claimed
        if known != claimed:
            raise ModelError(f"last stage {last[:12]} and a tokenizer disagree on token {token}")
        return known

    async def text_of(self, token: int, last: str) -> bytes:
        """A token's text where no stage claimed one (an alternative of a logprobs list):
        this node's tokenizer, else a holder's word, else empty."""
        if self.tok is not None:
            return bytes(self.tok.token_bytes(token))
        known = self._cache.get(token)
        if known is None:
            known = await self._ask(token, last)
        return known or b""

    def is_eos(self, token: int, claimed: bool) -> bool:
        """Whether ``token`` ends the generation: the stage's word only when nobody else's."""
        return claimed if self.eos_id is None else token == self.eos_id

    async def _ask(self, token: int, last: str) -> bytes | None:
        ids = np.asarray([token], "<i4").tobytes()
        for peer in [h for h in self.holders if h != last][:2]:
            try:
                params = {"model_id": self.mid}
                reply = await self.mesh.call(peer, "prompts.detokenize", params, ids)
                (piece,) = pieces_of(reply, 1)
            except (RPCError, ModelError) as exc:
                log.info("detokenizing on %s failed: %s", peer[:12], exc)
                continue
            eos = reply.result.get("eos")
            if self.eos_id is None and type(eos) is int:
                self.eos_id = eos
            if len(self._cache) >= _MAX_CACHED_PIECES:
                self._cache.clear()
            self._cache[token] = piece
            return piece
        return None


def pieces_of(reply: Reply, n: int) -> list[bytes]:
    """The ``n`` texts of a ``detokenize`` reply, size-capped and checked (it is untrusted)."""
    lengths, data = reply.result.get("lengths"), reply.payload
    if (
        not isinstance(lengths, list)
        or len(lengths) != n
        or any(type(k) is not int or not 0 <= k <= MAX_PIECE_BYTES for k in lengths)
        or sum(lengths) != len(data)
    ):
        raise ModelError("malformed detokenize reply")
    out, at = [], 0
    for k in lengths:
        out.append(data[at : at + k])
        at += k
    return out


class Tokenizers:
    """llama.cpp tokenizers of the models this node holds an end blob of, loaded once each.

    ``manifests``: the node's known models; ``blob_path(sha)``: a held blob's file, or None.
    """

    name = "prompts"  # RPC namespace: peers call "prompts.<method>"

    def status(self) -> dict[str, Any]:
        return {"tokenizers_loaded": len(self._loaded)}

    def __init__(
        self, manifests: dict[str, Manifest], blob_path: Callable[[str], Any | None]
    ) -> None:
        self._manifests = manifests
        self._blob_path = blob_path
        self._loaded: dict[str, Any] = {}
        # One load at a time: a batch job's first generations all ask at once, and each load
        # of Gemma 3's vocabulary costs 3-5 s and its own copy of the tables.
        self._loading = asyncio.Lock()

    def cached(self, mid: str) -> Any | None:
        """The tokenizer if already loaded (the hot path of every step: no I/O)."""
        return self._loaded.get(mid)

    async def get(self, mid: str) -> Any:
        if mid in self._loaded:
            return self._loaded[mid]
        async with self._loading:
            if mid in self._loaded:  # loaded while this call waited
                return self._loaded[mid]
            return await self._load(mid)

    async def _load(self, mid: str) -> Any:
        from runtimes.tokenizer import Tokenizer

        for sha in sorted(tokenizer_blobs(self._manifests[mid])):
            path = self._blob_path(sha)
            if path is not None:
                tok = await asyncio.to_thread(Tokenizer, path)
                self._loaded[mid] = tok
                return tok
        raise ModelError("this node holds no blob with the tokenizer")

    async def rpc_tokenize(self, ctx: CallContext, params: dict[str, Any], payload: bytes) -> Reply:
        """The payload's UTF-8 text as tokens (``tokens_of`` reads the reply)."""
        mid = params.get("model_id")
        if not isinstance(mid, str) or mid not in self._manifests:
            raise ModelError("tokenize needs a known model id")
        if "text" in params:  # an older peer: its prompt would be read as empty
            raise ModelError("tokenize takes the text as its payload, not as a parameter")
        if len(payload) > MAX_PROMPT_BYTES:
            raise ModelError(f"a prompt of {len(payload)} bytes exceeds {MAX_PROMPT_BYTES}")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelError("the prompt is not UTF-8") from None
        tok = await self.get(mid)
        # Up to 1 MiB of text takes llama.cpp about a second: never on the event loop.
        add_bos, special = params.get("add_bos", True), params.get("special", False)
        tokens = await asyncio.to_thread(tok.encode, text, add_bos is True, special is True)
        return Reply({"n": len(tokens), "eos": tok.eos_id}, np.asarray(tokens, "<i4").tobytes())

    async def rpc_detokenize(
        self, ctx: CallContext, params: dict[str, Any], payload: bytes
    ) -> Reply:
        """The texts of up to MAX_DETOKENIZE int32 token ids (``pieces_of`` reads the reply)."""
        mid = params.get("model_id")
        if not isinstance(mid, str) or mid not in self._manifests:
            raise ModelError("detokenize needs a known model id")
        if len(payload) % 4 or len(payload) > 4 * MAX_DETOKENIZE:
            raise ModelError(f"detokenize takes up to {MAX_DETOKENIZE} int32 token ids")
        tok = await self.get(mid)
        texts = [tok.token_bytes(int(t))[:MAX_PIECE_BYTES] for t in np.frombuffer(payload, "<i4")]
        return Reply({"lengths": [len(t) for t in texts], "eos": tok.eos_id}, b"".join(texts))
