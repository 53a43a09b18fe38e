"""Start and drive node processes on this machine: for the demo, tests and benchmarks.

Each node is a separate ``python -m mesh node`` process; readiness is its ready JSON line on
stdout (the same object it writes to ``--ready-file``), never a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from hw.profile import CACHE_NAME as HW_CACHE
from hw.profile import MAX_CACHE_BYTES as MAX_HW_CACHE
from mesh.api.auth import TOKEN_FILE
from mesh.errors import Error
from mesh.trust.keys import Anchor
from mesh.trust.provision import create_mesh, provision_member

__all__ = ["NodeProcess", "LocalMesh", "LocalBroker", "wait_for"]


_PROVISION_LOCK = threading.Lock()
# Every local mesh of a process runs on this one machine. The hardware profile the first node
# measured (a second of numpy on every core, off the node's start-up path) is seeded into each
# later node's data dir, so that node starts do not benchmark over one another and over the
# work already running (they would also measure a share of the cores, not the machine).
_HW_SEED: dict[str, bytes] = {}


def _is_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except ValueError:
        return False


class LocalMeshError(Error):
    """A local node failed to start or the mesh did not form in time."""


@dataclass
class NodeProcess:
    proc: asyncio.subprocess.Process
    data_dir: Path
    ready: dict[str, Any] = field(default_factory=dict)
    stderr_tail: list[str] = field(default_factory=list)
    env_token: str | None = None  # EDGEMESH_API_TOKEN as the process got it

    @property
    def token(self) -> str:
        """The API token: the operator's, else the one the node wrote to its data dir."""
        if self.env_token:
            return self.env_token
        return (self.data_dir / TOKEN_FILE).read_text(encoding="ascii").strip()

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def session(self, **kwargs: Any) -> aiohttp.ClientSession:
        """An HTTP session that sends this node's token."""
        return aiohttp.ClientSession(headers=self.auth_headers(), **kwargs)

    @property
    def peer_id(self) -> str:
        return str(self.ready["peer_id"])

    @property
    def api(self) -> str:
        return str(self.ready["api"])

    @property
    def signaling(self) -> str:
        return str(self.ready["signaling"])

    def log_text(self) -> str:
        """Everything the node has logged so far (its stderr, drained line by line)."""
        path = self.data_dir / "node.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def wait_logged(self, *texts: str, timeout: float = 10.0) -> None:
        """Wait until every text appears in the log: stderr is drained by another task, so a
        counter read over HTTP can be ahead of the lines that explain it."""
        try:
            await wait_for(lambda: all(t in self.log_text() for t in texts), timeout, "log")
        except LocalMeshError:
            missing = [t for t in texts if t not in self.log_text()]
            raise LocalMeshError(
                f"node never logged {missing}; last lines: {self.stderr_tail[-10:]}"
            ) from None


async def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1
) -> Any:
    """Poll an async or sync predicate until it returns a truthy value, or raise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)  # polling period of a condition with a deadline
    raise LocalMeshError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


class LocalMesh:
    """A set of node processes sharing one loopback mDNS domain."""

    def __init__(
        self,
        base_dir: Path,
        *,
        mdns_interface: str | None = "127.0.0.1",
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        mesh: str | None = None,
        module: str = "mesh",
        share_hw_profile: bool = True,
    ) -> None:
        """``module``: what ``python -m`` runs for every node unless ``start_node`` names
        another (tests run wrappers of the CLI, e.g. ``tests.fixtures.fault_node``);
        ``share_hw_profile``: seed new nodes with the hardware profile measured first."""
        self.base_dir = Path(base_dir)
        # A mesh name of its own: local meshes started side by side do not see each other.
        self.mesh = mesh or f"local-{os.urandom(4).hex()}"
        self.mdns_interface = mdns_interface
        self.extra_args = extra_args or []
        self.env = env
        self.module = module
        self.share_hw_profile = share_hw_profile
        self.nodes: list[NodeProcess] = []
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> LocalMesh:
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=30), middlewares=(self._authorize,)
        )
        return self

    async def _authorize(
        self, req: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        """``_http`` sends each node's own token to that node's API (and to nothing else)."""
        if "Authorization" not in req.headers:
            origin = str(req.url.origin())
            for node in self.nodes:
                if node.ready.get("api") == origin:
                    req.headers["Authorization"] = f"Bearer {node.token}"
                    break
        return await handler(req)

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start_node(
        self,
        name: str,
        args: list[str] | None = None,
        ready_timeout: float = 30.0,
        module: str | None = None,
        wrap: list[str] | None = None,
        member: bool = True,
    ) -> NodeProcess:
        """``module``: what ``python -m`` runs (tests start misbehaving nodes this way);
        ``wrap`` prefixes the command (e.g. ``nsenter -t PID -n``: a node in a namespace);
        ``member``: issue the node a certificate of this mesh first (no invite round trip)."""
        data_dir = self.base_dir / name
        if member:
            await asyncio.to_thread(self.provision, data_dir)
        if self.share_hw_profile:
            await asyncio.to_thread(self._seed_hw_profile, data_dir)
        cmd = [
            sys.executable,
            "-m",
            module or self.module,
            "node",
            "--data-dir",
            str(data_dir),
            "--name",
            name,
        ]
        cmd = (wrap or []) + cmd
        cmd += ["--mesh", self.mesh]
        if self.mdns_interface:
            cmd += ["--mdns-interface", self.mdns_interface]
        cmd += self.extra_args + (args or [])
        if "--api" not in cmd:
            cmd += ["--api", "127.0.0.1:0"]  # side by side: not the default port, a free one
        env = dict(os.environ, **(self.env or {}))
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        node = NodeProcess(proc, data_dir, env_token=env.get("EDGEMESH_API_TOKEN") or None)
        self.nodes.append(node)
        asyncio.get_running_loop().create_task(self._drain_stderr(node))
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), ready_timeout)
            node.ready = json.loads(line)
        except (TimeoutError, ValueError):
            raise LocalMeshError(
                f"node {name} did not become ready: {' | '.join(node.stderr_tail[-5:])}"
            ) from None
        return node

    async def start_nodes(
        self, names: Sequence[str], args: list[str] | None = None, **kwargs: Any
    ) -> list[NodeProcess]:
        """Start nodes side by side, in the order of ``names`` (a start is mostly its
        interpreter's imports). With no hardware profile to share yet, the first starts
        alone and measures it, and the others start once it is there."""
        names = list(names)
        first: list[NodeProcess] = []
        if names and self.share_hw_profile and self._hw_seed() is None:
            first.append(await self.start_node(names.pop(0), args, **kwargs))
            await self.wait_hw_profile(first[0])
        rest = await asyncio.gather(*(self.start_node(n, args, **kwargs) for n in names))
        return first + list(rest)

    async def wait_hw_profile(self, node: NodeProcess, timeout: float = 10.0) -> None:
        """Until ``node`` has written its hardware profile (or exited, or ``timeout``: then
        the nodes started next measure their own)."""

        def measured() -> bool:
            return node.proc.returncode is not None or (node.data_dir / HW_CACHE).exists()

        with contextlib.suppress(LocalMeshError):
            await wait_for(measured, timeout, f"{node.data_dir.name}'s hardware profile", 0.05)

    def has_hw_seed(self) -> bool:
        """Whether a new node would start with a shared hardware profile."""
        return self._hw_seed() is not None

    def _hw_seed(self) -> bytes | None:
        """The profile to seed: this process's, or the first one a node of this mesh wrote."""
        if HW_CACHE not in _HW_SEED:
            for node in self.nodes:
                with contextlib.suppress(OSError):
                    raw = (node.data_dir / HW_CACHE).read_bytes()
                    if len(raw) <= MAX_HW_CACHE and _is_json_object(raw):  # not half-written
                        _HW_SEED[HW_CACHE] = raw
                        break
        return _HW_SEED.get(HW_CACHE)

    def _seed_hw_profile(self, data_dir: Path) -> None:
        """Write the shared profile into a new node's data dir (the node still checks it:
        a profile for other hardware, or a stale one, is measured again)."""
        seed = self._hw_seed()
        if seed is None or (data_dir / HW_CACHE).exists():
            return
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / HW_CACHE).write_bytes(seed)

    @property
    def owner_dir(self) -> Path:
        """Where this local mesh's owner key lives (created with the first member)."""
        return self.base_dir / ".mesh-owner"

    def provision(self, data_dir: Path) -> None:
        """Make the node of ``data_dir`` a member of this local mesh, offline."""
        with _PROVISION_LOCK:  # nodes started side by side must not both create the mesh
            if Anchor.load(self.owner_dir) is None:
                create_mesh(self.owner_dir)
        provision_member(self.owner_dir, data_dir)

    async def _drain_stderr(self, node: NodeProcess) -> None:
        stream = node.proc.stderr
        if stream is None:
            return
        log_path = node.data_dir / "node.log"
        node.data_dir.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8", buffering=1) as fh:  # noqa: ASYNC230 - line-buffered log
            while line := await stream.readline():
                text = line.decode(errors="replace").rstrip()
                fh.write(text + "\n")
                node.stderr_tail = (node.stderr_tail + [text])[-50:]

    async def get(self, node: NodeProcess, path: str) -> Any:
        assert self._http is not None, "use LocalMesh as an async context manager"
        async with self._http.get(node.api + path) as resp:
            resp.raise_for_status()
            return await resp.json()

    async def post(self, node: NodeProcess, path: str, body: dict[str, Any]) -> Any:
        assert self._http is not None, "use LocalMesh as an async context manager"
        async with self._http.post(
            node.api + path, json=body, timeout=aiohttp.ClientTimeout(total=600)
        ) as resp:
            if resp.status != 200:
                raise LocalMeshError(f"{path}: HTTP {resp.status}: {await resp.text()}")
            return await resp.json()

    async def connected_ids(self, node: NodeProcess) -> set[str]:
        peers = await self.get(node, "/v1/peers")
        return {p["peer_id"] for p in peers if p["state"] == "connected"}

    async def wait_connected(
        self, timeout: float = 30.0, nodes: list[NodeProcess] | None = None
    ) -> None:
        """Wait until every node lists every other as connected."""
        group = nodes or [n for n in self.nodes if n.proc.returncode is None]

        async def full() -> bool:
            for n in group:
                want = {m.peer_id for m in group if m is not n}
                if not want <= await self.connected_ids(n):
                    return False
            return True

        await wait_for(full, timeout, f"{len(group)} nodes to connect")

    def kill(self, node: NodeProcess, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            node.proc.send_signal(sig)

    async def stop(self) -> None:
        for node in self.nodes:
            if node.proc.returncode is None:
                self.kill(node, signal.SIGTERM)
        for node in self.nodes:
            try:
                await asyncio.wait_for(node.proc.wait(), 10)
            except TimeoutError:
                self.kill(node, signal.SIGKILL)
                await node.proc.wait()
        if self._http is not None:
            await self._http.close()
            self._http = None


def mosquitto_path() -> str:
    path = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(path).exists():
        raise LocalMeshError("mosquitto is not installed: run `make test`, which installs it")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalBroker:
    """A real mosquitto on a free loopback port (apt installs it but does not start it)."""

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
        raise LocalMeshError(f"mosquitto did not start: {self.log[-5:]}")

    async def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.log.append(line.decode(errors="replace").strip())

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            with contextlib.suppress(ProcessLookupError):
                await asyncio.wait_for(self.proc.wait(), 10)
