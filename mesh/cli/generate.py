"""``edgemesh generate [PROMPT]``: stream a completion from a running node.

The prompt is the positional argument, or stdin when it is omitted or ``-``. ``--model`` takes
a model's name, its id, or a prefix of its id as ``model list`` prints it (an ambiguous prefix
is an error naming the candidates). While shards are pulled before the first token, a progress
line goes to stderr (on a terminal, or with ``--progress``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from typing import Any

from mesh.cli.common import CliError, NodeApi, add_api_args, api_get, node_api

__all__ = ["add_generate_command", "run_generate", "resolve_model"]


def add_generate_command(subparsers: Any) -> None:
    g = subparsers.add_parser("generate", help="generate text with a model in the mesh")
    g.add_argument("prompt", nargs="?", default=None, help="the prompt (default or -: stdin)")
    g.add_argument("--model", required=True, help="model name, id, or a prefix of its id")
    g.add_argument("--prompt", dest="prompt_option", default=None, help=argparse.SUPPRESS)
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None, help="random when omitted")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--split", type=int, default=None, help="force a split into N stages")
    add_api_args(g)
    g.add_argument("--json", action="store_true", help="print one JSON object at the end")
    g.add_argument("--progress", action="store_true", help="progress line even off a tty")


def _prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.prompt_option is not None:
        raise CliError("give the prompt once: as the argument or as --prompt")
    text = args.prompt if args.prompt is not None else args.prompt_option
    if text is None or text == "-":
        if sys.stdin.isatty():
            print("edgemesh: reading the prompt from stdin (end it with Ctrl-D)", file=sys.stderr)
        text = sys.stdin.read()
    return str(text)


def resolve_model(models: list[dict[str, Any]], wanted: str) -> str:
    """``wanted`` as the node names it: a name or id as given, a unique id prefix as the id."""
    for m in models:
        if wanted in (m.get("id"), m.get("name"), m.get("model_id")):
            return wanted
    found = sorted(
        {str(m["model_id"]) for m in models if str(m.get("model_id", "")).startswith(wanted)}
    )
    if len(found) > 1:
        raise CliError(f"model {wanted!r} is ambiguous: {', '.join(f[:16] for f in found)}")
    return found[0] if found else wanted  # unknown here: the node says what it knows


async def _progress(api: NodeApi, first: asyncio.Event) -> None:
    """``pulling shards [###   ] 12.3/40.0 MB`` on stderr until the first token."""
    shown = False
    try:
        while not first.is_set():
            with contextlib.suppress(CliError):
                moving = await asyncio.to_thread(api_get, api, "/v1/transfers")
                if moving:
                    size = sum(t["size"] for t in moving)
                    got = sum(t["done"] for t in moving)
                    bar = "#" * int(30 * got / max(size, 1))
                    sys.stderr.write(
                        f"\rpulling shards [{bar:<30}] {got / 1e6:6.1f}/{size / 1e6:.1f} MB "
                    )
                    sys.stderr.flush()
                    shown = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(first.wait(), 0.5)  # refresh period of the line
    finally:
        if shown:
            sys.stderr.write("\n")


async def run_generate(args: argparse.Namespace) -> int:
    from mesh.client import MeshClient

    api = node_api(args)
    prompt = _prompt(args)
    model = resolve_model((await asyncio.to_thread(api_get, api, "/v1/models"))["data"], args.model)
    first = asyncio.Event()
    show = args.progress or sys.stderr.isatty()
    bar = asyncio.get_running_loop().create_task(_progress(api, first)) if show else None
    try:
        async with MeshClient(api.url, data_dir=api.data_dir) as client:
            stream = client.stream(
                model,
                prompt,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                seed=args.seed,
                stop=args.stop,
                split=args.split,
            )
            async for event in stream:
                if "token" in event:
                    first.set()
                    if bar is not None:
                        await bar
                    if not args.json:
                        sys.stdout.write(event["text"])
                        sys.stdout.flush()
            summary = client.last_summary
    finally:
        first.set()
        if bar is not None:
            await bar
    _summary(args, summary)
    return 0


def _summary(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(summary))
        return
    print()
    print(
        f"[{len(summary['tokens'])} tokens, TTFT {summary['ttft_ms']:.0f} ms, "
        f"{summary['tokens_per_s']:.1f} tok/s, {len(summary['stages'])} stage(s)]",
        file=sys.stderr,
    )
