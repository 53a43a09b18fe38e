"""The NAT lab: homes behind real iptables NAT routers, a "wan" with a broker and a TURN
server, per-link delay and loss; node processes run inside it. Linux, as root.

Topology (network namespaces, all named ``eml<pid>-<tag>-...`` so runs side by side never
meet, and a run killed before its teardown is swept by the next one)::

    wan 203.0.113.1/24 (bridge; mosquitto :1883, coturn :3478 STUN+TURN)
     |-- router i: wan0 203.0.113.(10+i)  MASQUERADE (cone: port-preserving; symmetric:
     |     --random-fully), drops unsolicited inbound like a home router; delay and loss on
     |     everything it forwards
     |      `-- lan 192.168.i.1/24 (bridge) -- host i.j 192.168.i.(10+j)
     `-- public host k: 203.0.113.(100+k), no NAT (optionally a firewall dropping inbound)

The wan forwards nothing: a packet to a private address dies there silently, as it does on
the internet. This kernel has no ``netem``: delay is an NFQUEUE user-space delayer
(:mod:`mesh.launch.nfqdelay`) in each router, loss an ``iptables -m statistic`` rule.

The tests' and benchmarks' own process stays outside: a node's API (on loopback inside its
namespace) is reached through a forwarder whose sockets are opened in that namespace, so
nothing joins a lab namespace to the host's network.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mesh.errors import Error
from mesh.launch.localmesh import LocalMesh, NodeProcess, mosquitto_path

__all__ = [
    "NatLab",
    "Home",
    "Host",
    "LabError",
    "lab_unavailable",
    "in_netns",
    "TURN_USER",
    "TURN_PASSWORD",
    "DelayedMesh",
    "delayed_mesh",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
WAN_IP = "203.0.113.1"
WAN_NET = "203.0.113.0/24"
TURN_USER, TURN_PASSWORD, TURN_REALM = "lab", "lab-secret", "edgemesh.lab"
MQTT_PORT, TURN_PORT = 1883, 3478
CLONE_NEWNET = 0x40000000
_NAME = re.compile(r"^eml(\d+)-[0-9a-f]{4}-")


class LabError(Error):
    """The lab could not be built or a service in it did not start."""


def lab_unavailable() -> str | None:
    """Why the lab cannot run here (a skip reason), or None."""
    if sys.platform != "linux":
        return "the NAT lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the NAT lab needs root (network namespaces, iptables)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"the NAT lab needs {tool} (apt-get install iproute2 iptables)"
    return None


def _run(*args: str, check: bool = True) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """``fn()`` run in network namespace ``ns`` (a socket it creates stays in ``ns``).

    setns changes the calling thread only: a fresh thread enters the namespace and ends
    with ``fn``, so no thread of ours is ever left in a lab namespace."""
    out: dict[str, Any] = {}

    def enter() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {ns}")
            finally:
                os.close(fd)
            out["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            out["error"] = exc

    thread = threading.Thread(target=enter, name=f"netns-{ns}")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]  # type: ignore[no-any-return]


async def ns_connect(ns: str, host: str, port: int) -> tuple[asyncio.StreamReader, Any]:
    """A TCP connection opened from inside ``ns``."""
    sock = in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), 5)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


@dataclass
class Host:
    ns: str
    ip: str
    home: Home | None  # None: a public host on the wan

    @property
    def wrap(self) -> list[str]:
        """The prefix that runs a command in this host's namespace."""
        return ["ip", "netns", "exec", self.ns]


@dataclass
class Home:
    index: int
    router: str  # its router's namespace
    public_ip: str
    nat: str  # "cone" or "symmetric"
    hosts: list[Host] = field(default_factory=list)
    delay_ms: float = 0.0
    loss: float = 0.0
    delayer: asyncio.subprocess.Process | None = None
    cut: bool = False  # its uplink is down (NatLab.cut)

    @property
    def subnet(self) -> str:
        return f"192.168.{self.index}"


class NatLab:
    """Build with ``async with NatLab(workdir) as lab``; everything is torn down on exit,
    after a failure too. ``lab.mesh`` starts nodes (``lab.start_node``)."""

    def __init__(self, workdir: Path, *, mesh_env: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.tag = f"eml{os.getpid()}-{os.urandom(2).hex()}"
        self.wan = f"{self.tag}-wan"
        self.homes: list[Home] = []
        self.public: list[Host] = []
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []  # services in the wan
        self._delayers: list[asyncio.subprocess.Process] = []
        self._servers: list[asyncio.Server] = []
        self.mesh = LocalMesh(self.workdir / "mesh", mdns_interface=None, env=mesh_env)

    # -- addresses of the wan's services ---------------------------------------------------
    @property
    def mqtt_url(self) -> str:
        return f"mqtt://{WAN_IP}:{MQTT_PORT}"

    @property
    def stun_url(self) -> str:
        return f"stun:{WAN_IP}:{TURN_PORT}"

    @property
    def turn_url(self) -> str:
        return f"turn:{WAN_IP}:{TURN_PORT}"

    def ice_file(self, path: Path, *, turn: bool = True, transport: str = "udp") -> Path:
        """An ICE config (mode 0600) with the lab's STUN and, with ``turn``, its TURN server
        and credentials, as a user writes DATA_DIR/ice.json."""
        servers: list[dict[str, Any]] = [{"urls": self.stun_url}]
        if turn:
            servers.append(
                {
                    "urls": f"{self.turn_url}?transport={transport}",
                    "username": TURN_USER,
                    "credential": TURN_PASSWORD,
                }
            )
        path.write_text(json.dumps(servers))
        path.chmod(0o600)
        return path

    # -- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> NatLab:
        reason = lab_unavailable()
        if reason is not None:
            raise LabError(reason)
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            await asyncio.to_thread(sweep_stale)
            await asyncio.to_thread(self._build_wan)
            await self._start_services()
            await self.mesh.__aenter__()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop nodes, forwarders, services and delayers; delete every namespace."""
        with contextlib.suppress(Exception):
            await self.mesh.stop()
        for server in self._servers:
            server.close()
        for delayer in self._delayers:
            if delayer.returncode is None:
                delayer.terminate()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(delayer.wait(), 10)
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
        await asyncio.to_thread(self._delete_namespaces)

    def _delete_namespaces(self) -> None:
        for ns in reversed(self._namespaces):
            _kill_pids_in(ns)
            _run("ip", "netns", "del", ns, check=False)
        self._namespaces.clear()

    # -- building --------------------------------------------------------------------------
    def _netns(self, name: str) -> str:
        ns = f"{self.tag}-{name}"
        _run("ip", "netns", "add", ns)
        self._namespaces.append(ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def _sysctl(self, ns: str, key: str, value: str) -> None:
        _run("ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}")

    def _iptables(self, ns: str, *rule: str) -> None:
        _run("ip", "netns", "exec", ns, "iptables", *rule)

    def _build_wan(self) -> None:
        ns = self._netns("wan")
        _run("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", ns, "addr", "add", f"{WAN_IP}/24", "dev", "br0")
        _run("ip", "-n", ns, "link", "set", "br0", "up")
        # coturn needs a default route ("udp send: Network is unreachable" without); it leads
        # nowhere (no neighbour answers for .254): the lab stays closed.
        _run("ip", "-n", ns, "route", "add", "default", "via", "203.0.113.254", "dev", "br0")
        self._sysctl(ns, "net.ipv4.ip_forward", "0")  # private destinations die here

    def _attach_to_wan(self, ns: str, port: str, ip: str) -> None:
        """A veth from ``ns`` (``wan0``, at ``ip``) to the wan's bridge (as ``port``)."""
        _run("ip", "-n", ns, "link", "add", "wan0", "type", "veth", "peer", "name", port,
             "netns", self.wan)  # fmt: skip
        _run("ip", "-n", self.wan, "link", "set", port, "master", "br0", "up")
        _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "wan0")
        _run("ip", "-n", ns, "link", "set", "wan0", "up")

    async def add_home(
        self, nat: str = "cone", hosts: int = 1, delay_ms: float = 0.0, loss: float = 0.0
    ) -> Home:
        """A home: its router (NAT ``cone`` or ``symmetric``) and ``hosts`` hosts behind it;
        ``delay_ms`` one way and ``loss`` (0..1) on each packet its router forwards."""
        if nat not in ("cone", "symmetric"):
            raise ValueError(f"nat must be cone or symmetric, got {nat!r}")
        index = len(self.homes) + 1
        home = await asyncio.to_thread(self._build_home, index, nat, hosts)
        self.homes.append(home)
        await self.set_link(home, delay_ms, loss)
        return home

    def _build_home(self, index: int, nat: str, hosts: int) -> Home:
        router = self._netns(f"r{index}")
        home = Home(index, router, f"203.0.113.{10 + index}", nat)
        self._attach_to_wan(router, f"r{index}", home.public_ip)
        _run("ip", "-n", router, "route", "add", "default", "via", WAN_IP)
        _run("ip", "-n", router, "link", "add", "lan", "type", "bridge")
        _run("ip", "-n", router, "addr", "add", f"{home.subnet}.1/24", "dev", "lan")
        _run("ip", "-n", router, "link", "set", "lan", "up")
        self._sysctl(router, "net.ipv4.ip_forward", "1")
        masq = ["-t", "nat", "-A", "POSTROUTING", "-o", "wan0", "-j", "MASQUERADE"]
        self._iptables(router, *masq, *(["--random-fully"] if nat == "symmetric" else []))
        # Like a home router: from the wan, only replies to what went out get in (an
        # unsolicited packet accepted would create state that steals a mapping's port).
        for chain in ("FORWARD", "INPUT"):
            self._iptables(router, "-A", chain, "-i", "wan0", "-m", "conntrack", "--ctstate",
                           "ESTABLISHED,RELATED", "-j", "ACCEPT")  # fmt: skip
            self._iptables(router, "-A", chain, "-i", "wan0", "-j", "DROP")
        for j in range(1, hosts + 1):
            home.hosts.append(self._build_host(home, j))
        return home

    def _build_host(self, home: Home, j: int) -> Host:
        ns = self._netns(f"h{home.index}-{j}")
        ip = f"{home.subnet}.{10 + j}"
        _run("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"h{j}",
             "netns", home.router)  # fmt: skip
        _run("ip", "-n", home.router, "link", "set", f"h{j}", "master", "lan", "up")
        _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "-n", ns, "route", "add", "default", "via", f"{home.subnet}.1")
        return Host(ns, ip, home)

    async def add_public_host(self, firewall: bool = False) -> Host:
        """A host on the wan itself (a public address, no NAT). ``firewall``: it drops
        unsolicited inbound packets (replies to its own traffic get in)."""
        k = len(self.public) + 1
        host = await asyncio.to_thread(self._build_public, k, firewall)
        self.public.append(host)
        return host

    def _build_public(self, k: int, firewall: bool) -> Host:
        ns = self._netns(f"p{k}")
        ip = f"203.0.113.{100 + k}"
        self._attach_to_wan(ns, f"p{k}", ip)
        _run("ip", "-n", ns, "route", "add", "default", "via", WAN_IP)
        if firewall:
            self._iptables(ns, "-A", "INPUT", "-i", "wan0", "-m", "conntrack", "--ctstate",
                           "ESTABLISHED,RELATED", "-j", "ACCEPT")  # fmt: skip
            self._iptables(ns, "-A", "INPUT", "-i", "wan0", "-j", "DROP")
        return Host(ns, ip, None)

    async def set_link(self, home: Home, delay_ms: float, loss: float) -> None:
        """Change a home's uplink: ``delay_ms`` one way through its router, ``loss`` 0..1."""
        if not 0 <= loss < 1 or delay_ms < 0:
            raise ValueError("loss must be in [0, 1) and delay_ms >= 0")
        r = home.router
        if home.loss > 0:
            self._iptables(r, "-D", "FORWARD", "-m", "statistic", "--mode", "random",
                           "--probability", str(home.loss), "-j", "DROP")  # fmt: skip
        if loss > 0:
            self._iptables(r, "-I", "FORWARD", "1", "-m", "statistic", "--mode", "random",
                           "--probability", str(loss), "-j", "DROP")  # fmt: skip
        home.loss = loss
        if home.delayer is not None:
            self._iptables(r, "-t", "mangle", "-D", "FORWARD", "-j", "NFQUEUE", "--queue-num", "0")
            with contextlib.suppress(ProcessLookupError):
                home.delayer.terminate()
            await asyncio.wait_for(home.delayer.wait(), 10)
            home.delayer = None
        home.delay_ms = delay_ms
        if delay_ms > 0:
            home.delayer = await self._start_delayer(r, delay_ms)
            self._iptables(r, "-t", "mangle", "-A", "FORWARD", "-j", "NFQUEUE", "--queue-num", "0")

    async def cut(self, home: Home) -> None:
        """The home's uplink dies: its router silently drops all to and from the wan (an ISP
        outage); hosts keep addresses, the NAT its mappings. :meth:`restore` ends it."""
        if not home.cut:
            await asyncio.to_thread(self._cut_rules, home, "-I")
            home.cut = True

    async def restore(self, home: Home) -> None:
        """The home's uplink works again (after :meth:`cut`)."""
        if home.cut:
            await asyncio.to_thread(self._cut_rules, home, "-D")
            home.cut = False

    def _cut_rules(self, home: Home, op: str) -> None:
        # first in their chains: ahead of the conntrack ACCEPT that lets replies in
        first = ["1"] if op == "-I" else []
        for chain, way in (("FORWARD", "-i"), ("FORWARD", "-o"), ("INPUT", "-i"), ("OUTPUT", "-o")):
            self._iptables(home.router, op, chain, *first, way, "wan0", "-j", "DROP")

    async def _start_delayer(self, ns: str, delay_ms: float) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", ns, sys.executable, "-m", "mesh.launch.nfqdelay",
            "--queue", "0", "--delay-ms", str(delay_ms),
            stdout=asyncio.subprocess.PIPE,
            stderr=(self.workdir / f"{ns}-delay.log").open("ab"),
        )  # fmt: skip
        self._delayers.append(proc)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        if line.strip() != b"ready":
            raise LabError(f"the delayer in {ns} did not start: see {self.workdir}")
        return proc

    # -- services on the wan ---------------------------------------------------------------
    async def _start_services(self) -> None:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {MQTT_PORT} {WAN_IP}\nallow_anonymous true\npersistence false\n"
            "log_dest stdout\nlog_type error\nlog_type warning\nlog_type notice\n"
        )
        self._spawn("mosquitto", [mosquitto_path(), "-c", str(conf)])
        turnserver = shutil.which("turnserver")
        if turnserver is None:
            raise LabError("turnserver (coturn) is not installed: `make apt` installs it")
        self._spawn("turn", [
            turnserver, "-n", f"--listening-ip={WAN_IP}", f"--relay-ip={WAN_IP}",
            f"--listening-port={TURN_PORT}", "--lt-cred-mech", f"--realm={TURN_REALM}",
            f"--user={TURN_USER}:{TURN_PASSWORD}", "--no-tls", "--no-dtls", "--no-cli",
            # the lab's "public" range is a documentation range coturn would refuse to relay to
            "--allowed-peer-ip=203.0.113.0-203.0.113.255",
            "--log-file=stdout", "--simple-log", f"--pidfile={self.workdir / 'turn.pid'}",
            f"--userdb={self.workdir / 'turn.db'}",
        ])  # fmt: skip
        await self._wait_service(MQTT_PORT, "mosquitto", tcp=True)
        await self._wait_service(TURN_PORT, "coturn", tcp=False)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log_file = (self.workdir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.wan, *cmd], stdout=log_file, stderr=subprocess.STDOUT
        )
        self._procs.append(proc)

    async def _wait_service(self, port: int, what: str, *, tcp: bool) -> None:
        """Until the service answers from inside the wan (TCP connect, or a STUN binding)."""
        for _ in range(100):
            if await (self._tcp_open(port) if tcp else self._answers_stun(port)):
                return
            await asyncio.sleep(0.1)  # polling period of a readiness check with a deadline
        raise LabError(f"{what} did not start in the lab's wan: see {self.workdir}")

    async def _tcp_open(self, port: int) -> bool:
        try:
            _, writer = await ns_connect(self.wan, WAN_IP, port)
        except OSError:
            return False
        writer.close()
        return True

    async def _answers_stun(self, port: int) -> bool:
        from aioice import stun

        sock = in_netns(self.wan, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            request = stun.Message(
                message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST
            )
            await loop.sock_sendto(sock, bytes(request), (WAN_IP, port))
            async with asyncio.timeout(0.5):
                await loop.sock_recv(sock, 2048)
            return True
        except (TimeoutError, OSError):
            return False
        finally:
            sock.close()

    # -- nodes -----------------------------------------------------------------------------
    async def start_node(
        self, name: str, host: Host, args: list[str] | None = None, **kwargs: Any
    ) -> NodeProcess:
        """A node process in ``host``'s namespace, joined to the lab's broker (mDNS off).

        Its API listens on loopback in its namespace at a port first bound here, on this
        side's loopback, by a forwarder into the namespace: the same URL works on both sides
        (and the API's Host check sees its own address)."""
        await self._await_hw_profile()
        api = await self._forward(host.ns)
        base = ["--no-mdns", "--mqtt", self.mqtt_url, "--api", api.removeprefix("http://")]
        node = await self.mesh.start_node(name, base + (args or []), wrap=host.wrap, **kwargs)
        if node.api != api:
            raise LabError(f"node {name} listens on {node.api}, not {api}")
        return node

    async def start_nodes(
        self, hosts: Sequence[tuple[str, Host]], args: list[str] | None = None, **kwargs: Any
    ) -> list[NodeProcess]:
        """``start_node`` for each (name, host), side by side once the first is up (the
        others wait for the hardware profile it measures: ``_await_hw_profile``)."""
        if not hosts:
            return []
        (name, host), rest = hosts[0], hosts[1:]
        first = await self.start_node(name, host, args, **kwargs)
        more = await asyncio.gather(*(self.start_node(n, h, args, **kwargs) for n, h in rest))
        return [first, *more]

    async def _await_hw_profile(self) -> None:
        """Before a node starts: the hardware profile the lab's first node measures.

        The lab's "machines" share this machine's cores: a node's first-start benchmark
        (numpy on every core, about a second) would stall the other nodes' event loops and
        show up as network time. The first node measures it, the others wait for it and
        start with it (``LocalMesh.start_node`` seeds the profile it finds)."""
        if self.mesh.nodes and not self.mesh.has_hw_seed():
            await self.mesh.wait_hw_profile(self.mesh.nodes[0], timeout=30.0)

    async def _forward(self, ns: str) -> str:
        """A loopback listener here whose connections go to the same port on 127.0.0.1 in
        ``ns``."""
        port = 0

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_r, up_w = await ns_connect(ns, "127.0.0.1", port)
            except (OSError, TimeoutError):
                writer.close()
                return
            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self._servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def describe(self) -> dict[str, Any]:
        """What was built, as JSON (for scripts: namespaces, addresses, services)."""
        return {
            "wan": {"ns": self.wan, "ip": WAN_IP, "mqtt": self.mqtt_url, "stun": self.stun_url,
                    "turn": self.turn_url, "turn_user": TURN_USER},
            "homes": [
                {"router": h.router, "public_ip": h.public_ip, "nat": h.nat,
                 "delay_ms": h.delay_ms, "loss": h.loss,
                 "hosts": [{"ns": x.ns, "ip": x.ip} for x in h.hosts]}
                for h in self.homes
            ],
            "public": [{"ns": x.ns, "ip": x.ip} for x in self.public],
        }  # fmt: skip


class DelayedMesh:
    """A LocalMesh for benchmarks whose every node sits in its own home behind a cone NAT;
    each home's router delays what it forwards by half of ``delay_ms``, so any two nodes are
    ``delay_ms`` apart one way (through both routers) and link through the lab's STUN."""

    def __init__(self, lab: NatLab, delay_ms: float) -> None:
        self.lab = lab
        self.delay_ms = delay_ms

    async def start_node(
        self, name: str, args: list[str] | None = None, **kwargs: Any
    ) -> NodeProcess:
        home = await self.lab.add_home("cone", delay_ms=self.delay_ms / 2)
        lab_args = ["--mesh", "delayed", "--stun", self.lab.stun_url]
        return await self.lab.start_node(name, home.hosts[0], lab_args + (args or []), **kwargs)

    def __getattr__(self, name: str) -> Any:  # nodes, post, get, wait_connected, ...
        return getattr(self.lab.mesh, name)


@contextlib.asynccontextmanager
async def delayed_mesh(workdir: Path, delay_ms: float) -> AsyncIterator[DelayedMesh]:
    """``async with delayed_mesh(dir, 20) as mesh``: nodes ``delay_ms`` apart one way."""
    async with NatLab(workdir) as lab:
        yield DelayedMesh(lab, delay_ms)


def _kill_pids_in(ns: str) -> None:
    """Processes still in a lab namespace (started there by the lab): killed by pid."""
    for pid in _run("ip", "netns", "pids", ns, check=False).split():
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            os.kill(int(pid), 9)


def sweep_stale() -> None:
    """Delete lab namespaces left by a run that died before its teardown (its pid is gone)."""
    for line in _run("ip", "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME.match(name)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # its run is still going
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        log.warning("removing lab namespace %s left by a run that died", name)
        _kill_pids_in(name)
        _run("ip", "netns", "del", name, check=False)
