"""``edgemesh peers`` (who is connected) and ``edgemesh ps`` (what this node runs: sessions
and loaded shards, from ``/v1/info``'s ``compute`` part)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from mesh.cli.common import add_api_args, api_get, node_api

__all__ = ["add_status_commands", "run_status_command", "format_peers", "format_ps"]


def add_status_commands(sub: Any) -> None:
    c = sub.add_parser("peers", help="list the peers of a running node")
    add_api_args(c)
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument(
        "--all", action="store_true", help="also peers heard of but never linked, with why"
    )
    ps = sub.add_parser("ps", help="sessions, loaded shards and memory of a running node")
    add_api_args(ps)
    ps.add_argument("--json", action="store_true", help="print one JSON object")


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _path(ice: Any) -> str:
    """``host->relay udp`` (local and remote candidate types, protocol; TURN's in brackets)."""
    if not isinstance(ice, dict):
        return "-"
    relay = f" (turn {ice['relay_protocol']})" if ice.get("relay_protocol") else ""
    return f"{ice.get('local', '?')}->{ice.get('remote', '?')} {ice.get('protocol', '?')}{relay}"


def format_peers(peers: list[dict[str, Any]], *, errors: bool = False) -> str:
    """One row per peer; with ``errors``, the last error of its link or dials too."""
    rows = [("PEER", "NAME", "STATE", "RTT MS", "PATH", "SOURCE") + (("LAST ERROR",) * errors)]
    for p in peers:
        rtt = p.get("rtt_ms")
        row = (
            str(p.get("peer_id", ""))[:16],
            str(p.get("name", ""))[:20],
            str(p.get("state", "")),
            f"{rtt:.2f}" if isinstance(rtt, float | int) else "-",
            _path(p.get("ice")),
            str(p.get("source", "")),
        )
        rows.append(row + ((str(p.get("last_error") or "-")[:60],) * errors))
    return _table(rows)


def _mib(n: Any) -> str:
    return f"{n / (1 << 20):.0f} MiB" if isinstance(n, int | float) else "-"


def format_ps(info: dict[str, Any]) -> str:
    """A summary line (runtime, memory, sessions), then one row per loaded shard."""
    c = info.get("compute") or {}
    head = (
        f"node {str(info.get('peer_id', ''))[:16]} ({info.get('name', '')}): runtime "
        f"{c.get('runtime', '-')}, memory {_mib(c.get('memory_used'))} of "
        f"{_mib(c.get('memory_limit'))}, {c.get('sessions', 0)} session(s)"
    )
    shards = c.get("shards") or []
    if not shards:
        return head + "\nno shards loaded"
    rows = [("MODEL", "UNITS", "RUNTIME", "SESSIONS")]
    for s in shards:
        units = s.get("units") or ["?", "?"]
        rows.append(
            (
                str(s.get("model_id", ""))[:16],
                f"{units[0]}..{units[1]}",
                str(s.get("runtime", "")),
                str(s.get("sessions", 0)),
            )
        )
    return head + "\n" + _table(rows)


def run_status_command(args: argparse.Namespace) -> int:
    api = node_api(args)
    if args.command == "peers":
        peers = api_get(api, "/v1/peers?all=1" if args.all else "/v1/peers")
        text = format_peers(peers, errors=args.all)
        print(json.dumps({"api": api.url, "peers": peers}) if args.json else text)
        return 0
    info = api_get(api, "/v1/info")
    compute = info.get("compute") or {}
    if args.json:
        print(json.dumps({"api": api.url, "peer_id": info.get("peer_id"), **compute}))
    else:
        print(format_ps(info))
    return 0
