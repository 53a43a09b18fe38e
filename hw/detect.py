"""Detection of CPU, memory, disk, NVIDIA GPUs, Jetson boards and Apple silicon.

Every function reads the machine only through a :class:`~hw.sources.Sources`. Anything a
source returns is treated as untrusted text: unparsable fields become None, never a crash.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from .model import BoardInfo, CpuInfo, GpuInfo, Hardware
from .sources import Sources

__all__ = [
    "detect",
    "detect_cpu",
    "detect_board",
    "detect_gpus",
    "detect_memory",
    "parse_cpuinfo",
    "parse_meminfo",
    "parse_nvidia_smi",
    "parse_sysctl",
    "parse_tegra_release",
    "NVIDIA_SMI_QUERY",
]

log = logging.getLogger(__name__)

# x86 /proc/cpuinfo flags -> our names (only what matters for inference kernels)
_X86_ISA = {
    "sse4_2": "sse4.2",
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "avx_vnni": "avxvnni",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512vl": "avx512vl",
    "avx512_vnni": "avx512vnni",
    "avx512_bf16": "avx512bf16",
    "avx512_fp16": "avx512fp16",
    "amx_tile": "amx",
}
# arm64 /proc/cpuinfo Features -> our names
_ARM_ISA = {
    "asimd": "neon",
    "asimdhp": "fp16",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "bf16": "bf16",
    "sve": "sve",
    "sve2": "sve2",
    "sme": "sme",
}
# macOS sysctl hw.optional.* -> our names
_APPLE_ISA = {
    "hw.optional.AdvSIMD": "neon",
    "hw.optional.neon": "neon",
    "hw.optional.arm.FEAT_FP16": "fp16",
    "hw.optional.arm.FEAT_DotProd": "dotprod",
    "hw.optional.arm.FEAT_I8MM": "i8mm",
    "hw.optional.arm.FEAT_BF16": "bf16",
    "hw.optional.arm.FEAT_SME": "sme",
}
_ISA_ORDER = [
    "sse4.2", "avx", "avx2", "fma", "f16c", "avxvnni", "avx512f", "avx512bw", "avx512vl",
    "avx512vnni", "avx512bf16", "avx512fp16", "amx",
    "neon", "fp16", "dotprod", "i8mm", "bf16", "sve", "sve2", "sme",
]  # fmt: skip
# (implementer, part) from arm64 /proc/cpuinfo, which has no model name
_ARM_PARTS = {
    (0x41, 0xD03): "Cortex-A53",
    (0x41, 0xD04): "Cortex-A35",
    (0x41, 0xD05): "Cortex-A55",
    (0x41, 0xD07): "Cortex-A57",
    (0x41, 0xD08): "Cortex-A72",
    (0x41, 0xD0B): "Cortex-A76",
    (0x41, 0xD0C): "Neoverse-N1",
    (0x41, 0xD40): "Neoverse-V1",
    (0x41, 0xD41): "Cortex-A78",
    (0x41, 0xD42): "Cortex-A78AE",
    (0x41, 0xD49): "Neoverse-N2",
    (0x41, 0xD4F): "Neoverse-V2",
    (0x4E, 0x004): "NVIDIA Carmel",
    (0x61, 0x022): "Apple M1 Icestorm",
    (0x61, 0x023): "Apple M1 Firestorm",
}
_ARM_VENDORS = {0x41: "ARM", 0x4E: "NVIDIA", 0x51: "Qualcomm", 0x61: "Apple", 0xC0: "Ampere"}
# Jetson SoCs (device-tree `compatible`): GPU name and CUDA compute capability
_TEGRA = {
    "tegra234": ("Orin", "8.7"),
    "tegra194": ("Xavier", "7.2"),
    "tegra186": ("Parker (TX2)", "6.2"),
    "tegra210": ("Maxwell (Nano/TX1)", "5.3"),
}
NVIDIA_SMI_FIELDS = "index,name,memory.total,memory.free,driver_version,compute_cap"
NVIDIA_SMI_QUERY = [
    "nvidia-smi",
    f"--query-gpu={NVIDIA_SMI_FIELDS}",
    "--format=csv,noheader,nounits",
]
APPLE_SYSCTL_KEYS = [
    "machdep.cpu.brand_string",
    "hw.model",
    "hw.memsize",
    "hw.ncpu",
    "hw.physicalcpu",
    "hw.logicalcpu",
    "hw.perflevel0.physicalcpu",
    "hw.perflevel1.physicalcpu",
    *_APPLE_ISA,
]


def _int(text: str | None, base: int = 10) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip(), base)
    except ValueError:
        return None


def _arch(machine: str) -> str:
    m = machine.lower()
    if m in ("x86_64", "amd64"):
        return "x86_64"
    if m in ("aarch64", "arm64"):
        return "arm64"
    return m or "unknown"


def _ordered(names: set[str]) -> tuple[str, ...]:
    return tuple([n for n in _ISA_ORDER if n in names] + sorted(names - set(_ISA_ORDER)))


# -- /proc parsers ----------------------------------------------------------------------------
def parse_cpuinfo(text: str) -> list[dict[str, str]]:
    """One dict per processor block (keys as written, values stripped)."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current[key.strip()] = value.strip()
    if current:
        blocks.append(current)
    return blocks


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` fields in kB."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        parts = value.split()
        if sep and parts:
            n = _int(parts[0])
            if n is not None:
                out[key.strip()] = n
    return out


def parse_sysctl(text: str) -> dict[str, str]:
    """``sysctl KEY...`` output: ``key: value`` lines."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and " " not in key.strip():
            out[key.strip()] = value.strip()
    return out


def parse_tegra_release(text: str) -> str | None:
    """``# R35 (release), REVISION: 4.1, ...`` -> ``R35.4.1``."""
    m = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"R{m.group(1)}.{m.group(2)}" if m else None


def _na(value: str) -> str | None:
    v = value.strip()
    return None if not v or v.startswith("[") or v.upper() == "N/A" else v


def parse_nvidia_smi(text: str, with_compute_cap: bool = True) -> list[GpuInfo]:
    """Rows of ``nvidia-smi --query-gpu=... --format=csv,noheader,nounits``."""
    want = 6 if with_compute_cap else 5
    gpus = []
    for line in text.splitlines():
        cols = [c.strip() for c in line.split(",")]
        if len(cols) != want or _int(cols[0]) is None:
            continue  # a warning line or a driver message, not a GPU row
        mem, free = _na(cols[2]), _na(cols[3])
        gpus.append(
            GpuInfo(
                vendor="nvidia",
                name=cols[1],
                memory_mb=_int(mem) if mem else None,
                free_mb=_int(free) if free else None,
                compute_capability=_na(cols[5]) if with_compute_cap else None,
                driver=_na(cols[4]),
                cores=None,
                unified_memory=False,
                source="nvidia-smi",
            )
        )
    return gpus


# -- detectors --------------------------------------------------------------------------------
def _sysctl(src: Sources, keys: Sequence[str]) -> dict[str, str]:
    res = src.run(["sysctl", *keys])
    # unknown keys (older macOS) make sysctl exit non-zero but it still prints the others
    return parse_sysctl(res.stdout) if res is not None else {}


def detect_cpu(src: Sources, sysctl: dict[str, str] | None = None) -> CpuInfo:
    arch = _arch(src.machine)
    usable = src.usable_cores()
    if src.system == "Darwin":
        s = sysctl if sysctl is not None else _sysctl(src, APPLE_SYSCTL_KEYS)
        logical = _int(s.get("hw.logicalcpu") or s.get("hw.ncpu")) or usable or 1
        isa = {name for key, name in _APPLE_ISA.items() if s.get(key) == "1"}
        brand = s.get("machdep.cpu.brand_string") or "unknown"
        return CpuInfo(
            model=brand,
            vendor="Apple" if brand.startswith("Apple") else brand.split(" ")[0],
            arch=arch,
            logical_cores=logical,
            physical_cores=_int(s.get("hw.physicalcpu")) or logical,
            usable_cores=min(usable or logical, logical),
            isa=_ordered(isa),
            performance_cores=_int(s.get("hw.perflevel0.physicalcpu")),
            efficiency_cores=_int(s.get("hw.perflevel1.physicalcpu")),
        )
    blocks = [b for b in parse_cpuinfo(src.read_text("/proc/cpuinfo") or "") if "processor" in b]
    logical = len(blocks) or usable or 1
    first = blocks[0] if blocks else {}
    cores = {(b.get("physical id"), b.get("core id")) for b in blocks if "core id" in b}
    flags = set(first.get("flags", "").split())
    features = set(first.get("Features", "").split())
    isa = {n for f, n in _X86_ISA.items() if f in flags}
    isa |= {n for f, n in _ARM_ISA.items() if f in features}
    if "fphp" in features and "asimdhp" in features:
        isa.add("fp16")
    if arch == "arm64" and "asimd" in features:
        isa.add("neon")
    model = first.get("model name") or first.get("Model") or ""
    vendor = first.get("vendor_id", "")
    if not model and "CPU part" in first:  # arm64 Linux names no model: look the part up
        impl = _int(first.get("CPU implementer"), 16)
        part = _int(first.get("CPU part"), 16)
        if impl is not None and part is not None:
            model = _ARM_PARTS.get((impl, part), f"ARM part {impl:#x}:{part:#x}")
            vendor = _ARM_VENDORS.get(impl, f"{impl:#x}")
    return CpuInfo(
        model=model or "unknown",
        vendor=vendor or "unknown",
        arch=arch,
        logical_cores=logical,
        physical_cores=len(cores) or logical,
        usable_cores=min(usable or logical, logical),
        isa=_ordered(isa),
    )


def detect_memory(src: Sources, sysctl: dict[str, str] | None = None) -> tuple[int, int | None]:
    """(total MB, available MB or None)."""
    if src.system == "Darwin":
        s = sysctl if sysctl is not None else _sysctl(src, ["hw.memsize"])
        total = _int(s.get("hw.memsize"))
        return (total // (1 << 20) if total else 0), None
    info = parse_meminfo(src.read_text("/proc/meminfo") or "")
    total_kb = info.get("MemTotal", 0)
    avail_kb = info.get("MemAvailable")
    return total_kb // 1024, (avail_kb // 1024 if avail_kb is not None else None)


def _device_tree(src: Sources, name: str) -> list[str]:
    raw = src.read_text(f"/proc/device-tree/{name}") or src.read_text(
        f"/sys/firmware/devicetree/base/{name}"
    )
    return [s.strip() for s in (raw or "").split("\x00") if s.strip()]


def detect_board(src: Sources, sysctl: dict[str, str] | None = None) -> BoardInfo:
    if src.system == "Darwin":
        s = sysctl if sysctl is not None else _sysctl(src, APPLE_SYSCTL_KEYS)
        brand = s.get("machdep.cpu.brand_string", "")
        if brand.startswith("Apple"):
            return BoardInfo(kind="apple", model=s.get("hw.model"), soc=brand)
        return BoardInfo(kind="generic", model=s.get("hw.model"))
    models = _device_tree(src, "model")
    model = models[0] if models else None
    compatible = _device_tree(src, "compatible")
    release = src.read_text("/etc/nv_tegra_release")
    tegra = next((c.split(",", 1)[1] for c in compatible if c.startswith("nvidia,tegra")), None)
    if release is not None or tegra is not None or (model and "Jetson" in model):
        return BoardInfo(
            kind="jetson",
            model=model,
            soc=tegra,
            l4t=parse_tegra_release(release) if release else None,
        )
    return BoardInfo(kind="generic", model=model)


def _jetson_gpu(board: BoardInfo, ram_total_mb: int, ram_available_mb: int | None) -> GpuInfo:
    # NVML does not work on Jetson (exo #285); the integrated GPU shares the system RAM.
    family, cc = _TEGRA.get(board.soc or "", ("Tegra", None))
    return GpuInfo(
        vendor="nvidia",
        name=f"{family} (integrated)",
        memory_mb=ram_total_mb or None,
        free_mb=ram_available_mb,
        compute_capability=cc,
        driver=board.l4t,
        cores=None,
        unified_memory=True,
        source="jetson",
    )


def _apple_gpu(src: Sources, board: BoardInfo, ram_total_mb: int) -> GpuInfo:
    res = src.run(["ioreg", "-r", "-d", "1", "-c", "AGXAccelerator"])
    cores = None
    if res is not None:
        m = re.search(r'"gpu-core-count"\s*=\s*(\d+)', res.stdout)
        cores = _int(m.group(1)) if m else None
    return GpuInfo(
        vendor="apple",
        name=f"{board.soc or 'Apple'} GPU",
        memory_mb=ram_total_mb or None,
        free_mb=None,
        compute_capability=None,
        driver=None,
        cores=cores,
        unified_memory=True,
        source="ioreg",
    )


def _nvidia_smi(src: Sources) -> list[GpuInfo] | None:
    res = src.run(NVIDIA_SMI_QUERY)
    if res is None:
        return None
    if res.returncode == 0:
        return parse_nvidia_smi(res.stdout)
    # drivers before 510 reject the compute_cap field: ask again without it
    fields = NVIDIA_SMI_FIELDS.removesuffix(",compute_cap")
    res = src.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"])
    if res is None or res.returncode != 0:
        log.info("nvidia-smi failed: %s", res.stdout.strip()[:200] if res else "no output")
        return None
    return parse_nvidia_smi(res.stdout, with_compute_cap=False)


def _nvml(src: Sources) -> list[GpuInfo] | None:
    nvml = src.nvml() if src.nvml is not None else None
    if nvml is None:
        return None
    try:
        nvml.nvmlInit()
    except Exception as exc:  # pynvml raises its own NVMLError for a missing driver
        log.debug("NVML unavailable: %s", exc)
        return None
    gpus = []
    try:
        driver = nvml.nvmlSystemGetDriverVersion()
        for i in range(int(nvml.nvmlDeviceGetCount())):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            name = nvml.nvmlDeviceGetName(h)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            major, minor = nvml.nvmlDeviceGetCudaComputeCapability(h)
            gpus.append(
                GpuInfo(
                    vendor="nvidia",
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    memory_mb=int(mem.total) // (1 << 20),
                    free_mb=int(mem.free) // (1 << 20),
                    compute_capability=f"{int(major)}.{int(minor)}",
                    driver=driver.decode() if isinstance(driver, bytes) else str(driver),
                    cores=None,
                    unified_memory=False,
                    source="nvml",
                )
            )
    except Exception as exc:
        log.info("NVML query failed: %s", exc)
        return None
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception as exc:
            log.debug("nvmlShutdown: %s", exc)
    return gpus


def detect_gpus(
    src: Sources, board: BoardInfo, ram_total_mb: int, ram_available_mb: int | None
) -> tuple[GpuInfo, ...]:
    if board.kind == "jetson":
        return (_jetson_gpu(board, ram_total_mb, ram_available_mb),)
    if board.kind == "apple":
        return (_apple_gpu(src, board, ram_total_mb),)
    found = _nvidia_smi(src)
    if found is None:
        found = _nvml(src)
    return tuple(found or ())


def detect(src: Sources, data_dir: str) -> Hardware:
    """Everything but the benchmarks: fast (a few subprocesses at most)."""
    sysctl = _sysctl(src, APPLE_SYSCTL_KEYS) if src.system == "Darwin" else None
    cpu = detect_cpu(src, sysctl)
    total, available = detect_memory(src, sysctl)
    board = detect_board(src, sysctl)
    free = src.disk_free(data_dir)
    return Hardware(
        os=src.system,
        cpu=cpu,
        ram_total_mb=total,
        ram_available_mb=available,
        disk_path=data_dir,
        disk_free_mb=free // (1 << 20) if free is not None else None,
        board=board,
        gpus=detect_gpus(src, board, total, available),
    )
