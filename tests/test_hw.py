"""Hardware detection against recorded outputs of other machines, and the cached profile."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from hw import CommandResult, Sources, detect, load_profile, parse_summary, summary
from hw.bench import bench_matmul, bench_memory
from hw.detect import parse_nvidia_smi
from hw.model import BenchResult

FIXTURES = Path(__file__).parent / "fixtures" / "hw"


def fixture_sources(name: str, **overrides: Any) -> tuple[Sources, list[list[str]]]:
    """Sources answering from tests/fixtures/hw/NAME; also returns the commands it ran."""
    root = FIXTURES / name
    spec = json.loads((root / "sources.json").read_text())
    calls: list[list[str]] = []

    def read_text(path: str) -> str | None:
        rel = spec["files"].get(path)
        return (root / rel).read_text() if rel else None

    def run(argv: Sequence[str]) -> CommandResult | None:
        calls.append(list(argv))
        rel = spec["commands"].get(argv[0])
        return CommandResult(0, (root / rel).read_text()) if rel else None

    fields: dict[str, Any] = {
        "read_text": read_text,
        "run": run,
        "system": spec["system"],
        "machine": spec["machine"],
        "disk_free": lambda path: spec["disk_free_bytes"],
        "usable_cores": lambda: spec["usable_cores"],
        "nvml": lambda: None,
    }
    fields.update(overrides)
    return Sources(**fields), calls


FAKE_BENCH = BenchResult(
    matmul_gflops=12.5,
    matmul_method="numpy",
    matmul_n=512,
    mem_bandwidth_gbps=20.0,
    mem_buffer_mb=128,
    seconds=0.5,
)


def test_jetson_agx_orin():
    src, calls = fixture_sources("jetson_agx_orin")
    hw = detect(src, "/data")
    assert hw.board.kind == "jetson"
    assert hw.board.model == "Jetson AGX Orin Developer Kit"  # the NUL is gone
    assert hw.board.soc == "tegra234" and hw.board.l4t == "R35.4.1"
    assert hw.cpu.model == "Cortex-A78AE" and hw.cpu.vendor == "ARM"
    assert hw.cpu.arch == "arm64" and hw.cpu.logical_cores == 8 and hw.cpu.physical_cores == 8
    assert hw.cpu.isa == ("neon", "fp16", "dotprod")
    assert hw.ram_total_mb == 29820 and hw.ram_available_mb == 27069
    assert hw.disk_free_mb == 40031
    (gpu,) = hw.gpus
    assert gpu.name == "Orin (integrated)" and gpu.compute_capability == "8.7"
    assert gpu.unified_memory and gpu.memory_mb == hw.ram_total_mb and gpu.source == "jetson"
    assert hw.accelerator == "cuda"
    # NVML and nvidia-smi do not describe a Jetson's GPU: they are not asked
    assert not [c for c in calls if c[0] == "nvidia-smi"]


def test_apple_m2_pro():
    src, calls = fixture_sources("apple_m2_pro")
    hw = detect(src, "/data")
    assert hw.board.kind == "apple" and hw.board.model == "Mac14,9"
    assert hw.cpu.model == "Apple M2 Pro" and hw.cpu.vendor == "Apple" and hw.cpu.arch == "arm64"
    assert (hw.cpu.logical_cores, hw.cpu.physical_cores) == (12, 12)
    assert (hw.cpu.performance_cores, hw.cpu.efficiency_cores) == (8, 4)
    assert hw.cpu.isa == ("neon", "fp16", "dotprod", "i8mm", "bf16")  # FEAT_SME is 0
    assert hw.ram_total_mb == 32768 and hw.ram_available_mb is None
    (gpu,) = hw.gpus
    assert gpu.vendor == "apple" and gpu.name == "Apple M2 Pro GPU" and gpu.cores == 19
    assert gpu.unified_memory and gpu.memory_mb == 32768
    assert hw.accelerator == "metal"
    assert [c[0] for c in calls] == ["sysctl", "ioreg"]  # one sysctl call for all keys


def test_nvidia_desktop():
    src, _ = fixture_sources("nvidia_desktop")
    hw = detect(src, "/data")
    assert hw.board.kind == "generic"
    assert hw.cpu.model == "AMD Ryzen 7 7800X3D 8-Core Processor"
    assert hw.cpu.vendor == "AuthenticAMD"
    assert (hw.cpu.logical_cores, hw.cpu.physical_cores, hw.cpu.usable_cores) == (16, 8, 16)
    assert {"avx2", "fma", "avx512f", "avx512vnni", "avx512bf16"} <= set(hw.cpu.isa)
    assert "amx" not in hw.cpu.isa and "neon" not in hw.cpu.isa
    assert hw.ram_total_mb == 63497
    assert [(g.name, g.memory_mb, g.free_mb, g.compute_capability) for g in hw.gpus] == [
        ("NVIDIA GeForce RTX 4090", 24564, 23851, "8.9"),
        ("NVIDIA GeForce RTX 3060", 12288, 12035, "8.6"),
    ]
    assert all(g.driver == "550.107.02" and not g.unified_memory for g in hw.gpus)
    assert hw.accelerator == "cuda"


def test_old_nvidia_driver_without_compute_cap_field():
    rows = "0, NVIDIA GeForce GTX 1080, 8192, 7900, 470.82.01\n"
    calls: list[list[str]] = []

    def run(argv: Sequence[str]) -> CommandResult | None:
        calls.append(list(argv))
        if "compute_cap" in argv[1]:
            return CommandResult(2, 'Field "compute_cap" is not a valid field to query.\n')
        return CommandResult(0, rows)

    src, _ = fixture_sources("nvidia_desktop", run=run)
    (gpu,) = detect(src, "/data").gpus
    assert gpu.name == "NVIDIA GeForce GTX 1080" and gpu.compute_capability is None
    assert gpu.driver == "470.82.01" and len(calls) == 2


def test_nvidia_smi_noise_and_missing_values():
    text = (
        "WARNING: infoROM is corrupted at gpu 0000:01:00.0\n"
        "0, NVIDIA A100-SXM4-40GB, [N/A], [Not Supported], 535.54.03, 8.0\n"
        "garbage\n"
    )
    (gpu,) = parse_nvidia_smi(text)
    assert gpu.name == "NVIDIA A100-SXM4-40GB" and gpu.memory_mb is None and gpu.free_mb is None


class FakeNvml:
    class Mem:
        total = 8 << 30
        free = 6 << 30

    def __init__(self) -> None:
        self.shut = False

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"535.161.07"

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"NVIDIA GeForce RTX 3070"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return self.Mem()

    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:
        return 8, 6


def test_nvml_when_nvidia_smi_is_missing():
    nvml = FakeNvml()
    src, _ = fixture_sources("nvidia_desktop", run=lambda argv: None, nvml=lambda: nvml)
    (gpu,) = detect(src, "/data").gpus
    assert (gpu.name, gpu.memory_mb, gpu.free_mb, gpu.compute_capability, gpu.source) == (
        "NVIDIA GeForce RTX 3070",
        8192,
        6144,
        "8.6",
        "nvml",
    )
    assert gpu.driver == "535.161.07" and nvml.shut


def test_no_gpu_and_nothing_readable():
    src, _ = fixture_sources(
        "nvidia_desktop", read_text=lambda p: None, run=lambda a: None, usable_cores=lambda: None
    )
    hw = detect(src, "/data")
    assert hw.gpus == () and hw.accelerator == "cpu"
    assert hw.cpu.logical_cores == 1 and hw.cpu.model == "unknown" and hw.ram_total_mb == 0


# -- the cached profile ------------------------------------------------------------------------
class CountingBench:
    def __init__(self) -> None:
        self.runs = 0

    def __call__(self) -> BenchResult:
        self.runs += 1
        return FAKE_BENCH


def test_profile_is_cached_and_remeasured_when_stale_or_changed(tmp_path):
    bench = CountingBench()
    clock = [1_000_000.0]
    src, _ = fixture_sources("nvidia_desktop")

    def load(sources: Sources = src, **kw: Any) -> Any:
        return load_profile(tmp_path, sources=sources, bench=bench, now=lambda: clock[0], **kw)

    profile, ran = load()
    assert ran and bench.runs == 1 and profile.bench == FAKE_BENCH
    cached = json.loads((tmp_path / "hw.json").read_text())
    assert cached["bench"]["matmul_gflops"] == 12.5 and cached["gpus"][0]["memory_mb"] == 24564

    clock[0] += 3600
    again, ran = load()
    assert not ran and bench.runs == 1 and again.bench == FAKE_BENCH
    assert again.measured_at == profile.measured_at

    # free memory and disk change all the time: that is not new hardware
    busy, _ = fixture_sources("nvidia_desktop", disk_free=lambda p: 1 << 30)
    assert not load(busy)[1] and bench.runs == 1

    # a GPU removed is new hardware
    no_gpu, _ = fixture_sources("nvidia_desktop", run=lambda argv: None)
    assert load(no_gpu)[1] and bench.runs == 2
    assert load()[1] and bench.runs == 3  # and put back

    clock[0] += 8 * 24 * 3600  # stale after a week
    assert load()[1] and bench.runs == 4
    assert not load()[1]
    assert load(refresh=True)[1] and bench.runs == 5


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[1, 2]",
        '{"fingerprint": "x", "measured_at": 1, "bench": {"matmul_gflops": "fast"}}',
        "{" + " " * 70_000 + "}",
    ],
)
def test_malformed_cache_is_remeasured(tmp_path, content):
    src, _ = fixture_sources("jetson_agx_orin")
    bench = CountingBench()
    (tmp_path / "hw.json").write_text(content)
    profile, ran = load_profile(tmp_path, sources=src, bench=bench)
    assert ran and bench.runs == 1 and profile.bench == FAKE_BENCH
    assert load_profile(tmp_path, sources=src, bench=bench)[1] is False  # rewritten


def test_summary_is_compact_and_round_trips(tmp_path):
    for name in ("jetson_agx_orin", "apple_m2_pro", "nvidia_desktop"):
        src, _ = fixture_sources(name)
        profile, _ = load_profile(tmp_path / name, sources=src, bench=CountingBench())
        s = summary(profile)
        assert len(json.dumps(s)) < 512
        assert parse_summary(json.loads(json.dumps(s))) is not None
    assert s["acc"] == "cuda" and s["cores"] == 16 and s["gflops"] == 12.5
    assert [g["cc"] for g in s["gpus"]] == ["8.9", "8.6"]
    parsed = parse_summary(s)
    assert parsed is not None and parsed["gpus"][0]["name"] == "NVIDIA GeForce RTX 4090"


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        {"v": 99, "acc": "cpu", "cores": 1, "ram_mb": 1},
        {"v": 1, "acc": "quantum", "cores": 1, "ram_mb": 1},
        {"v": 1, "acc": "cpu", "cores": -1, "ram_mb": 1},
        {"v": 1, "acc": "cpu", "cores": True, "ram_mb": 1},
        {"v": 1, "acc": "cpu", "cores": 2, "ram_mb": "lots"},
    ],
)
def test_parse_summary_refuses_malformed(bad):
    assert parse_summary(bad) is None


def test_parse_summary_cuts_and_drops_bad_fields():
    parsed = parse_summary(
        {
            "v": 1,
            "acc": "cpu",
            "cores": 4,
            "ram_mb": 4096,
            "cpu": "x" * 10_000,
            "gflops": float("nan"),
            "isa": ["avx2", "<script>", 7],
            "gpus": [{"name": "g"}] * 50 + ["junk"],
        }
    )
    assert parsed is not None
    assert len(parsed["cpu"]) == 48 and parsed["gflops"] is None
    assert parsed["isa"] == ["avx2"] and len(parsed["gpus"]) == 4


# -- the microbenchmarks on this machine -------------------------------------------------------
def test_pure_python_matmul_fallback():
    gflops, method, n = bench_matmul(prefer_numpy=False, repeats=2)
    assert method == "python" and n == 64 and 0 < gflops < 100


def test_microbenchmarks_on_this_machine_are_quick(tmp_path):
    t0 = time.perf_counter()
    profile, ran = load_profile(tmp_path)
    elapsed = time.perf_counter() - t0
    assert ran and profile.bench is not None
    assert profile.hardware.cpu.usable_cores >= 1 and profile.hardware.ram_total_mb > 0
    assert profile.bench.matmul_gflops > 0 and profile.bench.mem_bandwidth_gbps > 0.1
    assert profile.bench.seconds < 2, f"benchmarks took {profile.bench.seconds:.1f} s"
    assert elapsed < 4, f"detection and benchmarks took {elapsed:.1f} s"
    assert bench_memory(buffer_mb=8, repeats=1) > 0.1


def _edgemesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh", *args], capture_output=True, text=True, timeout=60
    )


def test_hw_command(tmp_path):
    first = _edgemesh("hw", "--json", "--data-dir", str(tmp_path))
    assert first.returncode == 0, first.stderr
    body = json.loads(first.stdout)
    assert body["measured_now"] is True
    assert body["cpu"]["usable_cores"] >= 1 and body["ram_total_mb"] > 0
    assert body["bench"]["matmul_gflops"] > 0 and body["bench"]["mem_bandwidth_gbps"] > 0
    assert parse_summary(body["summary"]) is not None
    second = _edgemesh("hw", "--json", "--data-dir", str(tmp_path))
    assert json.loads(second.stdout)["measured_now"] is False  # from DATA_DIR/hw.json
    text = _edgemesh("hw", "--data-dir", str(tmp_path))
    assert text.returncode == 0 and "GFLOPS" in text.stdout and "cached" in text.stdout
