"""Where detection reads the machine from: files, commands, a few OS calls.

Every detector takes a :class:`Sources`, so tests replay recorded outputs of other machines
(a Jetson, a Mac, an NVIDIA desktop) instead of reading the one they run on.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["CommandResult", "Sources", "real_sources", "MAX_READ", "COMMAND_TIMEOUT"]

log = logging.getLogger(__name__)

MAX_READ = 1 << 20  # /proc and /sys files are small; never read more than this
MAX_OUTPUT = 1 << 20
COMMAND_TIMEOUT = 5.0  # nvidia-smi can hang on a wedged driver


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str


ReadText = Callable[[str], "str | None"]
RunCommand = Callable[[Sequence[str]], "CommandResult | None"]


@dataclass(frozen=True)
class Sources:
    """Readers of the machine. ``read_text`` and ``run`` return None when absent."""

    read_text: ReadText
    run: RunCommand
    system: str  # platform.system(): "Linux", "Darwin", ...
    machine: str  # platform.machine(): "x86_64", "aarch64", "arm64", ...
    disk_free: Callable[[str], int | None]  # free bytes at a path
    usable_cores: Callable[[], int | None]  # CPUs this process may run on
    nvml: Callable[[], Any] | None = None  # returns the pynvml module, or None


def _read_text(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_READ)
    except OSError:
        return None
    # device-tree strings end in NUL (and `compatible` is a NUL-separated list)
    return data.decode("utf-8", errors="replace")


def _run(argv: Sequence[str]) -> CommandResult | None:
    exe = shutil.which(argv[0])
    if exe is None:
        return None
    try:
        proc = subprocess.run(
            [exe, *argv[1:]],
            capture_output=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("%s failed: %s", argv[0], exc)
        return None
    return CommandResult(proc.returncode, proc.stdout[:MAX_OUTPUT].decode(errors="replace"))


def _disk_free(path: str) -> int | None:
    probe = os.path.abspath(path)
    while not os.path.exists(probe):  # the data dir may not exist yet: ask its parent
        parent = os.path.dirname(probe)
        if parent == probe:
            return None
        probe = parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def _usable_cores() -> int | None:
    getter = getattr(os, "sched_getaffinity", None)
    if getter is not None:
        try:
            return len(getter(0))
        except OSError:
            pass
    return os.cpu_count()


def _pynvml() -> Any:
    try:
        import pynvml  # optional: only when the user installed it
    except ImportError:
        return None
    return pynvml


def real_sources() -> Sources:
    return Sources(
        read_text=_read_text,
        run=_run,
        system=platform.system(),
        machine=platform.machine(),
        disk_free=_disk_free,
        usable_cores=_usable_cores,
        nvml=_pynvml,
    )
