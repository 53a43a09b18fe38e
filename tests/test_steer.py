"""Verification nobody can steer (issue 13, scope 3), in one process.

A real :class:`Coordinator` runs generations over real :class:`ComputeService` stages on the
fake network of tests/test_run_failover.py; a hostile stage is a real stage whose handler or
compute is wrapped. The cross-process version of the most important attack (text injection
by the last stage) is in tests/test_verification.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mesh.inference.compute import ComputeService
from mesh.inference.run import GenerationRun
from mesh.net.rpc import CallContext, Reply
from runtimes.errors import ModelError
from runtimes.tokenizer import Tokenizer
from tests.test_run_failover import COORD, Mesh, clean_run
from tests.test_run_failover import fast_probes as fast_probes  # noqa: F401 (fixture)
from tests.test_run_failover import tiny as tiny  # noqa: F401 (fixture)

INJECTED = b"<script>visit evil.example</script>"


def inject_text(compute: ComputeService, extra: bytes) -> None:
    """As a last stage, ``compute`` appends ``extra`` to every token's text."""
    real = compute._finish

    def lying(mid: str, out: Any, params: dict[str, Any], own: dict[str, Any]) -> Any:
        reply = real(mid, out, params, own)
        return type(reply)(reply.result, reply.payload + extra)

    compute._finish = lying  # type: ignore[method-assign]


def no_local_tokenizer(mesh: Mesh) -> None:
    """The coordinator's node loads no tokenizer (as one holding only middle blobs)."""

    async def none(mid: str) -> Any:
        raise ModelError("this node holds no blob with the tokenizer")

    mesh.computes[COORD].tokenizers.get = none  # type: ignore[method-assign]


@pytest.mark.parametrize("extra", [INJECTED, b"x" * (1 << 20)], ids=["inject", "grow-1MiB"])
async def test_last_stage_cannot_inject_or_inflate_the_text(
    tmp_path: Path,
    tiny: Path,
    extra: bytes,  # noqa: F811
) -> None:
    """Every stage appends text to its tokens' pieces: the client's text is exactly the
    detokenized token ids, and the coordinator keeps no byte of the stage's payload."""
    clean, _ = await clean_run(tmp_path, tiny, split=3)
    mesh = await Mesh.start(tmp_path / "m", tiny)
    for peer in mesh.peers:
        inject_text(mesh.computes[peer], extra)
    run = GenerationRun(mesh.coord, mesh.request(split=3))
    try:
        events = await mesh.generate(run)
    finally:
        await mesh.stop()
    summary = events[-1]
    assert summary["tokens"] == clean["tokens"]
    tok = Tokenizer(tiny)
    expected = b"".join(tok.token_bytes(t) for t in summary["tokens"]).decode("utf-8", "replace")
    assert summary["text"] == expected == clean["text"]
    streamed = "".join(e["text"] for e in events if "token" in e)
    assert INJECTED.decode() not in streamed and "xxxx" not in streamed
    assert len(streamed.encode()) <= len(expected.encode())


async def test_without_a_local_tokenizer_a_second_holder_checks_the_text(
    tmp_path: Path,
    tiny: Path,  # noqa: F811
) -> None:
    """The coordinator holds no tokenizer: the last stage's text is compared with another
    holder's, and an injected text stops the generation instead of reaching the client."""
    mesh = await Mesh.start(tmp_path / "m", tiny)
    no_local_tokenizer(mesh)
    honest = GenerationRun(mesh.coord, mesh.request(split=3))
    try:
        summary = (await mesh.generate(honest))[-1]
        for peer in mesh.peers:
            inject_text(mesh.computes[peer], INJECTED)
        lying = GenerationRun(mesh.coord, mesh.request(split=3))
        with pytest.raises(ModelError, match="disagree on token"):
            await mesh.generate(lying)
    finally:
        await mesh.stop()
    tok = Tokenizer(tiny)
    assert summary["text"] == tok.decode(summary["tokens"])


def lie_tokenize(mesh: Mesh, peers: list[str]) -> None:
    """``peers`` answer ``tokenize`` with tokens of their choosing (each its own)."""
    for i, peer in enumerate(peers):

        async def lying(
            ctx: CallContext, params: dict[str, Any], payload: bytes, i: int = i
        ) -> Reply:
            tokens = [1, 66 + i, 66, 66]
            return Reply({"n": len(tokens)}, np.asarray(tokens, "<i4").tobytes())

        mesh.net.handlers[peer]["tokenize"] = lying


async def test_a_lying_tokenizer_does_not_set_the_prompt(
    tmp_path: Path,
    tiny: Path,  # noqa: F811
) -> None:
    """Every stage peer lies about the prompt's tokens: the coordinator, which holds the
    tokenizer, tokenizes the prompt itself."""
    mesh = await Mesh.start(tmp_path / "m", tiny)
    lie_tokenize(mesh, mesh.peers)
    run = GenerationRun(mesh.coord, mesh.request(split=3, tokens=None, prompt="hello world"))
    try:
        summary = (await mesh.generate(run))[-1]
    finally:
        await mesh.stop()
    assert run.parts is not None
    assert run.parts.prompt == Tokenizer(tiny).encode("hello world")
    assert summary["prompt_tokens"] == len(run.parts.prompt)


async def test_a_lying_tokenizer_is_cross_checked_by_a_second_holder(
    tmp_path: Path,
    tiny: Path,  # noqa: F811
) -> None:
    """Without a local tokenizer, the first stage (asked first) lies about the prompt: the
    second holder's answer differs and the generation is refused before any session."""
    mesh = await Mesh.start(tmp_path / "m", tiny)
    no_local_tokenizer(mesh)
    lie_tokenize(mesh, mesh.peers[:1] + mesh.peers[2:])  # all but one honest holder
    run = GenerationRun(mesh.coord, mesh.request(split=3, tokens=None, prompt="hello world"))
    try:
        with pytest.raises(ModelError, match="tokenize the prompt differently"):
            await mesh.generate(run)
    finally:
        await mesh.stop()
    assert mesh.sessions_left() == {}
