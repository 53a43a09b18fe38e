"""Prompts to tokens on the peer that holds a model's tokenizer (the blob with the embedding
or the output head), and tokens back to text bytes on the last stage.

``tokenize`` takes the prompt's UTF-8 bytes as its payload and answers int32 little-endian
tokens in the reply's payload: both outgrow the 4 KiB RPC header for any real prompt.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from mesh.errors import RPCError
from mesh.inference.routes import PeerView, RouteError
from mesh.net.rpc import CallContext, MeshCaller, Reply
from runtimes.errors import ModelError
from runtimes.shards import Manifest

__all__ = ["MAX_PROMPT_BYTES", "Tokenizers", "tokenize_on", "tokenizer_blobs", "tokens_of"]

log = logging.getLogger(__name__)

MAX_PROMPT_BYTES = 1 << 20  # as the HTTP API's request cap


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


async def tokenize_on(
    mesh: MeshCaller, mid: str, manifest: Manifest, views: list[PeerView], first: str, text: str
) -> list[int]:
    """The prompt's tokens from a peer holding the model's embedding or head blob (the
    tokenizer travels with them): this node first, then the route's first stage ``first``."""
    ends = tokenizer_blobs(manifest)
    holders = sorted(
        (v.peer_id for v in views if ends & v.held),
        key=lambda p: (p != mesh.me, p != first),
    )
    failure: Exception | None = None
    for peer in holders[:3]:
        try:
            reply = await mesh.call(peer, "prompts.tokenize", {"model_id": mid}, text.encode())
            return tokens_of(reply)
        except (RPCError, ModelError) as exc:
            failure = exc
            log.info("tokenizing on %s failed: %s", peer[:12], exc)
    raise RouteError(f"no peer could tokenize the prompt ({failure or 'no tokenizer held'})")


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

    def cached(self, mid: str) -> Any | None:
        """The tokenizer if already loaded (the hot path of every step: no I/O)."""
        return self._loaded.get(mid)

    async def get(self, mid: str) -> Any:
        if mid in self._loaded:
            return self._loaded[mid]
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
        tokens = await asyncio.to_thread(tok.encode, text, bool(params.get("add_bos", True)))
        return Reply({"n": len(tokens), "eos": tok.eos_id}, np.asarray(tokens, "<i4").tobytes())
