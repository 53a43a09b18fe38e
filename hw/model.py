"""The hardware profile: frozen dataclasses, plain-JSON conversion, a compact summary."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SCHEMA",
    "CpuInfo",
    "GpuInfo",
    "BoardInfo",
    "BenchResult",
    "Hardware",
    "HardwareProfile",
    "summary",
    "parse_summary",
]

SCHEMA = 1  # bump when the meaning of a field changes: cached profiles are re-measured


@dataclass(frozen=True)
class CpuInfo:
    model: str
    vendor: str
    arch: str  # normalized: "x86_64", "arm64", or what the OS said
    logical_cores: int
    physical_cores: int
    usable_cores: int  # what this process may run on (affinity, containers)
    isa: tuple[str, ...]  # normalized extensions: avx2, avx512f, amx, neon, dotprod, sve, ...
    performance_cores: int | None = None  # Apple: P cores (hw.perflevel0)
    efficiency_cores: int | None = None  # Apple: E cores (hw.perflevel1)


@dataclass(frozen=True)
class GpuInfo:
    vendor: str  # "nvidia" | "apple"
    name: str
    memory_mb: int | None  # total; for unified memory, the system RAM
    free_mb: int | None
    compute_capability: str | None  # CUDA, e.g. "8.9"
    driver: str | None
    cores: int | None  # Apple GPU cores
    unified_memory: bool
    source: str  # "nvidia-smi" | "nvml" | "jetson" | "ioreg"


@dataclass(frozen=True)
class BoardInfo:
    kind: str  # "jetson" | "apple" | "generic"
    model: str | None = None  # device-tree model or Mac model id
    soc: str | None = None  # "tegra234", "Apple M2 Pro"
    l4t: str | None = None  # Jetson Linux release, "R35.4.1"


@dataclass(frozen=True)
class BenchResult:
    matmul_gflops: float
    matmul_method: str  # "numpy" (BLAS, all cores) | "python" (pure fallback, one core)
    matmul_n: int
    mem_bandwidth_gbps: float  # memcpy, bytes read + written per second / 1e9
    mem_buffer_mb: int
    seconds: float  # wall time of both benchmarks
    load_avg: float | None = None  # 1-minute load average when they ran: busy cores skew them

    @staticmethod
    def from_dict(obj: Any) -> BenchResult:
        """From cached JSON; raises ValueError on anything malformed."""
        if not isinstance(obj, dict):
            raise ValueError("bench is not an object")

        def num(key: str) -> float:
            v = obj.get(key)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 1e9:
                raise ValueError(f"bench.{key} is not a number")
            return float(v)

        def whole(key: str) -> int:
            v = obj.get(key)
            if type(v) is not int or not 0 < v < 1 << 20:
                raise ValueError(f"bench.{key} is not an integer")
            return v

        method = obj.get("matmul_method")
        if method not in ("numpy", "python"):
            raise ValueError("bench.matmul_method is unknown")
        return BenchResult(
            matmul_gflops=num("matmul_gflops"),
            matmul_method=str(method),
            matmul_n=whole("matmul_n"),
            mem_bandwidth_gbps=num("mem_bandwidth_gbps"),
            mem_buffer_mb=whole("mem_buffer_mb"),
            seconds=num("seconds"),
            load_avg=num("load_avg") if obj.get("load_avg") is not None else None,
        )


@dataclass(frozen=True)
class Hardware:
    """What detection found (no measurements)."""

    os: str
    cpu: CpuInfo
    ram_total_mb: int
    ram_available_mb: int | None
    disk_path: str
    disk_free_mb: int | None
    board: BoardInfo
    gpus: tuple[GpuInfo, ...]

    @property
    def accelerator(self) -> str:
        """What a runtime would use: "cuda", "metal" or "cpu"."""
        vendors = {g.vendor for g in self.gpus}
        if "nvidia" in vendors:
            return "cuda"
        if "apple" in vendors:
            return "metal"
        return "cpu"

    def fingerprint(self, bench_method: str) -> str:
        """Changes when the hardware changes (not with free memory or disk)."""
        key = {
            "schema": SCHEMA,
            "os": self.os,
            "cpu": [self.cpu.model, self.cpu.arch, self.cpu.logical_cores, list(self.cpu.isa)],
            "usable": self.cpu.usable_cores,
            "ram_gib": round(self.ram_total_mb / 1024),  # kernels reserve a few MB differently
            "board": [self.board.kind, self.board.model, self.board.soc],
            "gpus": sorted(
                [g.vendor, g.name, round((g.memory_mb or 0) / 1024), g.cores or 0]
                for g in self.gpus
            ),
            "bench": bench_method,  # installing numpy changes what the benchmark measures
        }
        blob = json.dumps(key, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class HardwareProfile:
    hardware: Hardware
    bench: BenchResult | None
    measured_at: float  # wall clock of the benchmark
    fingerprint: str

    def as_dict(self) -> dict[str, Any]:
        hw = self.hardware
        return {
            "schema": SCHEMA,
            "fingerprint": self.fingerprint,
            "measured_at": self.measured_at,
            "os": hw.os,
            "accelerator": hw.accelerator,
            "cpu": dataclasses.asdict(hw.cpu) | {"isa": list(hw.cpu.isa)},
            "ram_total_mb": hw.ram_total_mb,
            "ram_available_mb": hw.ram_available_mb,
            "disk_path": hw.disk_path,
            "disk_free_mb": hw.disk_free_mb,
            "board": dataclasses.asdict(hw.board),
            "gpus": [dataclasses.asdict(g) for g in hw.gpus],
            "bench": dataclasses.asdict(self.bench) if self.bench is not None else None,
        }


_SUMMARY_STR = 48  # a peer record is small: names are cut
_SUMMARY_GPUS = 4


def summary(profile: HardwareProfile) -> dict[str, Any]:
    """A compact summary for the peer record (a few hundred bytes of JSON)."""
    hw = profile.hardware
    out: dict[str, Any] = {
        "v": SCHEMA,
        "acc": hw.accelerator,
        "cpu": hw.cpu.model[:_SUMMARY_STR],
        "cores": hw.cpu.usable_cores,
        "isa": [f for f in hw.cpu.isa if f in _SUMMARY_ISA],
        "ram_mb": hw.ram_total_mb,
        "disk_mb": hw.disk_free_mb,
        "gpus": [
            {
                "name": g.name[:_SUMMARY_STR],
                "mem_mb": g.memory_mb,
                **({"cc": g.compute_capability} if g.compute_capability else {}),
                **({"unified": True} if g.unified_memory else {}),
            }
            for g in hw.gpus[:_SUMMARY_GPUS]
        ],
    }
    if hw.board.kind != "generic":
        out["board"] = (hw.board.model or hw.board.kind)[:_SUMMARY_STR]
    if profile.bench is not None:
        out["gflops"] = round(profile.bench.matmul_gflops, 1)
        out["gbps"] = round(profile.bench.mem_bandwidth_gbps, 1)
    return out


_SUMMARY_ISA = frozenset(
    {"avx2", "avx512f", "avx512vnni", "avx512bf16", "amx", "neon", "dotprod", "i8mm", "sve"}
)


def parse_summary(obj: Any) -> dict[str, Any] | None:
    """Validate a summary received from another peer; None when malformed.

    Only typed, bounded fields pass, so the planner and the page can use them as they are.
    """
    if not isinstance(obj, dict) or obj.get("v") != SCHEMA:
        return None

    def text(v: Any) -> str | None:
        return v[:_SUMMARY_STR] if isinstance(v, str) else None

    def count(v: Any, high: float) -> int | None:
        return v if type(v) is int and 0 <= v <= high else None

    def rate(v: Any) -> float | None:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 1e7
        return float(v) if ok else None

    acc = obj.get("acc")
    cores = count(obj.get("cores"), 4096)
    ram = count(obj.get("ram_mb"), 1 << 30)
    if acc not in ("cuda", "metal", "cpu") or cores is None or ram is None:
        return None
    gpus = []
    raw_gpus = obj.get("gpus")
    for g in raw_gpus[:_SUMMARY_GPUS] if isinstance(raw_gpus, list) else []:
        if isinstance(g, dict) and text(g.get("name")):
            gpus.append(
                {
                    "name": text(g.get("name")),
                    "mem_mb": count(g.get("mem_mb"), 1 << 30),
                    "cc": text(g.get("cc")),
                    "unified": g.get("unified") is True,
                }
            )
    isa = obj.get("isa")
    return {
        "v": SCHEMA,
        "acc": acc,
        "cpu": text(obj.get("cpu")) or "",
        "cores": cores,
        "isa": [f for f in isa if f in _SUMMARY_ISA] if isinstance(isa, list) else [],
        "ram_mb": ram,
        "disk_mb": count(obj.get("disk_mb"), 1 << 40),
        "gpus": gpus,
        "board": text(obj.get("board")),
        "gflops": rate(obj.get("gflops")),
        "gbps": rate(obj.get("gbps")),
    }
