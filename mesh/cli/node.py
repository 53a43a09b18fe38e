"""``edgemesh node``: its options, its config, and the process that runs it.

The node takes its data dir's lock (mesh/node.py) before it writes anything there: a second
node on the same data dir exits at once (code 2) and leaves the first's files alone. A signal
at any moment of start-up stops it cleanly: before the node is built by the default handler's
KeyboardInterrupt (caught in mesh.cli.main), after it by cancelling the start-up and running
the shutdown of whatever had started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.cli.common import CliError, parse_size
from mesh.local import (
    DEFAULT_API_PORT,
    BadAddress,
    DataDirLock,
    default_data_dir,
    parse_api_address,
)

if TYPE_CHECKING:
    from mesh.node import NodeConfig

__all__ = ["add_node_command", "node_config", "probe_data_dir", "run_node", "loop_factory"]

log = logging.getLogger(__name__)


def _default_memory_limit() -> int | None:
    """Without --memory-limit a node offers 70 % of physical memory: a peer must never be
    able to make it load shards until the machine swaps."""
    try:
        return int(0.7 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``http://HOST:PORT``, as the client commands print it)."""
    try:
        return parse_api_address(text)
    except BadAddress as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_node_command(sub: Any) -> None:
    from mesh.cli.storage import add_node_storage_args

    n = sub.add_parser("node", help="run a mesh node")
    _add_node_network_args(n)
    _add_node_engine_args(n)
    _add_node_service_args(n)
    add_node_storage_args(n)  # --zone, --egress-price, --store-quota, ...


def _add_node_network_args(n: argparse.ArgumentParser) -> None:
    """Identity, API, signaling, discovery and ICE options of ``node``."""
    n.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="identity and state (default: $EDGEMESH_HOME or ~/.local/share/edgemesh)",
    )
    n.add_argument("--name", default="", help="human-readable node name (default: host name)")
    n.add_argument(
        "--api",
        type=_hostport,
        default=None,
        metavar="HOST:PORT",
        help=f"HTTP API address (default 127.0.0.1:{DEFAULT_API_PORT}, or a free port when "
        "that one is taken; :0 for a free port)",
    )
    n.add_argument(
        "--signaling",
        type=_hostport,
        default=None,
        metavar="HOST:PORT",
        help="signaling endpoint (default: 0.0.0.0:0, or 127.0.0.1:0 for a loopback mesh)",
    )
    n.add_argument(
        "--mdns-interface",
        action="append",
        default=None,
        metavar="IP",
        help="announce and browse on this interface only (repeatable; default all)",
    )
    n.add_argument("--no-mdns", action="store_true", help="disable LAN discovery")
    n.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="signaling endpoint of a peer to connect to (repeatable)",
    )
    n.add_argument(
        "--ice-address",
        action="append",
        default=None,
        metavar="IP",
        help="restrict ICE host candidates to these addresses",
    )
    n.add_argument(
        "--stun",
        action="append",
        default=[],
        metavar="URL",
        help="STUN/TURN server URL, no credentials (stun:HOST[:PORT], turn:HOST[:PORT]"
        "[?transport=tcp], turns:HOST[:PORT]); TURN credentials come from the ICE config or "
        "$EDGEMESH_TURN_USERNAME/$EDGEMESH_TURN_CREDENTIAL",
    )
    n.add_argument(
        "--ice-config",
        type=Path,
        default=None,
        metavar="PATH",
        help="ICE servers with credentials, a JSON list of {urls, username, credential} "
        "(default: DATA_DIR/ice.json when it exists)",
    )
    n.add_argument(
        "--ice-relay-only",
        action="store_true",
        help="connect through the TURN relay only (peers never see this node's addresses)",
    )


def _add_node_engine_args(n: argparse.ArgumentParser) -> None:
    """The WebRTC engine and the event loop of ``node``."""
    n.add_argument(
        "--copies",
        choices=("auto", "on", "off"),
        default="auto",
        help="also send small frames (decode steps) on a second, unreliable data channel, so "
        "a lost packet costs a millisecond instead of SCTP's 400 ms+ retransmission timeout; "
        "auto: on links that cross a NAT or a TURN relay, and on any link for 5 minutes "
        "after it stalled",
    )
    n.add_argument(
        "--webrtc-engine",
        choices=("auto", "wrtc", "aiortc"),
        default="auto",
        help="WebRTC stack: wrtc (libwebrtc, Chrome's engine), aiortc (pure Python), or auto "
        "(wrtc when installed, else aiortc); the two interoperate",
    )
    n.add_argument(
        "--event-loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop: uvloop (faster), asyncio, or auto (uvloop when installed)",
    )


def _add_node_service_args(n: argparse.ArgumentParser) -> None:
    """Compute limits, broker, DHT and generation options of ``node``."""
    n.add_argument("--ready-file", type=Path, default=None, help="write the ready JSON here")
    n.add_argument(
        "--memory-limit",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="memory for loaded shards and their sessions' KV caches, e.g. 512M or 2G "
        "(default: 70%% of RAM)",
    )
    n.add_argument(
        "--disk-limit",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="disk for model shards pulled from peers (default: all but 1 GiB free)",
    )
    n.add_argument(
        "--runtime",
        default="onnx",
        help="layer runtime: onnx, tinygrad, llamacpp, fake (checked at start: installed?)",
    )
    n.add_argument("--threads", type=int, default=None, help="inference threads per shard")
    n.add_argument("--mesh", default="default", help="mesh name on the broker and in the DHT")
    n.add_argument(
        "--mqtt", default=None, metavar="URL", help="rendezvous broker, mqtt://HOST:PORT"
    )
    n.add_argument(
        "--mesh-key",
        type=Path,
        default=None,
        metavar="FILE",
        help="private mesh key (32 bytes or 64 hex): seals broker messages",
    )
    n.add_argument("--mqtt-username", default=None, help="broker user name")
    n.add_argument("--mqtt-ca", default=None, metavar="FILE", help="CA file for mqtts://")
    n.add_argument(
        "--dht-port", type=int, default=None, help="run the DHT on this UDP port (0: any)"
    )
    n.add_argument(
        "--dht-quota",
        type=int,
        default=256,
        metavar="N",
        help="DHT stores per minute one sender may make before it is cut off",
    )
    n.add_argument("--dht-host", default=None, help="DHT bind address (default: as signaling)")
    n.add_argument(
        "--step-timeout",
        type=float,
        default=45.0,
        metavar="SECONDS",
        help="longest wait for a generation step before the route is probed and re-planned",
    )
    n.add_argument(
        "--bootstrap",
        action="append",
        default=[],
        type=_hostport,
        metavar="HOST:PORT",
        help="DHT bootstrap node (repeatable; enables the DHT)",
    )


def _mqtt_config(args: argparse.Namespace) -> Any:
    from mesh.discovery.mqtt import MqttConfig, load_mesh_key

    if args.mqtt is None:
        if args.mesh_key is not None:
            raise CliError("--mesh-key needs --mqtt")
        return None
    try:
        return MqttConfig(
            url=args.mqtt,
            mesh=args.mesh,
            mesh_key=load_mesh_key(args.mesh_key) if args.mesh_key else None,
            username=args.mqtt_username,
            # never on the command line, where `ps` shows it
            password=os.environ.get("EDGEMESH_MQTT_PASSWORD"),
            ca_file=args.mqtt_ca,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None


def node_config(args: argparse.Namespace) -> NodeConfig:
    """The node's config from the ``node`` command's arguments."""
    from mesh.cli.storage import storage_config
    from mesh.inference.compute import ComputeConfig
    from mesh.node import NodeConfig

    api = args.api or ("127.0.0.1", DEFAULT_API_PORT)
    data_dir = args.data_dir or default_data_dir()
    return NodeConfig(
        data_dir=data_dir,
        name=args.name,
        api_host=api[0],
        api_port=api[1],
        api_port_fallback=args.api is None,
        signaling_host=args.signaling[0] if args.signaling else None,
        signaling_port=args.signaling[1] if args.signaling else 0,
        mdns=not args.no_mdns,
        mdns_interfaces=args.mdns_interface,
        static_peers=[f"{h}:{p}" for h, p in map(_hostport, args.peer)],
        ice_addresses=args.ice_address,
        ready_file=args.ready_file,
        transport=_transport_config(args, data_dir),
        mesh=args.mesh,
        mqtt=_mqtt_config(args),
        dht_port=args.dht_port,
        dht_host=args.dht_host,
        bootstrap=list(args.bootstrap),
        dht_quota=args.dht_quota,
        step_timeout=args.step_timeout,
        compute=ComputeConfig(
            memory_limit=args.memory_limit or _default_memory_limit(),
            disk_limit=args.disk_limit,
            runtime=check_runtime(args.runtime),
            threads=args.threads,
        ),
        storage=storage_config(args),
    )


def _transport_config(args: argparse.Namespace, data_dir: Path) -> Any:
    """ICE servers from --stun, the ICE config file and the environment; CliError (the node
    does not start) when they cannot work or a credential is on the command line."""
    from mesh.errors import TransportError
    from mesh.net.ice import ICE_FILE, IceConfigError, resolve_ice_servers
    from mesh.net.transport import TransportConfig

    try:
        servers = resolve_ice_servers(
            args.stun, config_file=args.ice_config, default_file=data_dir / ICE_FILE
        )
        return TransportConfig(
            ice_servers=servers,
            relay_only=args.ice_relay_only,
            engine=args.webrtc_engine,
            copies=args.copies,
        )
    except IceConfigError as exc:
        raise CliError(str(exc)) from None
    except TransportError as exc:  # the engine asked for is not installed here
        raise CliError(f"--webrtc-engine {args.webrtc_engine}: {exc}") from None


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The node's event loop: uvloop's when installed (``auto``) or asked for (aiortc runs
    about 1.5-2x faster on it; wrtc's events arrive through it too); None: asyncio's."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise CliError("--event-loop uvloop: uvloop is not installed") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def probe_data_dir(args: argparse.Namespace) -> None:
    """DataDirInUse now when a node runs from the data dir, before ``--join`` or building the
    node writes anything there (Node.start takes the lock for the node's life)."""
    lock = DataDirLock(args.data_dir or default_data_dir())
    lock.acquire()
    lock.release()


def check_runtime(name: str) -> str:
    """``name`` if that runtime can run here, else a CliError listing those that can."""
    from runtimes.base import RUNTIME_NAMES, available_runtimes

    usable = available_runtimes()
    if name in usable:
        return name
    why = "not installed here" if name in RUNTIME_NAMES else "unknown runtime"
    raise CliError(
        f"--runtime {name}: {why}; available on this machine: {', '.join(usable) or 'none'}"
        f" (known: {', '.join(RUNTIME_NAMES)})"
    )


async def run_node(
    args: argparse.Namespace, configure: Callable[[NodeConfig], NodeConfig] | None
) -> int:
    """Run the node until a signal; 130 when the signal came before it was ready."""
    from mesh.node import Node

    config = node_config(args)
    if configure is not None:
        config = configure(config)
    node = Node(config)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    phase = "starting"

    def on_signal() -> None:
        nonlocal phase
        if phase == "starting" and main_task is not None:
            phase = "stopping"
            main_task.cancel()  # mid start-up: unwind it, then shut down what had started
        else:
            node.stop()  # idempotent: a second signal changes nothing

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        ready = await node.start()
        phase = "running"
        print(json.dumps(ready), flush=True)
        log.info("API %s (token in %s)", ready["api"], config.data_dir / "api.token")
        await node.run_until_stopped()
    except asyncio.CancelledError:
        if phase != "stopping" or main_task is None:
            raise
        main_task.uncancel()
        return 130
    finally:
        await asyncio.shield(node.stop())  # the same shutdown a signal started, to its end
    return 0
