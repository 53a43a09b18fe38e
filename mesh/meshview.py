"""The whole mesh as one node sees it, for the topology page: every member's own summary
(hardware, memory, shards held, stages running, tokens/s, running generations and their
routes) and the links each member reports, with their RTT.

Every node answers ``node.info`` (mesh/node.py) with its own summary, built here by
:func:`own_summary`. :class:`MeshView` asks each connected peer for it, at most once per
``cache_s`` however often the page polls, each call under a short deadline. A peer's answer
is only its claim: :func:`parse_summary` keeps typed, bounded fields and drops the rest, and
a peer id is always the one its link proved, never the one it wrote.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from hw import parse_summary as parse_hw

__all__ = ["MeshView", "own_summary", "parse_summary"]

CACHE_S = 3.0  # the mesh is asked at most once per this many seconds
ASK_TIMEOUT = 3.0  # one peer's node.info
MAX_MEMBERS = 64  # members shown (this node, its links, peers only others report)
MAX_LINKS = 64  # links one member reports
MAX_ITEMS = 32  # shards, stages, recent generations of one member
MAX_GENERATIONS = 8  # running generations one member reports
MAX_TEXT = 64
MAX_ADDRESSES = 8
MAX_SERIES = 120  # seconds of a rate's history
_PEER_ID = re.compile(r"^[A-Za-z0-9]{16,64}$")

Summary = dict[str, Any]
Ask = Callable[[str], Awaitable[Any]]  # peer id -> the result of its node.info


def _text(v: Any, cap: int = MAX_TEXT) -> str:
    return v[:cap] if isinstance(v, str) else ""


def _count(v: Any) -> int | None:
    return v if type(v) is int and 0 <= v < 1 << 62 else None


def _rate(v: Any) -> float | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    return round(float(v), 3) if ok and 0 <= v < 1e9 else None


def _pid(v: Any) -> str | None:
    return v if isinstance(v, str) and _PEER_ID.match(v) else None


def _units(v: Any) -> list[int] | None:
    if not isinstance(v, list) or len(v) != 2:
        return None
    a, b = (_count(x) for x in v)
    return [a, b] if a is not None and b is not None and a < b <= 1 << 20 else None


def _list(v: Any, cap: int) -> list[Any]:
    return [x for x in v[:cap] if isinstance(x, dict)] if isinstance(v, list) else []


def _shard(v: dict[str, Any], with_owner: bool) -> dict[str, Any] | None:
    units = _units(v.get("units"))
    if units is None:
        return None
    out = {"model_id": _text(v.get("model_id")), "model": _text(v.get("model")), "units": units}
    if with_owner:
        out["owner"] = _pid(v.get("owner")) or ""
    return out


def _stage(v: dict[str, Any]) -> dict[str, Any] | None:
    peer, units, layers = _pid(v.get("peer_id")), _units(v.get("units")), v.get("layers")
    if isinstance(layers, list) and len(layers) == 2 and all(_count(x) is not None for x in layers):
        shown = [int(x) for x in layers]
    else:
        shown = None
    if peer is None or units is None or shown is None or shown[0] > shown[1]:
        return None
    return {"peer_id": peer, "units": units, "layers": shown}


def _generation(v: dict[str, Any]) -> dict[str, Any] | None:
    stages = [s for s in map(_stage, _list(v.get("stages"), MAX_ITEMS)) if s is not None]
    n_layers = _count(v.get("n_layers"))
    if not stages or n_layers is None or n_layers > 1 << 20:
        return None
    return {
        "model_id": _text(v.get("model_id")),
        "model": _text(v.get("model")),
        "n_layers": n_layers,
        "stages": stages,
        "tokens": _count(v.get("tokens")) or 0,
        "tokens_per_s": _rate(v.get("tokens_per_s")) or 0.0,
        "rate_history": _series(v.get("rate_history")),
    }


def _recent(v: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": _text(v.get("model")),
        "tokens": _count(v.get("tokens")) or 0,
        "tokens_per_s": _rate(v.get("tokens_per_s")) or 0.0,
        "ended": _rate(v.get("ended")),
    }


def _series(v: Any) -> list[int]:
    """Counts per second (a rate's history), oldest first."""
    if not isinstance(v, list):
        return []
    return [x if type(x) is int and 0 <= x < 1 << 32 else 0 for x in v[-MAX_SERIES:]]


def _link(v: dict[str, Any]) -> dict[str, Any] | None:
    peer = _pid(v.get("peer_id"))
    return None if peer is None else {"peer_id": peer, "rtt_ms": _rate(v.get("rtt_ms"))}


def parse_summary(peer_id: str, obj: Any) -> Summary | None:
    """A member's summary (its ``node.info`` answer) with only typed, bounded fields; None
    when it is not an object. ``peer_id`` is the one its link proved."""
    if not isinstance(obj, dict):
        return None
    addresses, models = obj.get("addresses"), obj.get("models")
    models = models if isinstance(models, list) else []
    addresses = addresses[:MAX_ADDRESSES] if isinstance(addresses, list) else []
    shards = [_shard(s, False) for s in _list(obj.get("shards"), MAX_ITEMS)]
    running = [_shard(s, True) for s in _list(obj.get("running"), MAX_ITEMS)]
    gens = [_generation(g) for g in _list(obj.get("generations"), MAX_GENERATIONS)]
    links = [_link(x) for x in _list(obj.get("links"), MAX_LINKS)]
    return {
        "peer_id": peer_id,
        "name": _text(obj.get("name")),
        "zone": _text(obj.get("zone")),
        "addresses": [_text(a, 100) for a in addresses],
        "hw": parse_hw(obj.get("hw")),
        "memory_used": _count(obj.get("memory_used")),
        "memory_limit": _count(obj.get("memory_limit")),
        "sessions": _count(obj.get("sessions")) or 0,
        "models": [_text(m) for m in models[:MAX_ITEMS] if isinstance(m, str)],
        "shards": [s for s in shards if s is not None],
        "running": [s for s in running if s is not None],
        "tokens_per_s": _rate(obj.get("tokens_per_s")) or 0.0,
        "rate_history": _series(obj.get("rate_history")),
        "generations": [g for g in gens if g is not None],
        "recent": [_recent(r) for r in _list(obj.get("recent"), MAX_ITEMS)],
        "links": [x for x in links if x is not None and x["peer_id"] != peer_id],
    }


def own_summary(
    peer_id: str,
    node: dict[str, Any],
    compute: dict[str, Any],
    coordinator: dict[str, Any],
) -> Summary:
    """This node's summary from its parts' status (``node``: name, zone, addresses, hw,
    links), in exactly the shape a peer's parsed answer has."""
    raw = {
        **node,
        **{k: compute.get(k) for k in ("memory_used", "memory_limit", "sessions", "shards")},
        "models": compute.get("models"),  # the names it knows
        "running": compute.get("running"),
        "tokens_per_s": compute.get("tokens_per_s"),
        "rate_history": compute.get("rate_history"),
        "generations": coordinator.get("generations"),
        "recent": coordinator.get("recent"),
    }
    out = parse_summary(peer_id, raw)
    assert out is not None
    return out


class MeshView:
    """Members and links as this node and its peers report them, cached for ``cache_s``."""

    def __init__(
        self,
        own: Callable[[], Summary],
        peers: Callable[[], list[str]],
        ask: Ask,
        cache_s: float = CACHE_S,
    ) -> None:
        self._own = own
        self._peers = peers
        self._ask = ask
        self.cache_s = cache_s
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._lock = asyncio.Lock()

    async def view(self) -> dict[str, Any]:
        async with self._lock:  # polls arriving together share one round of calls
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.cache_s:
                self._cached = (now, await self._gather())
            return self._cached[1]

    async def _one(self, pid: str) -> Summary | None:
        try:
            async with asyncio.timeout(ASK_TIMEOUT):
                return parse_summary(pid, await self._ask(pid))
        except Exception:  # an unreachable or broken peer is shown as such, nothing more
            return None

    async def _gather(self) -> dict[str, Any]:
        me = self._own()
        asked = [p for p in self._peers() if p != me["peer_id"]][: MAX_MEMBERS - 1]
        answers = await asyncio.gather(*map(self._one, asked))
        members: dict[str, dict[str, Any]] = {me["peer_id"]: {**me, "reachable": True}}
        for pid, got in zip(asked, answers, strict=True):
            members[pid] = {**got, "reachable": True} if got else _stub(pid, reachable=False)
        links: dict[tuple[str, str], dict[str, Any]] = {}
        for m in list(members.values()):
            for x in m.get("links", []):
                other = x["peer_id"]
                if other not in members and len(members) < MAX_MEMBERS:
                    members[other] = _stub(other, reachable=False, via="reported")
                if other not in members:
                    continue
                a, b = sorted((m["peer_id"], other))
                link = links.setdefault((a, b), {"a": a, "b": b, "rtt_ms": None, "by": []})
                link["by"].append(m["peer_id"])
                if x["rtt_ms"] is not None and (m is members[me["peer_id"]] or not link["rtt_ms"]):
                    link["rtt_ms"] = x["rtt_ms"]  # this node's own measure wins over claims
        generations = [
            {**g, "coordinator": m["peer_id"]}
            for m in members.values()
            for g in m.get("generations", [])
        ]
        return {
            "self": me["peer_id"],
            "at": round(time.time(), 3),
            "members": list(members.values()),
            "links": sorted(links.values(), key=lambda x: (x["a"], x["b"])),
            "generations": generations,
        }


def _stub(peer_id: str, *, reachable: bool, via: str = "link") -> dict[str, Any]:
    """A member known only by id: it did not answer, or only others report a link to it."""
    return {"peer_id": peer_id, "name": "", "reachable": reachable, "via": via, "links": []}
