"""Hardware detection and microbenchmarks (CPU, GPUs, Jetson, Apple silicon).

``load_profile(data_dir)`` detects the machine, runs the microbenchmarks when the cached
``DATA_DIR/hw.json`` is missing, stale or for other hardware, and returns a frozen
:class:`HardwareProfile`; ``summary(profile)`` is the compact form for the peer record.
"""

from .detect import detect
from .model import (
    BenchResult,
    BoardInfo,
    CpuInfo,
    GpuInfo,
    Hardware,
    HardwareProfile,
    parse_summary,
    summary,
)
from .profile import CACHE_NAME, load_profile
from .sources import CommandResult, Sources, real_sources

__all__ = [
    "BenchResult",
    "BoardInfo",
    "CACHE_NAME",
    "CommandResult",
    "CpuInfo",
    "GpuInfo",
    "Hardware",
    "HardwareProfile",
    "Sources",
    "detect",
    "load_profile",
    "parse_summary",
    "real_sources",
    "summary",
]
