"""The cached hardware profile: ``DATA_DIR/hw.json``.

Detection runs every time (it is cheap, and free memory and disk change); the benchmarks run
only when the cache is missing, malformed, older than ``max_age``, or when the hardware
fingerprint changed (new GPU, more RAM, numpy installed, a different CPU affinity).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from .bench import matmul_method, run_benchmarks
from .detect import detect
from .model import BenchResult, HardwareProfile
from .sources import Sources, real_sources

__all__ = ["load_profile", "CACHE_NAME", "MAX_AGE", "MAX_CACHE_BYTES"]

log = logging.getLogger(__name__)

CACHE_NAME = "hw.json"
MAX_AGE = 7 * 24 * 3600.0
MAX_CACHE_BYTES = 64 * 1024


def _cached_bench(
    path: Path, fingerprint: str, max_age: float, now: float
) -> tuple[BenchResult, float] | None:
    """(bench, measured_at) from the cache when it is valid, fresh and for this hardware."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CACHE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None
    try:
        if len(raw) > MAX_CACHE_BYTES:
            raise ValueError("too large")
        obj = json.loads(raw)
        if not isinstance(obj, dict):
            raise ValueError("not an object")
        bench = BenchResult.from_dict(obj.get("bench"))
        measured = obj.get("measured_at")
        if isinstance(measured, bool) or not isinstance(measured, int | float):
            raise ValueError("measured_at is not a number")
    except ValueError as exc:
        log.warning("ignoring malformed %s: %s", path, exc)
        return None
    if obj.get("fingerprint") != fingerprint:
        log.info("hardware changed since %s was written: measuring again", path)
        return None
    if not 0 <= now - float(measured) <= max_age:
        log.info("%s is stale: measuring again", path)
        return None
    return bench, float(measured)


def _write(path: Path, profile: HardwareProfile) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(profile.as_dict(), indent=1) + "\n")
    os.replace(tmp, path)  # readers never see a half-written file


def load_profile(
    data_dir: Path,
    *,
    refresh: bool = False,
    max_age: float = MAX_AGE,
    sources: Sources | None = None,
    bench: Callable[[], BenchResult] = run_benchmarks,
    now: Callable[[], float] = time.time,
) -> tuple[HardwareProfile, bool]:
    """(profile, whether the benchmarks ran now). Writes the cache when they ran."""
    src = sources or real_sources()
    hardware = detect(src, str(data_dir))
    fingerprint = hardware.fingerprint(matmul_method())
    path = Path(data_dir) / CACHE_NAME
    cached = None if refresh else _cached_bench(path, fingerprint, max_age, now())
    if cached is not None:
        return HardwareProfile(hardware, cached[0], cached[1], fingerprint), False
    profile = HardwareProfile(hardware, bench(), now(), fingerprint)
    try:
        _write(path, profile)
    except OSError as exc:
        log.warning("cannot write %s: %s", path, exc)
    return profile, True
