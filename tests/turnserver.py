"""A real coturn (``turnserver``) on loopback with one long-term-credential user, for tests.

coturn cannot be told to pick a free port: one is found by binding, then passed; if coturn
loses the race for it, another is tried. Readiness is a STUN binding answered on that port.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from pathlib import Path

from aioice import stun

from mesh.launch.localmesh import LocalMeshError

USER, PASSWORD, REALM = "alice", "correct-horse", "edgemesh.test"


def _free_port() -> int:
    """A port free on loopback for both UDP and TCP right now (TURN listens on both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


async def _answers_stun(port: int) -> bool:
    """Whether a STUN binding request to ``port`` is answered within 0.5 s."""
    loop = asyncio.get_running_loop()
    answered = loop.create_future()

    class Probe(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            if not answered.done():
                answered.set_result(True)

    transport, _ = await loop.create_datagram_endpoint(Probe, remote_addr=("127.0.0.1", port))
    try:
        request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        transport.sendto(bytes(request))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                return bool(await answered)
        return False
    finally:
        transport.close()


class TurnServer:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"turn:127.0.0.1:{self.port}"

    async def start(self) -> None:
        binary = shutil.which("turnserver")
        if binary is None:
            raise LocalMeshError("turnserver (coturn) is not installed: make test installs it")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            self.port = _free_port()
            # coturn refuses relaying to loopback peers unless told: this is a loopback test
            self.proc = await asyncio.create_subprocess_exec(
                binary, "-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1",
                f"--listening-port={self.port}", "--lt-cred-mech", f"--realm={REALM}",
                f"--user={USER}:{PASSWORD}", "--allow-loopback-peers", "--no-tls", "--no-dtls",
                "--no-cli", "--log-file=stdout", "--simple-log",
                f"--pidfile={self.workdir / 'turn.pid'}", f"--userdb={self.workdir / 'turn.db'}",
                stdout=(self.workdir / "turn.log").open("ab"),
                stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            for _ in range(40):  # up to 20 s, each probe waits for an answer
                if self.proc.returncode is not None:
                    break
                if await _answers_stun(self.port):
                    return
            await self.stop()
        raise LocalMeshError(f"turnserver did not start: see {self.workdir / 'turn.log'}")

    def log_text(self) -> str:
        return (self.workdir / "turn.log").read_text(errors="replace")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            with contextlib.suppress(ProcessLookupError):
                await asyncio.wait_for(self.proc.wait(), 10)
