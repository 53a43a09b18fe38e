"""``edgemesh generate``: stream a completion from a running node."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["add_generate_command", "run_generate"]


def add_generate_command(subparsers: Any) -> None:
    g = subparsers.add_parser("generate", help="generate text with a model in the mesh")
    g.add_argument("--model", required=True, help="model name or id")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--split", type=int, default=None, help="force a split into N stages")
    g.add_argument("--api", default=None, help="node API base URL (default: the local node)")
    g.add_argument("--json", action="store_true", help="print one JSON object at the end")


async def run_generate(args: argparse.Namespace) -> int:
    from mesh.client import MeshClient
    from mesh.local import resolve_api

    async with MeshClient(resolve_api(args.api)) as client:
        stream = client.stream(
            args.model,
            args.prompt,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop=args.stop,
            split=args.split,
        )
        async for event in stream:
            if not args.json and "token" in event:
                sys.stdout.write(event["text"])
                sys.stdout.flush()
        summary = client.last_summary
    if args.json:
        print(json.dumps(summary))
    else:
        print()
        print(
            f"[{len(summary['tokens'])} tokens, TTFT {summary['ttft_ms']:.0f} ms, "
            f"{summary['tokens_per_s']:.1f} tok/s, {len(summary['stages'])} stage(s)]",
            file=sys.stderr,
        )
    return 0
