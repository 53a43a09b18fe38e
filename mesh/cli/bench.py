"""``edgemesh bench``: run the benchmark scripts of ``examples/`` and refresh the docs.

The scripts run one after another as child processes, in a fixed order (transport, join,
runtimes, latency, egress simulation); one that is not there is skipped. Each writes its own
section of ``docs/benchmarks.md`` (every figure beside its same-run baseline); this command adds
the runtime comparison (``bench_runtime.py`` prints JSON and writes no docs itself) and a
section recording what ran, how long it took and whether it worked. ``--quick`` passes each
script smaller sizes: a smoke run whose figures are noisier, labelled as such.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from mesh.errors import Error

__all__ = ["add_bench_command", "run_bench", "SCRIPTS", "BenchError"]

log = logging.getLogger("mesh.bench")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
RUN_SECTION = "Last `edgemesh bench` run"
RUNTIME_SECTION = "Runtimes, latest run (examples/bench_runtime.py)"


class BenchError(Error):
    """The benchmark harness cannot run (no examples directory, no helper library)."""


@dataclass(frozen=True)
class BenchScript:
    name: str
    quick: list[str] = field(default_factory=list)
    no_docs: bool = True  # understands --no-docs
    json_to_docs: bool = False  # prints JSON that this command turns into a docs section


SCRIPTS: list[BenchScript] = [
    BenchScript("bench_transport", ["--count", "100", "--bulk-mib", "8"]),
    BenchScript("bench_join", ["--members", "3", "--joins", "2"]),
    BenchScript(
        "bench_runtime", ["--prompt", "32", "--decode", "16"], no_docs=False, json_to_docs=True
    ),
    BenchScript("bench_latency", ["--quick"]),
    BenchScript("sim_egress", ["--peers", "1000", "--instances", "5"]),
]


def add_bench_command(subparsers: Any) -> None:
    b = subparsers.add_parser(
        "bench", help="run the benchmark scripts in examples/ and refresh docs/benchmarks.md"
    )
    b.add_argument(
        "--only",
        nargs="+",
        action="extend",
        choices=[s.name for s in SCRIPTS],
        metavar="NAME",
        help=f"run only these ({', '.join(s.name for s in SCRIPTS)})",
    )
    b.add_argument("--quick", action="store_true", help="small sizes: a smoke run, noisier")
    b.add_argument("--no-docs", action="store_true", help="leave docs/ alone")
    b.add_argument(
        "--docs", type=Path, default=None, help="write the Markdown here instead of docs/"
    )
    b.add_argument("--timeout", type=float, default=None, help="seconds per script")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--examples", type=Path, default=EXAMPLES, help=argparse.SUPPRESS)


def _benchlib() -> ModuleType:
    path = EXAMPLES / "benchlib.py"
    spec = importlib.util.spec_from_file_location("edgemesh_benchlib", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise BenchError(f"edgemesh bench runs the scripts of a source checkout: no {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _runtime_section(doc: dict[str, Any], quick: bool) -> str:
    rows = []
    for r in doc.get("results", []):
        if "error" in r:
            rows.append([r["runtime"], "error", "", "", "", "", " ".join(r["error"])])
            continue
        rows.append(
            [
                r["runtime"],
                r["load_s"],
                r["prefill_tok_s"],
                r["decode_tok_s"],
                r.get("decode_vs_llamacpp", ""),
                r["peak_rss_mb"],
                "yes" if r.get("same_tokens_as_llamacpp", True) else "no",
            ]
        )
    lib = _benchlib()
    table: str = lib.markdown_table(
        [
            "runtime",
            "load s",
            "prefill tok/s",
            "decode tok/s",
            "decode x llama.cpp",
            "peak RSS MB",
            "same tokens",
        ],
        rows,
    )
    return (
        f"Written by `edgemesh bench{' --quick' if quick else ''}` from `bench_runtime.py "
        f"--json` ({doc.get('model', '?')}, {doc.get('cpu_count', '?')} cores): each runtime "
        "in its own child process, the whole model in one shard, greedy; llama.cpp is the "
        "baseline measured in the same run. The section above has the analysis.\n\n" + table
    )


def _run_one(
    script: BenchScript, path: Path, args: argparse.Namespace, env: dict[str, str]
) -> dict[str, Any]:
    cmd = [sys.executable, str(path)]
    if args.quick:
        cmd += script.quick
    if script.json_to_docs:
        cmd.append("--json")
    elif args.no_docs and script.no_docs:
        cmd.append("--no-docs")
    log.info("bench: %s", " ".join([path.name, *cmd[2:]]))
    capture = script.json_to_docs
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env=env,
            text=True,
            timeout=args.timeout,
            check=False,
            stdout=subprocess.PIPE if capture else (sys.stderr if args.json else None),
        )
    except subprocess.TimeoutExpired:
        return {
            "name": script.name,
            "status": "timeout",
            "seconds": round(time.perf_counter() - t0, 1),
        }
    seconds = round(time.perf_counter() - t0, 1)
    result: dict[str, Any] = {
        "name": script.name,
        "rc": proc.returncode,
        "seconds": seconds,
        "status": "ok" if proc.returncode == 0 else "failed",
    }
    if capture and proc.returncode == 0:
        try:
            result["output"] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            result["status"] = "failed"
            result["error"] = "no JSON on stdout"
    return result


def run_bench(args: argparse.Namespace) -> int:
    examples = Path(args.examples)
    wanted = set(args.only or [s.name for s in SCRIPTS])
    env = dict(os.environ)
    if args.docs is not None:
        env["EDGEMESH_BENCH_DOCS"] = str(Path(args.docs).resolve())
    docs = Path(env["EDGEMESH_BENCH_DOCS"]) if env.get("EDGEMESH_BENCH_DOCS") else ROOT / "docs"
    lib = None if args.no_docs else _benchlib()
    md = None if lib is None else docs / "benchmarks.md"
    results: list[dict[str, Any]] = []
    for script in SCRIPTS:
        if script.name not in wanted:
            continue
        path = examples / f"{script.name}.py"
        if not path.is_file():
            log.info("bench: %s is not there, skipped", path.name)
            results.append({"name": script.name, "status": "missing", "seconds": 0.0})
            continue
        r = _run_one(script, path, args, env)
        results.append(r)
        if r["status"] != "ok":
            log.warning("bench: %s %s (exit %s)", script.name, r["status"], r.get("rc"))
        elif "output" in r and lib is not None:
            lib.update_benchmarks_md(RUNTIME_SECTION, _runtime_section(r["output"], args.quick), md)
    if lib is not None:
        lib.update_benchmarks_md(RUN_SECTION, _run_section(results, args.quick, lib), md)
    failed = [r["name"] for r in results if r["status"] not in ("ok", "missing")]
    summary = {
        "scripts": [{k: v for k, v in r.items() if k != "output"} for r in results],
        "quick": bool(args.quick),
        "docs": str(md) if md else None,
        "ok": not failed,
    }
    if args.json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        for r in results:
            sys.stdout.write(f"{r['name']:<16} {r['status']:<8} {r['seconds']:>7.1f} s\n")
        if md is not None:
            sys.stdout.write(f"refreshed {md}\n")
    return 1 if failed else 0


def _run_section(results: list[dict[str, Any]], quick: bool, lib: ModuleType) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    table: str = lib.markdown_table(
        ["script", "status", "seconds"],
        [[f"examples/{r['name']}.py", r["status"], r["seconds"]] for r in results],
    )
    kind = "`edgemesh bench --quick` (small sizes: a smoke run)" if quick else "`edgemesh bench`"
    return (
        f"{kind} on {when}, {platform.machine()} with {os.cpu_count()} cores. Each script "
        'rewrote its own section of this page; "missing" ones are not in this checkout.'
        "\n\n" + table
    )
