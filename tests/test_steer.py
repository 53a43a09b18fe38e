"""Verification nobody can steer (issue 13, scope 3), in one process.

A real :class:`Coordinator` runs generations over real :class:`ComputeService` stages on the
fake network of tests/test_run_failover.py; a hostile stage is a real stage whose handler or
compute is wrapped. The cross-process version of the most important attack (text injection
by the last stage) is in tests/test_verification.py.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mesh.inference import coordinator, verify
from mesh.inference.compute import ComputeConfig, ComputeService
from mesh.inference.routes import Stage
from mesh.inference.run import GenerationRun
from mesh.inference.verify import SpotChecker, VerifyParams
from mesh.net.identity import Identity
from mesh.net.rpc import CallContext, Handler, Reply, handlers_of
from runtimes.errors import ModelError
from runtimes.tokenizer import Tokenizer
from tests import test_run_failover
from tests.test_run_failover import COORD, FakeCaller, FakeNet, Mesh, clean_run
from tests.test_run_failover import fast_probes as fast_probes  # noqa: F401 (fixture)
from tests.test_run_failover import tiny as tiny  # noqa: F401 (fixture)

INJECTED = b"<script>visit evil.example</script>"


def inject_text(compute: ComputeService, extra: bytes) -> None:
    """As a last stage, ``compute`` appends ``extra`` to every token's text."""
    real = compute._finish

    async def lying(mid: str, out: Any, params: dict[str, Any], own: dict[str, Any]) -> Any:
        reply = await real(mid, out, params, own)
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

        mesh.net.handlers[peer]["prompts.tokenize"] = lying


async def test_a_lying_tokenizer_does_not_set_the_prompt(
    tmp_path: Path,
    tiny: Path,  # noqa: F811
) -> None:
    """Every stage peer lies about the prompt's tokens: the coordinator, which holds the
    tokenizer, tokenizes the prompt itself."""
    mesh = await Mesh.start(tmp_path / "m", tiny)
    lie_tokenize(mesh, mesh.peers)
    run = GenerationRun(mesh.coord, mesh.request(split=3, tokens=None, prompt="hello world"))
    summary = await mesh.finish(run)
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


class SigningNet(FakeNet):
    """A fake network whose nodes sign and check stage messages with real keys (the audit
    log of a spot check needs them)."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: dict[str, Identity] = {}

    def caller(self, me: str) -> FakeCaller:
        net = self

        class Signing(FakeCaller):
            def sign(self, message: bytes) -> bytes:
                return net.keys.setdefault(self.me, Identity.generate()).sign(message)

            def peer_key(self, peer_id: str) -> bytes:
                return net.keys.setdefault(peer_id, Identity.generate()).public_key

        return Signing(self, me)


async def signing_mesh(root: Path, tiny: Path, n: int) -> Mesh:
    real = test_run_failover.FakeNet
    test_run_failover.FakeNet = SigningNet  # type: ignore[misc]
    try:
        return await Mesh.start(root, tiny, n)
    finally:
        test_run_failover.FakeNet = real  # type: ignore[misc]


def forge_at(compute: ComputeService, positions: set[int]) -> None:
    """As a middle stage, ``compute`` sends noise instead of its output for the steps ending
    at ``positions`` (honest everywhere else: its own KV cache stays right)."""
    real = compute._compute

    async def forging(
        params: dict[str, Any], payload: bytes, sender: str | None = None
    ) -> tuple[Any, Any, Any, dict[str, Any]]:
        st, spec, out, own = await real(params, payload, sender)
        if params.get("pos") in positions and not spec.is_last:
            out = np.asarray(out, np.float32) + 3.0 * float(np.std(out)) + 1.0
        return st, spec, out, own

    compute._compute = forging  # type: ignore[method-assign]


async def test_a_forged_early_prefill_chunk_is_caught(tmp_path: Path, tiny: Path) -> None:  # noqa: F811
    """The first stage forges its output for the first of three prompt chunks only: that
    output is in the next stage's KV cache for good, so every later token may be wrong. Every
    chunk is eligible for a check: the forger is banned, and the tokens are the honest ones."""
    kw = {"split": 2, "prefill_chunk": 4, "max_tokens": 4}
    clean, _ = await clean_run(tmp_path, tiny, **kw)
    mesh = await signing_mesh(tmp_path / "m", tiny, n=4)
    forger = clean["stages"][0]["peer_id"]  # the same route is planned here
    forge_at(mesh.computes[forger], {4})
    run = GenerationRun(mesh.coord, mesh.request(verify=VerifyParams(rate=1.0, seed=1), **kw))
    summary = await mesh.finish(run)
    assert run.parts is not None
    verification = summary["verification"]
    assert [b["peer"] for b in verification["banned"]] == [forger], verification
    assert summary["tokens"] == clean["tokens"]
    assert forger not in {s["peer_id"] for s in summary["stages"]}


def sybils_first(mesh: Mesh, sybils: list[str]) -> None:
    """Views list the Sybils first (the order the previous code kept among equal claims)."""
    net = mesh.net
    net.handlers = {
        COORD: net.handlers[COORD],
        **{p: net.handlers[p] for p in sybils},
        **{p: h for p, h in net.handlers.items() if p not in sybils and p != COORD},
    }


async def test_verifiers_that_only_claim_the_bytes_are_never_drawn(
    tmp_path: Path,
    tiny: Path,  # noqa: F811
) -> None:
    """Two Sybils claim every blob of the model (the honest peers' models reply) without a
    byte of it. Before, verifiers were sorted by such claims: the two Sybils were exactly
    the verifiers drawn. Now a claimer must answer a challenge on a random range of a shard,
    and these fail it: they are never drawn."""
    mesh = await Mesh.start(tmp_path / "m", tiny)
    honest = mesh.peers[0]
    sybils = ["e" * 64, "f" * 64]
    for sybil in sybils:
        compute = ComputeService(
            mesh.net.caller(sybil), sybil, tmp_path / sybil[:4], ComputeConfig(runtime="fake")
        )
        handlers = handlers_of(compute, compute.tokenizers)
        handlers["compute.models"] = mesh.net.handlers[honest]["compute.models"]  # the claim
        mesh.net.handlers[sybil] = handlers
    sybils_first(mesh, sybils)
    checker = SpotChecker(mesh.coord, await mesh.coord.resolve("tiny"), VerifyParams(rate=1.0))
    stage = Stage(mesh.peers[1], (0, 2), "fake")
    try:
        drawn = await checker._verifiers(stage, mesh.peers[1])
    finally:
        await mesh.stop()
    assert drawn and not set(drawn) & set(sybils), drawn
    assert set(drawn) <= set(mesh.peers) - {mesh.peers[1]}
    assert sum("failed a shard challenge" in u for u in checker.stats.unchecked) == 2


def lying_verifier(real: Handler) -> Handler:
    """``compute.stage_recompute`` that always reports a mismatch: noise for activations,
    a far better token than the one claimed for a last stage."""

    async def recompute(ctx: CallContext, params: dict[str, Any], payload: bytes) -> Reply:
        reply = await real(ctx, params, payload)
        assert isinstance(reply, Reply)
        if reply.payload:
            out = np.frombuffer(reply.payload, "<f4") + 5.0
            return Reply(reply.result, out.astype("<f4").tobytes())
        result = dict(reply.result, token_logit=float(reply.result["claimed_logit"]) + 1e3)
        return Reply(result, b"")

    return recompute


# What a hostile verifier may answer instead of a recomputation: each raised TypeError or
# ValueError out of the check (ending the generation), or counted as an accusation.
MALFORMED: list[tuple[dict[str, Any], bytes]] = [
    ({"top": [5], "token": 1, "token_logit": 1.0, "claimed_logit": 1.0}, b""),
    ({"top": [], "token": "x", "token_logit": 1.0, "claimed_logit": 1.0}, b""),
    ({"top": [[1, 2, 3]], "token": 1, "token_logit": 1.0, "claimed_logit": 1.0}, b""),
    ({"top": [], "token": 1, "token_logit": float("nan"), "claimed_logit": 1.0}, b""),
    ({"rows": [{"top": [[1, 2, 3]]}]}, b""),
    ({"rows": "x"}, b""),
    ({}, b"\x00" * 7),
]


def malformed_verifier(real: Handler, answers: list[tuple[dict[str, Any], bytes]]) -> Handler:
    """``compute.stage_recompute`` answering each call with the next malformed answer."""

    async def recompute(ctx: CallContext, params: dict[str, Any], payload: bytes) -> Reply:
        await real(ctx, params, payload)
        result, body = answers[len(calls) % len(answers)]
        calls.append(1)
        return Reply(result, body)

    calls: list[int] = []
    return recompute


async def test_a_verifier_s_malformed_answers_leave_its_checks_unchecked(
    tmp_path: Path,
    tiny: Path,  # noqa: F811
) -> None:
    """Every peer answers recomputations with malformed results. Before, a
    TypeError or ValueError from judging them ended the generation (or a malformed answer
    counted as an accusation of the honest stage); now each such check is unchecked, the
    verifier is named in the summary, nobody is banned and the tokens are the honest ones."""
    kw = {"split": 2, "max_tokens": 6}
    clean, _ = await clean_run(tmp_path, tiny, **kw)
    mesh = await signing_mesh(tmp_path / "m", tiny, n=4)
    for peer in mesh.peers:  # every verifier drawn, on the route or off it
        handlers = mesh.net.handlers[peer]
        real = handlers["compute.stage_recompute"]
        handlers["compute.stage_recompute"] = malformed_verifier(real, MALFORMED)
    run = GenerationRun(mesh.coord, mesh.request(verify=VerifyParams(rate=1.0, seed=1), **kw))
    summary = await mesh.finish(run)
    v = summary["verification"]
    assert summary["tokens"] == clean["tokens"]
    assert not v["banned"] and not v["disputes"] and not mesh.coord.mesh.banned, v  # type: ignore[attr-defined]
    assert any("malformed" in u for u in v["unchecked"]), v


class _SybilsFirst(random.Random):
    """The worst draw for the honest: every jury lists the Sybils first."""

    sybils: list[str] = []

    def shuffle(self, x: Any) -> None:  # type: ignore[override]
        x.sort(key=lambda v: getattr(v, "peer_id", v) not in self.sybils)


async def test_two_colluding_verifiers_cannot_get_an_honest_stage_banned(
    tmp_path: Path,
    tiny: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two members hold the model's bytes (they pass every challenge) and, as verifiers,
    always report a mismatch. Even when they are drawn first for every jury, the honest
    stage is not banned: before, two verifiers' word banned it (and the generation went on
    without it); now a ban on peers' word needs two accusers and no defender among up to
    four jurors, so the stage and its accusers leave this generation only, and the tokens
    are the honest ones."""
    kw = {"split": 2, "max_tokens": 6}
    clean, _ = await clean_run(tmp_path, tiny, **kw)
    mesh = await signing_mesh(tmp_path / "m", tiny, n=6)
    route = {s["peer_id"] for s in clean["stages"]}
    sybils = [p for p in mesh.peers if p not in route][:2]
    for sybil in sybils:
        handlers = mesh.net.handlers[sybil]
        handlers["compute.stage_recompute"] = lying_verifier(handlers["compute.stage_recompute"])
    run = GenerationRun(mesh.coord, mesh.request(verify=VerifyParams(rate=1.0, seed=1), **kw))
    real_views = mesh.coord.views

    async def views(mid: str, exclude: set[str]) -> Any:
        """Once the route is planned (as the clean run's), views list the Sybils first: the
        order the previous code kept among equal claims."""
        found, manifest = await real_views(mid, exclude)
        if run.parts is not None and run.parts.route.stages:
            found.sort(key=lambda v: v.peer_id not in sybils)
        return found, manifest

    mesh.coord.views = views  # type: ignore[method-assign]
    monkeypatch.setattr(_SybilsFirst, "sybils", sybils)
    monkeypatch.setattr(verify.random, "SystemRandom", _SybilsFirst)
    summary = await mesh.finish(run)
    v = summary["verification"]
    assert not v["banned"] and not mesh.coord.mesh.banned, v  # type: ignore[attr-defined]
    assert v["disputes"] and set(v["disputes"][0]["accusers"]) == set(sybils), v
    assert v["disputes"][0]["stage"] in route and v["disputes"][0]["defenders"], v
    assert summary["tokens"] == clean["tokens"]
    assert not {s["peer_id"] for s in summary["stages"]} & set(sybils)


async def test_strangers_of_an_open_mesh_are_spot_checked_by_default(
    tmp_path: Path,
    tiny: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In an open mesh a stranger (no member certificate) runs the first stage and forges
    its outputs; the request asks for no spot checks. Before, nothing was checked and the
    forged tokens went out; now strangers' stages are checked by default, the forger is
    banned and the tokens are the honest ones."""
    kw = {"split": 2, "max_tokens": 8}
    clean, _ = await clean_run(tmp_path, tiny, **kw)
    mesh = await signing_mesh(tmp_path / "m", tiny, n=4)
    forger = clean["stages"][0]["peer_id"]  # the same route is planned here
    forge_at(mesh.computes[forger], set(range(1, 64)))
    mesh.coord._stranger = lambda peer: peer == forger  # an open mesh's test of strangers
    # every stranger step checked (0.25 by default): the test must not depend on a draw
    monkeypatch.setattr(coordinator, "STRANGER_CHECKS", 1.0)
    run = GenerationRun(mesh.coord, mesh.request(**kw))
    summary = await mesh.finish(run)
    verification = summary.get("verification") or {}
    assert [b["peer"] for b in verification.get("banned", [])] == [forger], verification
    assert summary["tokens"] == clean["tokens"]
    assert forger not in {s["peer_id"] for s in summary["stages"]}
