"""Speculative decoding (issue 16, scope 3), in one process: drafting by prompt lookup, the
acceptance rule, verify steps through a real coordinator and real stage services (the fake
runtime, the fake network of tests/test_run_failover.py), failover replays and spot checks
of verify steps, and the stages' checks on a verify step's wire fields.

The cross-process tests (onnx stages in separate node processes, a stage SIGKILLed, spot
checks with real signatures, Gemma 3 270M) are in tests/test_speculative_mesh.py.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mesh.inference import steps
from mesh.inference.audit import AuditEntry, AuditLog, pack_entries, unpack_entries
from mesh.inference.run import GenerationRun
from mesh.inference.sampling import MAX_DRAFT, SamplingParams, sample, sample_rows, target_probs
from mesh.inference.speculate import ROW_RECORD, PromptLookup, SpecParams, accepted_prefix
from runtimes.testmodels import write_test_model
from tests.test_run_failover import COORD, Mesh, clean_run, nth_step_at

SPEC = SpecParams(4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_model(tmp_path_factory.mktemp("spec") / "llama.gguf", "llama")


@pytest.fixture(autouse=True)
def fast_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(steps, "PROBE_EVERY", 0.05)  # in one process a probe is instant


# -- drafting and acceptance ------------------------------------------------------------------
def test_prompt_lookup_drafts_what_followed_the_latest_match() -> None:
    lookup = PromptLookup(3)
    lookup.extend([5, 6, 7, 8, 9, 1, 2, 6, 7, 3, 4])
    assert lookup.draft(4) == []  # 4, (3, 4), (7, 3, 4) never occurred before
    lookup.extend([6, 7])  # (4, 6, 7) unseen, (6, 7) last seen before 3
    assert lookup.draft(3) == [3, 4, 6]
    lookup.extend([8])  # (6, 7, 8) seen at the start: 9, 1, 2 followed
    assert lookup.draft(3) == [9, 1, 2]
    assert lookup.draft(0) == []
    assert PromptLookup(2).draft(3) == []


def test_accepted_prefix() -> None:
    assert accepted_prefix([4, 5, 6], [4, 5, 6, 7]) == 3
    assert accepted_prefix([4, 5, 6], [4, 9, 6, 7]) == 1
    assert accepted_prefix([4, 5, 6], [1, 5, 6, 7]) == 0


def test_spec_params_from_json() -> None:
    assert not SpecParams.from_json(None).on and not SpecParams.from_json(False).on
    assert SpecParams.from_json(True).on
    assert SpecParams.from_json(5) == SpecParams(5)
    assert SpecParams.from_json({"draft": 3, "ngram": 2}) == SpecParams(3, 2)
    for bad in (MAX_DRAFT + 1, -1, "yes", {"draft": 3, "other": 1}, {"ngram": 9}, 2.5):
        with pytest.raises(ValueError):
            SpecParams.from_json(bad)


def test_requests_parse_speculative() -> None:
    from mesh.api.errors import ApiError
    from mesh.api.generate import parse_generation
    from mesh.api.openai import parse_openai

    assert not parse_generation({"model": "m", "prompt": "x"}).speculative.on  # off by default
    assert parse_generation({"model": "m", "speculative": 3}).speculative == SpecParams(3)
    for bad in ("yes", 99, {"draft": "4"}):
        with pytest.raises(ApiError, match="speculative"):
            parse_generation({"model": "m", "speculative": bad})
    # the rows of a verify step carry top logits and logprobs as plain steps do
    both = parse_generation({"model": "m", "speculative": True, "top": 4})
    assert both.speculative.on and both.top == 4
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    o = parse_openai(dict(chat, speculative={"draft": 5, "ngram": 2}), chat=True)
    assert o.req.speculative == SpecParams(5, 2)
    o = parse_openai(dict(chat, speculative=True, logprobs=True, top_logprobs=3), chat=True)
    assert o.req.speculative.on and o.req.logprobs == 3


# A tiny "model" over a vocabulary of V tokens: the logits after a token are a fixed random row.
V = 5
_TABLE = np.random.default_rng(7).standard_normal((V, V)).astype(np.float32) * 1.5
SAMPLING = SamplingParams(temperature=1.0, top_k=4)  # top-k too: the target is p after it


def _speculative(seed: int, first: int, drafts: list[int], length: int) -> list[int]:
    """Tokens after ``first`` generated with the production rule: each verify step's rows
    sampled by ``sample_rows``, drafts kept up to the first disagreement (speculate.py)."""
    sp = SamplingParams(SAMPLING.temperature, SAMPLING.top_k, SAMPLING.top_p, seed)
    out: list[int] = []
    last = first
    while len(out) < length:
        chunk = [last] + drafts[: length - len(out) - 1]
        rows = _TABLE[chunk]
        tokens = sample_rows(rows, sp, 1 + len(out))
        m = accepted_prefix(chunk[1:], tokens)
        out += tokens[: m + 1]
        last = out[-1]
    return out[:length]


def _naive(seed: int, first: int, drafts: list[int], length: int) -> list[int]:
    """A wrong rule, for the control: keep a draft with probability p(d), else redraw from p
    (not from the residual norm(max(0, p - q))): it over-weights the drafted tokens."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    last = first
    for j in range(length):
        p = target_probs(_TABLE[last].astype(np.float64), SAMPLING)
        d = drafts[j % len(drafts)]
        t = d if rng.random() < p[d] else int(rng.choice(V, p=p))
        out.append(t)
        last = t
    return out


def _exact(first: int, length: int) -> dict[tuple[int, ...], float]:
    """The target distribution of ``length`` tokens after ``first``."""
    probs = {(): 1.0}
    for _ in range(length):
        nxt: dict[tuple[int, ...], float] = {}
        for seq, q in probs.items():
            p = target_probs(_TABLE[seq[-1] if seq else first].astype(np.float64), SAMPLING)
            for t in range(V):
                if p[t] > 0:
                    nxt[seq + (t,)] = q * p[t]
        probs = nxt
    return probs


def _tv(counts: Counter[tuple[int, ...]], exact: dict[tuple[int, ...], float], n: int) -> float:
    keys = set(counts) | set(exact)
    return 0.5 * sum(abs(counts.get(k, 0) / n - exact.get(k, 0.0)) for k in keys)


def test_acceptance_rule_reproduces_the_target_distribution() -> None:
    """Sequences of 3 tokens over a 5-token vocabulary, 20000 seeds, drafts that are often
    wrong (always 0, 1, 2): the speculative output's joint distribution is the target's
    within a total-variation bound that sampling noise stays well under (about 0.02 here),
    and that the naive rule (redraw from p on a rejection) exceeds several times over."""
    n, length, first, drafts = 20000, 3, 2, [0, 1, 2]
    exact = _exact(first, length)
    spec = Counter(tuple(_speculative(seed, first, drafts, length)) for seed in range(n))
    naive = Counter(tuple(_naive(seed, first, drafts, length)) for seed in range(n))
    bound = 0.035
    assert _tv(spec, exact, n) < bound
    assert _tv(naive, exact, n) > 2 * bound
    # and each sequence is the one plain sampling gives under the same seed
    for seed in range(50):
        sp = SamplingParams(SAMPLING.temperature, SAMPLING.top_k, SAMPLING.top_p, seed)
        plain, last = [], first
        for j in range(length):
            last = sample(_TABLE[last], sp, 1 + j)
            plain.append(last)
        assert _speculative(seed, first, drafts, length) == plain


# -- through a route ----------------------------------------------------------------------------
async def _run(mesh: Mesh, **kw: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    run = GenerationRun(mesh.coord, mesh.request(**kw))
    events = await mesh.generate(run)
    return events[-1], events


@pytest.mark.parametrize("mode", ["push", "chain"])
async def test_greedy_speculative_gives_the_plain_tokens(
    tmp_path: Path, tiny: Path, mode: str
) -> None:
    mesh = await Mesh.start(tmp_path / "m", tiny)
    try:
        kw: dict[str, Any] = {"split": 3, "max_tokens": 40, "mode": mode}
        plain, _ = await _run(mesh, **kw)
        spec, events = await _run(mesh, speculative=SPEC, **kw)
    finally:
        await mesh.stop()
    assert spec["tokens"] == plain["tokens"]
    assert [e["token"] for e in events if "token" in e] == plain["tokens"]
    assert spec["text"] == plain["text"]
    s = spec["speculative"]
    assert s["verify_steps"] > 0 and s["accepted"] > 0  # the drafts were used
    assert spec["decode_steps"] < plain["decode_steps"]  # fewer trips around the ring
    assert "speculative" not in plain
    assert mesh.sessions_left() == {}


@pytest.mark.parametrize("mode", ["push", "chain"])
async def test_speculative_gives_the_plain_top_logits_and_logprobs(
    tmp_path: Path, tiny: Path, mode: str
) -> None:
    """Each token of a verify step carries its own row's top logits and logprobs, those a
    plain step gives for it (the fake runtime computes every row as a one-row step would)."""
    mesh = await Mesh.start(tmp_path / "m", tiny)
    try:
        kw: dict[str, Any] = {"split": 3, "max_tokens": 40, "mode": mode, "top": 5}
        kw["logprobs"] = 3
        plain, plain_events = await _run(mesh, **kw)
        spec, spec_events = await _run(mesh, speculative=SPEC, **kw)
    finally:
        await mesh.stop()
    assert spec["tokens"] == plain["tokens"]
    assert spec["speculative"]["accepted"] > 0  # tokens came from inner rows
    plain_tokens = [e for e in plain_events if "token" in e]
    spec_tokens = [e for e in spec_events if "token" in e]
    assert len(spec_tokens) == len(plain_tokens) == 40
    for a, b in zip(plain_tokens, spec_tokens, strict=True):
        assert [t for t, _ in b["top"]] == [t for t, _ in a["top"]]
        assert np.allclose([v for _, v in b["top"]], [v for _, v in a["top"]], atol=1e-5)
        assert b["logprobs"]["logprob"] == pytest.approx(a["logprobs"]["logprob"], abs=1e-5)
        assert [x["id"] for x in b["logprobs"]["top"]] == [x["id"] for x in a["logprobs"]["top"]]
        assert [x["bytes"] for x in b["logprobs"]["top"]] == [
            x["bytes"] for x in a["logprobs"]["top"]
        ]
        assert len(b["logprobs"]["top"]) == 3


def test_a_verify_reply_s_rows_of_logits_are_checked() -> None:
    """What a last stage sends after a verify step's text is a peer's word: counts out of
    range, a block that does not match them, negative ids or non-finite values are refused
    before use; a well-formed block gives each row its ``top`` and ``logprobs``."""
    from mesh.inference.speculate import BadVerifyReply, pack_row_extras, verified_tokens
    from mesh.net.rpc import Reply

    rows = np.log(np.random.default_rng(3).dirichlet(np.ones(V), size=3)).astype(np.float32)
    tokens = [int(np.argmax(r)) for r in rows]
    block, n_top, n_alt = pack_row_extras(rows, tokens, 2, 3)
    assert (n_top, n_alt) == (2, 3) and len(block) == 3 * (2 + 1 + 3) * 12
    head = {"tokens": tokens, "lens": [1, 2, 0], "row_top": 2, "row_logprobs": 3}
    v = verified_tokens(Reply(head, b"abc" + block), 3)
    assert v.pieces == [b"a", b"bc", b""]
    for row, token, extra in zip(rows, tokens, v.extras, strict=True):
        assert [t for t, _ in extra["top"]] == list(np.argsort(-row)[:2])
        lp, alts = extra["logprobs"]
        assert lp == pytest.approx(float(row[token]), abs=1e-6)  # the rows are log-softmaxed
        assert len(alts) == 3 and alts[0][0] == token
    plain = verified_tokens(Reply({"tokens": tokens}), 3)
    assert plain.extras == [{}, {}, {}]

    nan = np.frombuffer(block, dtype=ROW_RECORD).copy()
    nan["v"][4] = np.nan
    negative = np.frombuffer(block, dtype=ROW_RECORD).copy()
    negative["id"][0] = -1
    bad = [
        (dict(head, row_top=65), block, "top count"),
        (dict(head, row_logprobs=21), block, "logprobs count"),
        (dict(head, row_logprobs="3"), block, "logprobs count"),
        (head, block[:-12], "do not match"),
        (dict(head, row_top=3), block, "do not match"),
        (head, nan.tobytes(), "bad token or value"),
        (head, negative.tobytes(), "bad token or value"),
        (dict(head, lens=[200, 200, 200]), block, "does not match its lengths"),
    ]
    for result, body, match in bad:
        with pytest.raises(BadVerifyReply, match=match):
            verified_tokens(Reply(result, b"abc" + body), 3)


async def test_sampled_speculative_gives_the_plain_tokens_for_a_seed(
    tmp_path: Path, tiny: Path
) -> None:
    mesh = await Mesh.start(tmp_path / "m", tiny)
    try:
        kw: dict[str, Any] = {"split": 2, "max_tokens": 30, "prefill_chunk": 4}
        kw["sampling"] = SamplingParams(temperature=0.7, top_k=8, seed=1234)
        plain, _ = await _run(mesh, **kw)
        spec, _ = await _run(mesh, speculative=SPEC, **kw)
        again, _ = await _run(mesh, speculative=SPEC, **kw)
        other = SamplingParams(temperature=0.7, top_k=8, seed=99)
        different, _ = await _run(mesh, speculative=SPEC, **{**kw, "sampling": other})
    finally:
        await mesh.stop()
    assert spec["tokens"] == plain["tokens"] == again["tokens"]
    assert spec["speculative"]["verify_steps"] > 0
    assert different["tokens"] != spec["tokens"]


@pytest.mark.parametrize(("how", "position", "nth"), [("kill", 1, 5), ("gone", 2, 7)])
async def test_failover_replays_verify_steps(
    tmp_path: Path, tiny: Path, how: str, position: int, nth: int
) -> None:
    """A stage lost after some verify steps: the replacement is replayed the history, verify
    steps whole with their rollbacks, and the tokens are the fault-free plain run's."""
    kw: dict[str, Any] = {"split": 3, "max_tokens": 30}
    clean, clean_net = await clean_run(tmp_path, tiny, **kw)
    mesh = await Mesh.start(tmp_path / "faulty", tiny)
    run = GenerationRun(mesh.coord, mesh.request(speculative=SPEC, **kw))
    mesh.net.fault = nth_step_at(position, nth, how)(run)
    summary = await mesh.finish(run)
    assert summary["tokens"] == clean["tokens"]
    (reroute,) = summary["reroutes"]
    assert reroute["failed"] == clean["stages"][position]["peer_id"]
    assert run.parts is not None
    verify_steps = [keep for _, _, keep in run.parts.failover.fed if keep is not None]
    assert verify_steps, "no verify step before the fault: the replay did not cover one"
    assert mesh.sessions_left() == {}


# -- the stages' checks -------------------------------------------------------------------------
async def test_stages_refuse_bad_verify_steps(tmp_path: Path, tiny: Path) -> None:
    """Rollback only right after a verify step and not below its first position; ``draft``
    bounded and matching the rows."""
    from mesh.net.rpc import CallContext
    from runtimes.errors import ModelError

    mesh = await Mesh.start(tmp_path / "m", tiny, n=1)
    peer = mesh.peers[0]
    compute = mesh.computes[peer]
    try:
        ctx = CallContext(link=None, method="compute.stage_forward", deadline=1e12, peer_id=COORD)
        sid = "ab" * 8
        mid = await mesh.coord.resolve("tiny")
        units = [0, len((await mesh.coord.views(mid, set()))[1].units)]
        await compute.rpc_stage_open(
            ctx, {"sid": sid, "model_id": mid, "units": units, "max_tokens": 64}, b""
        )

        def body(toks: list[int]) -> bytes:
            return np.asarray(toks, "<i4").tobytes()

        async def step(toks: list[int], pos: int, **extra: Any) -> Any:
            params = {"sid": sid, "n": len(toks), "pos": pos, **extra}
            return await compute.rpc_stage_forward(ctx, params, body(toks))

        await step([1, 2, 3, 4], 4)
        with pytest.raises(ModelError, match="position"):
            await step([5], 4)  # a rollback without a verify step before it
        with pytest.raises(ModelError, match="draft"):
            await step([5, 6, 7], 7, draft=1)  # rows != draft + 1
        with pytest.raises(ModelError, match="draft"):
            await step([5] * (MAX_DRAFT + 2), 4 + MAX_DRAFT + 2, draft=MAX_DRAFT + 1)
        with pytest.raises(ModelError, match="draft"):
            await step([5, 6], 6, draft=True)
        reply = await step([5, 6, 7], 7, draft=2)  # positions 4, 5, 6
        assert len(reply.result["tokens"]) == 3
        with pytest.raises(ModelError, match="position"):
            await step([9], 5)  # starts at 4: below the verify step's kept last token
        reply = await step([9], 7)  # starts at 6: rolls back position 6
        assert compute.sessions[sid].session.n_past == 7
        with pytest.raises(ModelError, match="position"):
            await step([9], 7)  # no verify step since: no rollback
    finally:
        await mesh.stop()


def test_audit_log_rollback_keeps_the_signed_body() -> None:
    log = AuditLog()
    log.add(AuditEntry(4, 4, bytes(16), b"s" * 64))
    log.add(AuditEntry(8, 4, bytes(range(16)), b"t" * 64))  # a verify step at 4..7
    log.rollback(6)  # keeps positions 4 and 5
    assert [(e.pos, e.n, e.rows, e.end) for e in log.entries] == [(4, 4, 4, 4), (8, 4, 2, 6)]
    assert log.entries[-1].kept_body == bytes(range(8))
    log.add(AuditEntry(7, 1, bytes(4), b"u" * 64))  # the next step starts at 6
    entries = unpack_entries(pack_entries(log.entries, False))
    assert [e.end for e in entries] == [4, 6, 7]
    assert entries[1].body == bytes(range(16))  # whole, as signed
    assert [e.end for e in log.upto(6)] == [4, 6]
    log.rollback(2)  # inside the first entry: the rest goes
    assert [(e.end, e.rows) for e in log.entries] == [(2, 2)]
