"""The mesh view behind /v1/mesh: peers' answers are claims, typed and capped; the mesh is
asked at most once per cache period; links are joined from both ends."""

from __future__ import annotations

import asyncio
from typing import Any

from mesh.meshview import MAX_ITEMS, MAX_LINKS, MeshView, own_summary, parse_summary

A, B, C, D = ("a" * 32, "b" * 32, "c" * 32, "d" * 32)


def member(pid: str, links: dict[str, float | None], **extra: Any) -> dict[str, Any]:
    return {
        "peer_id": pid,
        "name": f"n-{pid[0]}",
        "links": [{"peer_id": p, "rtt_ms": r} for p, r in links.items()],
        **extra,
    }


def test_a_hostile_answer_keeps_only_typed_bounded_fields() -> None:
    evil = {
        "peer_id": C,  # not who it is: the link's proven id wins
        "name": "x" * 10_000,
        "zone": 7,
        "addresses": ["h:1"] * 100,
        "hw": {"v": "nope"},
        "memory_used": -5,
        "memory_limit": True,
        "sessions": "3",
        "shards": [{"model_id": "m", "units": [3, 1]}, {"model_id": "m", "units": [0, 2]}] * 50,
        "running": [{"units": [0, 1], "owner": "<script>"}, "junk"],
        "tokens_per_s": float("nan"),
        "generations": [
            {"n_layers": 4, "stages": [{"peer_id": B, "units": [0, 3], "layers": [0, 2]}]},
            {"n_layers": 4, "stages": [{"peer_id": "bad id!", "units": [0, 3], "layers": [0, 2]}]},
        ],
        "links": [{"peer_id": A, "rtt_ms": 1e99}, {"peer_id": B, "rtt_ms": 2}] * 100,
        "models": [1, "m" * 100, None],
        "rate_history": [1, -1, "x", 2.5, 3] * 100,
        "extra": "dropped",
    }
    got = parse_summary(B, evil)
    assert got is not None
    assert got["peer_id"] == B and len(got["name"]) == 64 and got["zone"] == ""
    assert len(got["addresses"]) == 8
    assert got["hw"] is None and got["memory_used"] is None and got["memory_limit"] is None
    assert got["sessions"] == 0 and got["tokens_per_s"] == 0.0
    assert len(got["shards"]) == MAX_ITEMS // 2 and all(s["units"] == [0, 2] for s in got["shards"])
    assert got["running"] == [{"model_id": "", "model": "", "units": [0, 1], "owner": ""}]
    assert len(got["generations"]) == 1 and got["generations"][0]["stages"][0]["peer_id"] == B
    # its link to itself is dropped, the absurd RTT is none, at most MAX_LINKS are read
    assert {x["peer_id"] for x in got["links"]} == {A}
    assert len(got["links"]) == MAX_LINKS // 2 and got["links"][0]["rtt_ms"] is None
    assert got["models"] == ["m" * 64]
    assert got["rate_history"] == [1, 0, 0, 0, 3] * 24  # the last 120 s, bad counts as 0
    assert "extra" not in got
    assert parse_summary(B, ["not", "an", "object"]) is None


def test_own_summary_has_the_parsed_shape() -> None:
    compute = {
        "memory_used": 10,
        "memory_limit": 100,
        "sessions": 1,
        "shards": [{"model_id": "m", "model": "tiny", "units": [0, 2], "runtime": "onnx"}],
        "running": [{"model_id": "m", "model": "tiny", "units": [0, 2], "owner": A}],
        "tokens_per_s": 3.5,
        "models": ["tiny"],
        "rate_history": [0, 4, 5],
    }
    coord = {"generations": [], "recent": [{"model": "tiny", "tokens": 4, "tokens_per_s": 2}]}
    node = {"name": "me", "zone": "z", "addresses": ["127.0.0.1:1"], "hw": None, "links": []}
    mine = own_summary(A, node, compute, coord)
    assert mine == parse_summary(A, mine)
    assert mine["shards"] == [{"model_id": "m", "model": "tiny", "units": [0, 2]}]
    assert mine["recent"][0]["tokens_per_s"] == 2.0
    assert mine["models"] == ["tiny"] and mine["rate_history"] == [0, 4, 5]


def test_a_rate_counts_whole_seconds() -> None:
    from mesh.inference.stats import Rate

    rate = Rate(window=5.0, keep=4)
    for t, n in ((100.2, 1), (101.5, 2), (101.9, 3), (103.1, 7), (104.0, 9)):
        rate.add(n, now=t)
    # seconds 100..103 are whole at 104.5; the current one (104) is not counted yet
    assert rate.history(now=104.5) == [1, 5, 0, 7]
    assert rate.per_s(now=104.5) == round((1 + 5 + 7 + 9) / 5.0, 2)
    assert rate.history(now=200.0) == [0, 0, 0, 0] and rate.per_s(now=200.0) == 0.0


async def test_the_view_joins_links_and_caches() -> None:
    asked: list[str] = []

    async def ask(pid: str) -> Any:
        asked.append(pid)
        if pid == C:
            await asyncio.sleep(10)  # never answers in time
        return member(pid, {A: 9.0, D: 4.0})

    me = parse_summary(A, member(A, {B: 1.5, C: None}))
    assert me is not None
    view = MeshView(lambda: me, lambda: [B, C], ask, cache_s=60)
    import mesh.meshview as mv

    old, mv.ASK_TIMEOUT = mv.ASK_TIMEOUT, 0.2
    try:
        got, again = await asyncio.gather(view.view(), view.view())
    finally:
        mv.ASK_TIMEOUT = old
    assert got is again and sorted(asked) == [B, C]  # one round for both polls
    members = {m["peer_id"]: m for m in got["members"]}
    assert set(members) == {A, B, C, D}
    assert members[B]["reachable"] and members[B]["name"] == "n-b"
    assert not members[C]["reachable"] and members[D]["via"] == "reported"
    links = {(x["a"], x["b"]): x for x in got["links"]}
    assert set(links) == {(A, B), (A, C), (B, D)}
    assert links[(A, B)]["rtt_ms"] == 1.5  # this node's own measure, not the peer's claim
    assert sorted(links[(A, B)]["by"]) == [A, B]
