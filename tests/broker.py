"""A real mosquitto broker on a free loopback port, for tests (apt does not start one)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from pathlib import Path


def mosquitto_path() -> str:
    path = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(path).exists():
        raise RuntimeError("mosquitto is not installed: run `make test`, which installs it")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.log: list[str] = []

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    async def start(self, port: int | None = None) -> None:
        """Start on ``port`` (a restart keeps its port) or on a free one the OS picks."""
        for _ in range(5):
            self.port = port or _free_port()
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(
                f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n"
                "log_type information\n"
            )
            self.proc = await asyncio.create_subprocess_exec(
                mosquitto_path(),
                "-c",
                str(conf),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            assert self.proc.stdout is not None
            while True:  # readiness from its own log, not a sleep
                line = await asyncio.wait_for(self.proc.stdout.readline(), 10)
                if not line:
                    break
                text = line.decode(errors="replace").strip()
                self.log.append(text)
                if " running" in text:
                    asyncio.get_running_loop().create_task(self._drain())
                    return
            await self.proc.wait()  # could not bind: the port was taken meanwhile
            if port:
                break
        raise RuntimeError(f"mosquitto did not start: {self.log[-5:]}")

    async def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.log.append(line.decode(errors="replace").strip())

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            with contextlib.suppress(ProcessLookupError):
                await asyncio.wait_for(self.proc.wait(), 10)
