"""``edgemesh model ...``: inspect GGUF models and split them into shard blobs.

``model add`` has a running node split the model and store each shard as an object of its
one content-addressed store (pinned, provider records announced): ``edgemesh get <shard
object id>`` fetches a shard like any object, and ``GET /v1/objects`` lists them (format
``gguf``). ``model shard`` only writes blobs and a manifest into a plain directory.

Wiring (mesh/cli.py): call ``add_model_commands(sub)`` in the parser and dispatch
``args.command == "model"`` to ``run_model_command(args)``. Model errors subclass
``mesh.errors.Error``, so the usual one-line error handling applies.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from mesh.cli.common import add_api_args

__all__ = ["add_model_commands", "run_model_command", "inspect_model"]


def add_model_commands(subparsers: Any) -> None:
    m = subparsers.add_parser("model", help="inspect and shard GGUF models")
    msub = m.add_subparsers(dest="model_command", required=True)
    i = msub.add_parser("inspect", help="architecture, units, sizes and tensor types of a GGUF")
    i.add_argument("path", help="a .gguf file (whole model or shard blob)")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    a = msub.add_parser(
        "add", help="shard a GGUF into a running node's object store and announce its shards"
    )
    a.add_argument("path", help="a whole-model .gguf file (on the node's host)")
    a.add_argument("--name", default=None, help="name to use in generate (default: the GGUF's)")
    ls = msub.add_parser("list", help="models known in the mesh")
    rm = msub.add_parser(
        "rm", help="forget a model on the node: unpin its shards, delete those not loaded"
    )
    rm.add_argument("model", metavar="NAME|ID", help="name, id, or id prefix (8+ characters)")
    for c in (a, ls, rm):
        add_api_args(c)
        c.add_argument("--json", action="store_true", help="print one JSON object")
    s = msub.add_parser("shard", help="split a GGUF into hash-named blobs and a manifest")
    s.add_argument("path", help="a whole-model .gguf file")
    s.add_argument("--store", required=True, help="store directory (blobs/ and manifests/)")
    s.add_argument("--json", action="store_true", help="print one JSON object")


def inspect_model(path: str) -> dict[str, Any]:
    from runtimes.arch import unit_kind, unit_tensor_names
    from runtimes.gguf_io import open_gguf
    from runtimes.quant import type_support

    f = open_gguf(path)
    c = f.config
    units = []
    for i in range(f.unit_start, f.unit_end):
        kind, layer = unit_kind(i, c.n_layers)
        names = unit_tensor_names(c, i)
        types = Counter(f.tensors[n].qtype.name for n in names)
        units.append(
            {
                "index": i,
                "kind": kind,
                "layer": layer,
                "nbytes": f.unit_nbytes(i),
                "types": dict(sorted(types.items())),
            }
        )
    all_types = Counter(t.qtype.name for t in f.tensors.values())
    return {
        "path": str(f.path),
        "architecture": c.arch,
        "name": c.name,
        "layers": c.n_layers,
        "d_model": c.d_model,
        "heads": c.n_heads,
        "kv_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "d_ff": c.d_ff,
        "vocab": c.vocab_size,
        "context_length": c.context_length,
        "sliding_window": c.sliding_window,
        "tied_embeddings": c.tied_embeddings,
        "units_in_file": [f.unit_start, f.unit_end],
        "total_units": c.n_units,
        "tensor_bytes": sum(t.nbytes for t in f.tensors.values()),
        "tensor_types": dict(sorted(all_types.items())),
        # Per tensor type, how each runtime runs it: exact, dequantized (exact values in
        # float32), requantized (values changed) or unsupported. Never silent.
        "runtime_support": {t: type_support(t) for t in sorted(all_types)},
        "units": units,
    }


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB"


def _write_support(out: Any, support: dict[str, dict[str, str]]) -> None:
    """One line per tensor type: how llama.cpp, onnx and tinygrad run it."""
    runtimes = sorted({r for per_type in support.values() for r in per_type})
    out.write(f"{'type':<8} " + " ".join(f"{r:<12}" for r in runtimes).rstrip() + "\n")
    for qtype, per_type in support.items():
        cells = " ".join(f"{per_type.get(r, '-'):<12}" for r in runtimes)
        out.write(f"{qtype:<8} {cells}".rstrip() + "\n")


def run_model_command(args: argparse.Namespace) -> int:
    out = sys.stdout
    if args.model_command == "inspect":
        info = inspect_model(args.path)
        if args.json:
            out.write(json.dumps(info) + "\n")
            return 0
        out.write(
            f"{info['name']} ({info['architecture']}): {info['layers']} layers, d_model "
            f"{info['d_model']}, {info['heads']} heads / {info['kv_heads']} KV, head dim "
            f"{info['head_dim']}, FFN {info['d_ff']}, vocab {info['vocab']}\n"
            f"sliding window {info['sliding_window'] or 'none'}, tied embeddings "
            f"{'yes' if info['tied_embeddings'] else 'no'}, units {info['units_in_file'][0]}.."
            f"{info['units_in_file'][1] - 1} of {info['total_units']}, "
            f"{_mib(info['tensor_bytes'])} of tensors\n"
            f"types: {', '.join(f'{k} x{v}' for k, v in info['tensor_types'].items())}\n"
        )
        _write_support(out, info["runtime_support"])
        out.write(f"{'unit':>4}  {'kind':<6} {'layer':>5} {'size':>12}  types\n")
        for u in info["units"]:
            layer = "" if u["layer"] is None else str(u["layer"])
            types = ", ".join(f"{k} x{v}" for k, v in u["types"].items())
            out.write(
                f"{u['index']:>4}  {u['kind']:<6} {layer:>5} {_mib(u['nbytes']):>12}  {types}\n"
            )
        return 0
    if args.model_command in ("add", "list", "rm"):
        return _on_node(args, out)
    if args.model_command == "shard":
        from runtimes.shards import ShardStore

        m = ShardStore(args.store).add_model(args.path)
        doc = {
            "model_id": m.model_id,
            "blobs": len(m.blobs),
            "store": args.store,
            "bytes": sum(b.size for b in m.blobs),
        }
        out.write(
            json.dumps(doc) + "\n"
            if args.json
            else f"model id {m.model_id}: {len(m.blobs)} blobs, {_mib(doc['bytes'])} "
            f"in {args.store}\n"
        )
        return 0
    return 2


def _on_node(args: argparse.Namespace, out: Any) -> int:
    """``model add``, ``model list``, ``model rm``: through the node's API."""
    import os
    import urllib.parse

    from mesh.cli.common import api_delete, api_get, api_post, node_api

    api = node_api(args)
    if args.model_command == "rm":
        doc = api_delete(api, f"/v1/models/{urllib.parse.quote(args.model, safe='')}")
        out.write(
            json.dumps(doc) + "\n"
            if args.json
            else f"removed {doc['model_id'][:16]} ({', '.join(doc['names']) or 'no name'}): "
            f"{len(doc['deleted'])} objects deleted ({_mib(doc['freed'])}), "
            f"{len(doc['unpinned']) - len(doc['deleted'])} left to GC while loaded\n"
        )
        return 0
    if args.model_command == "add":
        body = {"path": os.path.abspath(args.path), "name": args.name}
        doc = api_post(api, "/v1/models", body, timeout=600)
        out.write(
            json.dumps(doc) + "\n"
            if args.json
            else f"added {doc['name']} ({doc['arch']}, {doc['n_layers']} layers) as "
            f"{doc['model_id']} in {doc['blobs']} blobs\n"
        )
    else:
        doc = api_get(api, "/v1/models")
        if args.json:
            out.write(json.dumps(doc) + "\n")
        for m in [] if args.json else doc.get("data", []):
            out.write(
                f"{m['id']:<28} {m['arch'] or '':<8} {m['n_layers'] or '':>3} layers  "
                f"{m['model_id'][:16]}  held by {len(m['holders'])} peer(s)\n"
            )
    return 0
