"""LLM batch jobs, the parts without a network: prompt records (hostile ones included), the
caps on results, a peer's result checked, chunks joined in order, and the placement order.
The cross-process behaviour is in tests/test_llmjobs_mesh.py."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.api.generate import MAX_TOKENS, parse_generation
from mesh.jobs.llm import (
    MAX_PROMPT,
    MAX_RECORDS,
    MAX_TEXT,
    _line,
    check_result,
    join_results,
    parse_prompts,
    place_key,
)
from mesh.jobs.sandbox import BadInput, JobError

SHA = "ab" * 32
VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.lists(st.text(max_size=5), max_size=10),
    st.lists(
        st.dictionaries(
            st.sampled_from(["role", "content", "name"]),
            st.one_of(st.sampled_from(["user", "system", "god"]), st.text(max_size=8), st.none()),
        ),
        max_size=3,
    ),
)
RECORD = st.dictionaries(
    st.sampled_from(["prompt", "messages", "max_tokens", "temperature", "seed", "stop", "split"]),
    VALUE,
)


def parse(data: bytes) -> list[Any]:
    return parse_prompts(data, "m" * 64, SHA, parse_generation, 16)


@settings(max_examples=300, deadline=None)
@given(st.lists(RECORD, max_size=4))
def test_fuzz_prompt_records(recs: list[dict[str, Any]]) -> None:
    """Whatever a record holds: BadInput naming a record, or checked requests that run where
    their task runs and ask for nothing beyond the fields a record may set."""
    data = "\n".join(json.dumps(r) for r in recs).encode()
    try:
        reqs = parse(data)
    except BadInput as exc:
        assert str(exc).startswith("record ")
        return
    assert len(reqs) == len(recs)
    for req in reqs:
        assert req.local and req.split is None and req.runtime is None
        assert 1 <= req.max_tokens <= MAX_TOKENS and not req.verify.rate
        assert (req.messages is None) == bool(req.prompt)


def test_records_defaults_and_seeds() -> None:
    data = b'{"prompt": "hi"}\n\n{"prompt": "hi", "seed": 5, "max_tokens": 3}\n{"prompt": "hi"}\n'
    a, b, c = parse(data)
    assert (a.max_tokens, b.max_tokens, b.sampling.seed) == (16, 3, 5)
    assert a.sampling.temperature == 0.0  # greedy unless a record asks
    # a record's default seed depends on its chunk and place: a redone chunk samples the same
    assert a.sampling.seed != c.sampling.seed
    assert parse(data)[0].sampling.seed == a.sampling.seed
    chat = parse(b'{"messages": [{"role": "user", "content": "x"}], "split": 3, "verify": 1}')
    assert chat[0].messages == [{"role": "user", "content": "x"}] and chat[0].split is None


@pytest.mark.parametrize(
    "text, want",
    [
        (b"\xff\xfe\n", "record 0: not JSON"),
        (b'"prompt"', "not a JSON object"),
        (b'{"prompt": 5}', "non-empty string"),
        (b'{"messages": "hi"}', "messages must be a list"),
        (json.dumps({"prompt": "a" * (MAX_PROMPT + 1)}).encode(), f"over {MAX_PROMPT}"),
        (
            json.dumps(
                {"messages": [{"role": "user", "content": "a" * (MAX_PROMPT + 1)}]}
            ).encode(),
            f"over {MAX_PROMPT}",
        ),
        (json.dumps({"prompt": "a", "stop": ["s" * 257]}).encode(), "stop string is over"),
        (b'{"prompt": "a", "temperature": 99}', "temperature must be in"),
        (b'{"prompt": "a", "max_tokens": 0}', "max_tokens must be in"),
        (b'{"prompt": "a", "stop": ["a","b","c","d","e","f","g","h","i"]}', "up to 8"),
        (b'{"prompt": "a"}\n' * (MAX_RECORDS + 1), f"over {MAX_RECORDS}"),
    ],
)
def test_bad_records_are_named(text: bytes, want: str) -> None:
    with pytest.raises(BadInput, match=want):
        parse(text)


def test_result_text_is_capped_at_a_character_boundary() -> None:
    done = {"text": "é" * MAX_TEXT, "tokens": [1] * 9, "finish_reason": "length"}
    rec = json.loads(_line(3, done))
    assert rec["truncated"] is True and rec["i"] == 3 and rec["tokens"] == 9
    assert len(rec["text"].encode()) <= MAX_TEXT and set(rec["text"]) == {"é"}
    short = json.loads(_line(0, {"text": "ok", "tokens": [1], "finish_reason": "stop"}))
    assert short == {"i": 0, "text": "ok", "tokens": 1, "finish_reason": "stop"}


def test_a_peers_result_is_checked() -> None:
    good = _line(0, {"text": "a", "tokens": [1]}) + _line(1, {"text": "b", "tokens": [2]})
    check_result(good, 2)
    for bad, records in [
        (good, 3),
        (good[: good.index(b"\n") + 1] * 2, 2),  # i = 0 twice
        (b"not json\n", 1),
        (b'{"i": 0, "text": 5, "tokens": 1}\n', 1),
        (json.dumps({"i": 0, "text": "x" * (MAX_TEXT + 1), "tokens": 1}).encode() + b"\n", 1),
    ]:
        with pytest.raises(JobError):
            check_result(bad, records)


def test_chunks_join_in_dataset_order() -> None:
    a = _line(0, {"text": "a"}) + _line(1, {"text": "b"})
    b = _line(0, {"text": "c"})
    out = [json.loads(x) for x in join_results([a, b"", b]).splitlines()]
    assert [(r["i"], r["text"]) for r in out] == [(0, "a"), (1, "b"), (2, "c")]


def test_placement_prefers_the_holder_with_the_model() -> None:
    missing = {"both": 0, "chunk-only": 10 << 20, "model-only": 0}
    holders = {"both", "chunk-only"}
    peers = sorted(missing, key=lambda p: place_key(p, holders, missing, {}, 1 << 20))
    assert peers == ["both", "model-only", "chunk-only"]
    # among holders of both, the least loaded; a peer whose shards are unknown comes last
    load = {"both": 2}
    missing2 = {"both": 0, "other": 0}
    key = place_key("other", {"both", "other"}, missing2, load, 1)
    assert key < place_key("both", {"both", "other"}, missing2, load, 1)
    assert place_key("unknown", {"unknown"}, missing2, {}, 1) > key


def test_cli_help_documents_prompt_records() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mesh", "job", "run", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--prompts" in out and '{"prompt": "..."}' in out and "finish_reason" in out


def test_every_batch_task_rpc_is_for_members_only() -> None:
    """A stranger of an open mesh may not make a node run its batch tasks (ONNX or LLM):
    before llmjobs.llm_task was listed, a stranger could spend any member's compute."""
    from mesh.jobs.llmjob import LlmJobService
    from mesh.jobs.service import JobService
    from mesh.trust.service import MEMBERS_ONLY

    for cls in (JobService, LlmJobService):
        rpcs = [f"{cls.name}.{m[4:]}" for m in dir(cls) if m.startswith("rpc_")]
        assert rpcs and set(rpcs) <= set(MEMBERS_ONLY), rpcs
