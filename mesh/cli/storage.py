"""``edgemesh put``, ``edgemesh get``, ``edgemesh job run``, and the node's storage flags.

Wiring (mesh/cli.py): ``add_node_storage_args(node_parser)``, ``add_storage_commands(sub)``,
``storage_config(args)`` for NodeConfig, and ``run_storage_command(args)`` for dispatch.
Progress bars go to stderr (only on a terminal unless ``--progress``); stdout carries the
result (one JSON object with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from mesh.cli.common import NodeApi

__all__ = [
    "add_node_storage_args",
    "add_storage_commands",
    "storage_config",
    "run_storage_command",
]

STORAGE_COMMANDS = ("put", "get", "job")

JOB_FORMATS = """\
Input formats of `edgemesh job run --model MODEL_ID --input DATASET_ID`:

  dataset  a jsonl object, one record per line: {"x": [float, ...]}, every x of the
           same length d, finite float32 values. Store it with
           `edgemesh put data.jsonl --format jsonl` (a .jsonl suffix implies it):
           its chunks end at line ends, and each chunk is one task.
  model    an ONNX graph object (`edgemesh put model.onnx`) with one float input of
           shape (batch, d). A peer's model runs only in a sandboxed child process.
  result   a new jsonl object, in dataset order, one line per record:
           {"y": [float, ...], "label": argmax of y}; its id is printed.

LLM jobs, `edgemesh job run --model NAME --prompts DATASET_ID`:

  prompts  a jsonl object, one record per line: {"prompt": "..."} or
           {"messages": [{"role": "user", "content": "..."}, ...]} (a chat, rendered
           by the model's template), with optional max_tokens, temperature, seed and
           stop, checked as POST /v1/generate checks them; other fields are ignored.
           Each chunk is one task, run by a peer holding the chunk and the model's
           shards where one can (the nearest otherwise); a peer that fails has its
           chunks redone elsewhere. A malformed record fails the job, naming it.
  model    a model name or id known in the mesh (edgemesh model add).
  result   a new jsonl object, in dataset order, one line per record:
           {"i": index, "text": ..., "tokens": n, "finish_reason": "stop"|"length"}
           (text capped at 16 KiB, "truncated": true then). The report gives tokens/s,
           bytes moved, cross-zone bytes and egress cost, and which peer did which
           chunks; --compare adds the random placement baseline, run in the same job.
"""


def add_node_storage_args(n: argparse.ArgumentParser) -> None:
    from mesh.cli.common import parse_size as _size

    n.add_argument("--zone", default="default", help="this peer's network (e.g. home-lan)")
    n.add_argument(
        "--egress-price",
        type=float,
        default=0.0,
        metavar="PER_GB",
        help="price per GB of bytes leaving this peer's zone (default 0)",
    )
    n.add_argument(
        "--store-quota",
        type=_size,
        default=None,
        metavar="SIZE",
        help="disk for stored objects, e.g. 10G (default: no limit)",
    )
    n.add_argument(
        "--peer-quota",
        type=_size,
        default=4 << 30,
        metavar="SIZE",
        help="bytes one peer may ask this node to keep as replicas (default 4G)",
    )
    n.add_argument(
        "--serve-rate",
        type=_size,
        default=None,
        metavar="BYTES_PER_S",
        help="cap on the bytes per second this node serves to others",
    )
    n.add_argument("--no-jobs", action="store_true", help="run no batch tasks for others")
    n.add_argument(
        "--no-fast-path",
        action="store_true",
        help="move bulk chunks over WebRTC only (no direct encrypted TCP)",
    )


def storage_config(args: argparse.Namespace) -> Any:
    from mesh.storage.service import StorageConfig

    if not 0 < len(args.zone) <= 63:
        from mesh.cli.common import CliError

        raise CliError("--zone must be 1..63 characters")
    return StorageConfig(
        zone=args.zone,
        egress_price=args.egress_price,
        quota=args.store_quota,
        peer_quota=args.peer_quota,
        serve_rate=args.serve_rate,
        jobs=not args.no_jobs,
        fast_path=not args.no_fast_path,
    )


def add_storage_commands(sub: Any) -> None:
    from mesh.cli.common import add_api_args

    def common(c: argparse.ArgumentParser) -> None:
        add_api_args(c)
        c.add_argument("--json", action="store_true", help="print one JSON object")
        c.add_argument("--progress", action="store_true", help="progress bar even off a tty")

    p = sub.add_parser("put", help="store a file in the mesh; prints its object id")
    p.add_argument("file", type=Path)
    p.add_argument("--replicas", type=int, default=1, help="copies kept in the mesh")
    p.add_argument(
        "--replica-wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the copies to be placed before reporting (default 30)",
    )
    p.add_argument(
        "--format",
        choices=("raw", "jsonl"),
        default=None,
        help="jsonl: chunks end at line ends (a dataset); default from the suffix",
    )
    p.add_argument("--name", default=None)
    p.add_argument(
        "--chunk-size",
        type=int,
        default=2 << 20,
        help="bytes per chunk (64 KiB..2 MiB; a batch task is one chunk)",
    )
    common(p)
    g = sub.add_parser("get", help="fetch an object from its nearest holders")
    g.add_argument("id")
    g.add_argument("-o", "--output", type=Path, required=True, help="a file, or - for stdout")
    g.add_argument("--pin", action="store_true", help="keep it in the node's store")
    common(g)
    j = sub.add_parser(
        "job",
        help="batch jobs over stored datasets",
        description=JOB_FORMATS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    jsub = j.add_subparsers(dest="job_command", required=True)
    r = jsub.add_parser(
        "run",
        help="apply a model to every record of a dataset",
        description=JOB_FORMATS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument(
        "--model", required=True, help="object id of an ONNX model, or an LLM's name or id"
    )
    what = r.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", help="object id of a jsonl dataset of float vectors (ONNX)")
    what.add_argument("--prompts", help="object id of a jsonl dataset of prompts (an LLM job)")
    r.add_argument(
        "--max-tokens",
        type=int,
        default=32,
        help="LLM jobs: tokens per record for records without max_tokens (default 32)",
    )
    r.add_argument("--compare", action="store_true", help="also run the random policy")
    r.add_argument("--seed", type=int, default=0)
    common(r)


class _Bar:
    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, max(total, 1), enabled
        self.t0 = time.monotonic()
        self._last = 0.0

    def show(self, done: int, extra: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < 0.2):
            return
        self._last = now
        frac = min(done / self.total, 1.0)
        rate = done / max(now - self.t0, 1e-6) / 1e6
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}% {rate:7.1f} MB/s {extra}")
        sys.stderr.flush()

    def end(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


class _Reader:
    """A file whose reads drive a progress bar (urllib sends it block by block)."""

    def __init__(self, fh: BinaryIO, bar: _Bar) -> None:
        self.fh, self.bar, self.done = fh, bar, 0

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n if n > 0 else 1 << 20)
        self.done += len(data)
        self.bar.show(self.done)
        return data


def _put(args: argparse.Namespace, api: NodeApi, show: bool) -> dict[str, Any]:
    from mesh.cli.common import CliError

    path: Path = args.file
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc}") from None
    fmt = args.format or ("jsonl" if path.suffix in (".jsonl", ".ndjson") else "raw")
    query = urllib.parse.urlencode(
        {
            "name": args.name or path.name,
            "format": fmt,
            "replicas": args.replicas,
            "chunk_size": args.chunk_size,
        }
    )
    bar = _Bar("put", size, show)
    with open(path, "rb") as fh:
        req = urllib.request.Request(
            f"{api}/v1/objects?{query}",
            data=_Reader(fh, bar),
            method="POST",
            headers={
                "Content-Length": str(size),
                "Content-Type": "application/octet-stream",
                **api.headers(),
            },
        )
        doc = _open_json(req, api)
    bar.show(size, force=True)
    bar.end()
    return dict(doc)


def _open_json(req: urllib.request.Request, api: NodeApi, timeout: float = 600) -> Any:
    from mesh.cli.common import CliError

    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read(16 << 20))
    except urllib.error.HTTPError as exc:
        text = exc.read(300).decode(errors="replace")
        raise CliError(f"HTTP {exc.code}: {text}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"cannot reach node API at {api}: {exc}") from None


def _get(args: argparse.Namespace, api: NodeApi, show: bool) -> dict[str, Any]:
    from mesh.cli.common import CliError

    pin = "1" if args.pin else "0"
    req = urllib.request.Request(
        f"{api}/v1/objects/{args.id}/fetch?pin={pin}", method="POST", headers=api.headers()
    )
    bar: _Bar | None = None
    final: dict[str, Any] = {}
    try:
        with urllib.request.urlopen(req, timeout=3600) as resp:
            for line in resp:
                event = json.loads(line)
                if "progress" in event:
                    p = event["progress"]
                    bar = bar or _Bar("get", p["size"], show)
                    bar.show(p["done"], f"from {len(p['sources'])} source(s)")
                elif "error" in event:
                    raise CliError(event["error"])
                elif "done" in event:
                    final = event["done"]
    except urllib.error.HTTPError as exc:
        raise CliError(f"HTTP {exc.code}: {exc.read(300).decode(errors='replace')}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"cannot reach node API at {api}: {exc}") from None
    if bar is not None:
        bar.show(final.get("size", 0), force=True)
        bar.end()
    _save(api, args.id, args.output)
    return {"id": args.id, "output": str(args.output), **final}


def _save(api: NodeApi, oid: str, output: Path) -> None:
    """The object's bytes into ``output`` (whole or not at all), or to stdout for ``-``."""
    from mesh.cli.common import CliError

    to_stdout = str(output) == "-"
    tmp = output.with_name(f".{output.name}.part")
    req = urllib.request.Request(f"{api}/v1/objects/{oid}", headers=api.headers())
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            if to_stdout:
                sys.stdout.flush()
                while block := resp.read(1 << 20):
                    sys.stdout.buffer.write(block)
                sys.stdout.buffer.flush()
                return
            with open(tmp, "wb") as out:
                while block := resp.read(1 << 20):
                    out.write(block)
        os.replace(tmp, output)
    except (urllib.error.URLError, OSError) as exc:
        if not to_stdout:
            tmp.unlink(missing_ok=True)
        raise CliError(f"cannot read object {oid[:12]}: {exc}") from None


def _placed(api: NodeApi, oid: str, wanted: int, wait: float) -> int:
    """Durable holders of ``oid`` (pinned copies, ours included), once ``wanted`` are there
    or ``wait`` seconds have passed: replication runs after the put returns."""
    from mesh.cli.common import api_get

    deadline = time.monotonic() + wait
    while True:
        holders = api_get(api, f"/v1/objects/{oid}/holders")
        placed = sum(1 for h in holders if h.get("durable"))
        if placed >= wanted or time.monotonic() >= deadline:
            return placed
        time.sleep(0.5)  # polling period of a condition with a deadline


def run_storage_command(args: argparse.Namespace) -> int:
    from mesh.cli.common import api_post, node_api

    api = node_api(args)
    show = args.progress or sys.stderr.isatty()
    if args.command == "put":
        doc = _put(args, api, show)
        doc["placed"] = _placed(api, doc["id"], args.replicas, args.replica_wait)
        if doc["placed"] < args.replicas:
            print(
                f"edgemesh: warning: only {doc['placed']} of {args.replicas} replicas placed "
                f"after {args.replica_wait:.0f} s (too few peers, or they refused); the node "
                "keeps trying as peers join",
                file=sys.stderr,
            )
        print(json.dumps(doc) if args.json else doc["id"])
        return 0
    if args.command == "get":
        doc = _get(args, api, show)
        if args.json:
            print(json.dumps(doc), file=sys.stderr if str(args.output) == "-" else sys.stdout)
        elif str(args.output) != "-":
            srcs = ", ".join(f"{k[:12]} {v / 1e6:.1f} MB" for k, v in doc["sources"].items())
            print(
                f"{doc['output']}: {doc.get('size', 0)} bytes in {doc.get('seconds', 0)} s"
                + (f" from {srcs}" if srcs else " (already here)")
            )
        return 0
    policies = ["ours", "random"] if args.compare else ["ours"]
    if args.prompts is not None:
        return _llm_job(args, api, policies)
    doc = api_post(
        api,
        "/v1/jobs",
        {"model": args.model, "input": args.input, "policies": policies, "seed": args.seed},
        timeout=3600,
    )
    if args.json:
        print(json.dumps(doc))
    else:
        print(f"result {doc['id']}: {doc['records']} records in {doc['tasks']} tasks")
        for run in doc["policies"]:
            print(
                f"  {run['policy']:<7} cross-zone {run['cross_zone_bytes'] / 1e6:8.2f} MB, "
                f"moved {run['bytes_moved'] / 1e6:8.2f} MB, {run['seconds']:.2f} s"
            )
    return 0


def _llm_job(args: argparse.Namespace, api: NodeApi, policies: list[str]) -> int:
    from mesh.cli.common import api_post

    body = {
        "kind": "llm",
        "model": args.model,
        "prompts": args.prompts,
        "policies": policies,
        "seed": args.seed,
        "max_tokens": args.max_tokens,
    }
    doc = api_post(api, "/v1/jobs", body, timeout=24 * 3600)
    if args.json:
        print(json.dumps(doc))
        return 0
    print(f"result {doc['id']}: {doc['records']} records in {doc['tasks']} tasks")
    for run in doc["policies"]:
        print(
            f"  {run['policy']:<7} {run['tokens_per_s']:8.1f} tokens/s, "
            f"moved {run['bytes_moved'] / 1e6:8.2f} MB, "
            f"cross-zone {run['cross_zone_bytes'] / 1e6:8.2f} MB, "
            f"egress {run['egress_cost']:.4f}, {run['seconds']:.2f} s, "
            f"{run['holder_tasks']}/{doc['tasks']} tasks on a holder, {run['retries']} retries"
        )
        for peer, chunks in sorted(run["placement"].items()):
            tokens = run["tokens_by_peer"].get(peer, 0)
            print(f"          {peer[:12]}: chunks {chunks}, {tokens} tokens")
    return 0
