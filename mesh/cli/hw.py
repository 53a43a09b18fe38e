"""``edgemesh hw [--json]``: this machine's hardware profile (cached in DATA_DIR/hw.json)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_hw_command", "run_hw_command", "format_profile"]


def add_hw_command(subparsers: Any) -> argparse.ArgumentParser:
    h: argparse.ArgumentParser = subparsers.add_parser(
        "hw", help="detect this machine's hardware and measure GFLOPS and memory bandwidth"
    )
    h.add_argument(
        "--data-dir", type=Path, default=None, help="where hw.json is cached (default: as node)"
    )
    h.add_argument("--refresh", action="store_true", help="measure again even if cached")
    h.add_argument("--json", action="store_true", help="print one JSON object")
    return h


def _mb(v: int | None) -> str:
    if v is None:
        return "?"
    return f"{v / 1024:.1f} GiB" if v >= 1024 else f"{v} MiB"


def format_profile(d: dict[str, Any]) -> str:
    cpu = d["cpu"]
    cores = f"{cpu['usable_cores']} usable / {cpu['logical_cores']} logical"
    cores += f" / {cpu['physical_cores']} physical"
    if cpu.get("performance_cores"):
        cores += f" ({cpu['performance_cores']}P + {cpu.get('efficiency_cores') or 0}E)"
    lines = [
        f"cpu:     {cpu['model']} ({cpu['arch']}), {cores}",
        f"isa:     {' '.join(cpu['isa']) or '-'}",
        f"ram:     {_mb(d['ram_total_mb'])} total, {_mb(d['ram_available_mb'])} available",
        f"disk:    {_mb(d['disk_free_mb'])} free at {d['disk_path']}",
    ]
    board = d["board"]
    if board["kind"] != "generic":
        extra = ", ".join(str(x) for x in (board["soc"], board["l4t"]) if x)
        lines.append(
            f"board:   {board['model'] or board['kind']}" + (f" ({extra})" if extra else "")
        )
    for g in d["gpus"]:
        facts = [_mb(g["memory_mb"]) + (" unified" if g["unified_memory"] else "")]
        if g["compute_capability"]:
            facts.append(f"compute {g['compute_capability']}")
        if g["cores"]:
            facts.append(f"{g['cores']} cores")
        if g["driver"]:
            facts.append(f"driver {g['driver']}")
        lines.append(f"gpu:     {g['name']} ({', '.join(facts)}) [{g['source']}]")
    if not d["gpus"]:
        lines.append("gpu:     none found")
    b = d["bench"]
    if b is not None:
        lines.append(
            f"measured: matmul {b['matmul_gflops']:.1f} GFLOPS ({b['matmul_method']}, "
            f"n={b['matmul_n']}), memory {b['mem_bandwidth_gbps']:.1f} GB/s "
            f"(copy of {b['mem_buffer_mb']} MiB), in {b['seconds']:.2f} s"
        )
        if b.get("load_avg") is not None:
            lines.append(f"          load average {b['load_avg']:.2f} while measuring")
        if b["matmul_method"] == "python":
            lines.append("          (no numpy: pure-Python matmul, far below what BLAS does)")
    lines.append(f"accelerator: {d['accelerator']}")
    return "\n".join(lines)


def run_hw_command(args: argparse.Namespace) -> int:
    from hw import load_profile, summary
    from mesh.local import default_data_dir

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    profile, measured = load_profile(data_dir, refresh=args.refresh)
    body = profile.as_dict()
    if args.json:
        body["measured_now"] = measured
        body["summary"] = summary(profile)
        print(json.dumps(body))
    else:
        print(format_profile(body))
        print(f"({'measured now' if measured else 'cached'}: {data_dir / 'hw.json'})")
    return 0
