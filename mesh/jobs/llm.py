"""LLM batch jobs, the parts without a network: records, one chunk's generations, placement.

A prompts dataset is a ``jsonl`` object, one record per line: ``{"prompt": str}`` or
``{"messages": [{"role", "content"}, ...]}`` (a chat, rendered by the model's template as the
OpenAI chat endpoint renders it), with optional ``max_tokens``, ``temperature``, ``seed`` and
``stop``. Each record becomes a generation request through the API's own request parser (the
same types, ranges and caps as ``POST /v1/generate``); other fields of a record are ignored,
so a record cannot ask for a split, a runtime or spot checks. A record without a seed gets
one derived from its chunk and position, so a chunk redone on another peer samples the same.

A task's result is one line per record of its chunk, in order:
``{"i": index, "text": str, "tokens": n, "finish_reason": "stop" | "length"}`` (``i`` counts
within the chunk here; the job renumbers it across the dataset). Text is capped at
:data:`MAX_TEXT` bytes (``"truncated": true`` then).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from mesh.inference.run import ContextLengthExceeded, GenerationRequest
from mesh.jobs.sandbox import BadInput, JobError

__all__ = [
    "RequestParser",
    "Generate",
    "ChunkRun",
    "parse_prompts",
    "run_chunk",
    "check_result",
    "join_results",
    "place_key",
    "MAX_TEXT",
    "MAX_PROMPT",
    "CONCURRENT",
]

# A request from an API body, type- and range-checked (mesh.api.generate.parse_generation,
# handed in by the node: the jobs layer sits below the API). It raises on a bad field.
RequestParser = Callable[[dict[str, Any]], GenerationRequest]
Generate = Callable[[GenerationRequest], AsyncGenerator[dict[str, Any], None]]

FIELDS = ("prompt", "messages", "max_tokens", "temperature", "seed", "stop")
MAX_PROMPT = 64 << 10  # characters of a record's prompt (or all its messages' contents)
MAX_STOP = 256  # characters of one stop string
MAX_TEXT = 16 << 10  # bytes of one record's generated text kept in the results
MAX_RECORDS = 20_000  # records of one chunk (a 2 MiB chunk of {"prompt":""} lines: ~15k)
CONCURRENT = 4  # generations of one task in flight at once


def _seed(sha: str, n: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{sha}:{n}".encode()).digest()[:4], "big") >> 1


def _check_record(rec: Any, n: int) -> dict[str, Any]:
    """The fields of record ``n`` the request parser sees, size-capped first."""
    if not isinstance(rec, dict):
        raise BadInput(f"record {n}: not a JSON object")
    if ("prompt" in rec) == ("messages" in rec):
        raise BadInput(f"record {n}: needs exactly one of prompt or messages")
    if "prompt" in rec:
        prompt = rec["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise BadInput(f"record {n}: prompt must be a non-empty string")
        size = len(prompt)
    else:
        msgs = rec["messages"]
        if not isinstance(msgs, list):
            raise BadInput(f"record {n}: messages must be a list")
        size = sum(len(str(m.get("content", ""))) for m in msgs if isinstance(m, dict))
    if size > MAX_PROMPT:
        raise BadInput(f"record {n}: prompt of {size} characters is over {MAX_PROMPT}")
    stop = rec.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    if any(isinstance(s, str) and len(s) > MAX_STOP for s in stops):
        raise BadInput(f"record {n}: a stop string is over {MAX_STOP} characters")
    return {k: rec[k] for k in FIELDS if k in rec}


def parse_prompts(
    data: bytes, model: str, sha: str, parse: RequestParser, max_tokens: int
) -> list[GenerationRequest]:
    """One generation request per record of a chunk; :class:`BadInput` names the first
    malformed record (its position in the chunk) and what is wrong with it."""
    lines = [line for line in data.splitlines() if line.strip()]
    if len(lines) > MAX_RECORDS:
        raise BadInput(f"a chunk of {len(lines)} records is over {MAX_RECORDS}")
    out = []
    for n, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            raise BadInput(f"record {n}: not JSON") from None
        body = _check_record(rec, n)
        body["model"] = model
        body.setdefault("max_tokens", max_tokens)
        body.setdefault("seed", _seed(sha, n))
        try:
            req = parse(body)
        except Exception as exc:  # the parser's whole job is to refuse a bad field
            raise BadInput(f"record {n}: {exc}") from None
        out.append(replace(req, local=True))  # generated where its task was placed
    return out


@dataclass
class ChunkRun:
    """What one task's generations did: its reply's figures."""

    records: int = 0
    tokens: int = 0
    local_records: int = 0  # records whose route ran on this peer alone
    stage_peers: set[str] = field(default_factory=set)  # every peer a route used
    shard_bytes: int = 0  # shard bytes the routes pulled to their stages
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "tokens": self.tokens,
            "local_records": self.local_records,
            "stage_peers": sorted(self.stage_peers),
            "shard_bytes": self.shard_bytes,
            "seconds": round(self.seconds, 3),
        }


def _line(n: int, done: dict[str, Any]) -> bytes:
    text = str(done.get("text", ""))
    raw = text.encode()
    rec: dict[str, Any] = {
        "i": n,
        "text": raw[:MAX_TEXT].decode(errors="ignore") if len(raw) > MAX_TEXT else text,
        "tokens": len(done.get("tokens", [])),
        "finish_reason": done.get("finish_reason", "length"),
    }
    if len(raw) > MAX_TEXT:
        rec["truncated"] = True
    return json.dumps(rec).encode() + b"\n"


async def run_chunk(
    reqs: Sequence[GenerationRequest], generate: Generate, me: str
) -> tuple[bytes, ChunkRun]:
    """Every request as a generation coordinated here, :data:`CONCURRENT` at once; the
    results in record order. A record whose prompt does not fit the model's context fails
    the job (:class:`BadInput`); any other failure fails the task (redone elsewhere)."""
    stats = ChunkRun(records=len(reqs))
    gate = asyncio.Semaphore(CONCURRENT)
    lines: list[bytes] = [b""] * len(reqs)
    t0 = time.monotonic()

    async def one(n: int, req: GenerationRequest) -> None:
        done: dict[str, Any] | None = None
        async with gate:
            try:
                async with contextlib.aclosing(generate(req)) as events:
                    async for event in events:
                        if event.get("done"):
                            done = event
            except ContextLengthExceeded as exc:
                raise BadInput(f"record {n}: {exc}") from None
        if done is None:
            raise JobError(f"record {n}: the generation ended without a summary")
        peers = {s.get("peer_id") for s in done.get("stages", []) if isinstance(s, dict)}
        stats.stage_peers |= {p for p in peers if isinstance(p, str)}
        stats.local_records += peers == {me}
        stats.tokens += len(done.get("tokens", []))
        stats.shard_bytes += int(done.get("bytes_pulled", 0) or 0)
        lines[n] = _line(n, done)

    try:
        async with asyncio.TaskGroup() as tg:  # one failure cancels the chunk's others
            for n, req in enumerate(reqs):
                tg.create_task(one(n, req))
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None
    stats.seconds = time.monotonic() - t0
    return b"".join(lines), stats


def check_result(payload: bytes, records: int) -> None:
    """A peer's task result: ``records`` lines, each a result object, ``i`` = 0, 1, ...
    (JobError otherwise: the task is redone elsewhere)."""
    lines = payload.splitlines()
    if len(lines) != records:
        raise JobError(f"a task result has {len(lines)} lines for {records} records")
    for n, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            raise JobError("a task result line is not JSON") from None
        if (
            not isinstance(rec, dict)
            or rec.get("i") != n
            or not isinstance(rec.get("text"), str)
            or type(rec.get("tokens")) is not int
            or len(rec["text"].encode()) > MAX_TEXT
        ):
            raise JobError(f"task result line {n} is malformed")


def join_results(outputs: Sequence[bytes]) -> bytes:
    """The chunks' results as one jsonl, ``i`` renumbered across the dataset (in order)."""
    out, base = [], 0
    for payload in outputs:
        lines = payload.splitlines()
        for line in lines:
            rec = json.loads(line)
            rec["i"] += base
            out.append(json.dumps(rec).encode() + b"\n")
        base += len(lines)
    return b"".join(out)


def place_key(
    peer: str, holders: set[str], missing: dict[str, int], load: dict[str, int], size: int
) -> tuple[int, int]:
    """Our placement's preference for a chunk's task on ``peer`` (lower is better): the bytes
    it would have to pull first (the chunk unless it holds it, the model's shards it lacks:
    a peer holding the chunk and most of the model's layers wins), then its tasks so far."""
    pull = (0 if peer in holders else size) + missing.get(peer, 1 << 50)
    return pull, load.get(peer, 0)
