"""The ``edgemesh`` command: ``node``, ``peers``, ``hw``, ``demo``.

Client subcommands take ``--api URL`` (default: the local node found through the default data
dir) and ``--json``. Errors print one line on stderr and exit non-zero; ``-v`` adds tracebacks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.cli.common import CliError, api_get, api_post, parse_size
from mesh.cli.hw import add_hw_command, run_hw_command
from mesh.errors import EXPECTED
from mesh.local import default_data_dir, resolve_api

if TYPE_CHECKING:
    from mesh.node import NodeConfig

__all__ = [
    "main",
    "node_config",
    "CliError",
    "api_get",
    "api_post",
    "default_data_dir",
    "resolve_api",
]

log = logging.getLogger("mesh.cli")


def _default_memory_limit() -> int | None:
    """Without --memory-limit a node offers 70 % of physical memory: a peer must never be
    able to make it load shards until the machine swaps."""
    try:
        return int(0.7 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgemesh", description="Peer-to-peer edge inference mesh")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    _add_node_command(sub)
    c = sub.add_parser("peers", help="list the peers of a running node")
    c.add_argument("--api", default=None, help="node API base URL (default: the local node)")
    c.add_argument("--json", action="store_true", help="print one JSON object")

    from mesh.cli.bench import add_bench_command
    from mesh.cli.generate import add_generate_command
    from mesh.cli.mesh import add_mesh_commands
    from mesh.cli.model import add_model_commands
    from mesh.cli.storage import add_storage_commands

    add_model_commands(sub)
    add_generate_command(sub)
    add_hw_command(sub)
    add_bench_command(sub)
    add_storage_commands(sub)  # put, get, job
    _add_demo_command(sub)
    add_mesh_commands(sub)  # mesh create|invite|revoke|show, node --join
    return p


def _add_node_command(sub: Any) -> None:
    from mesh.cli.storage import add_node_storage_args

    n = sub.add_parser("node", help="run a mesh node")
    _add_node_network_args(n)
    _add_node_service_args(n)
    add_node_storage_args(n)  # --zone, --egress-price, --store-quota, ...


def _add_node_network_args(n: argparse.ArgumentParser) -> None:
    """Identity, API, signaling, discovery and ICE options of ``node``."""
    n.add_argument(
        "--data-dir", type=Path, default=None, help="identity and state (default: %(default)s)"
    )
    n.add_argument("--name", default="", help="human-readable node name (default: host name)")
    n.add_argument(
        "--api",
        type=_hostport,
        default=("127.0.0.1", 0),
        metavar="HOST:PORT",
        help="HTTP API address (default 127.0.0.1:0)",
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
        "--stun", action="append", default=[], metavar="URL", help="STUN/TURN server URL"
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
    n.add_argument("--runtime", default="onnx", help="layer runtime: onnx, tinygrad, fake")
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


def _add_demo_command(sub: Any) -> None:
    d = sub.add_parser("demo", help="start a local mesh and show it working")
    d.add_argument("--peers", type=int, default=3, help="number of local nodes (default 3)")
    d.add_argument(
        "--dir", type=Path, default=Path(".edgemesh-demo"), help="data dirs of the nodes"
    )
    d.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the mesh")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.add_argument("--prompt", default="The capital of France is", help="prompt to complete")
    d.add_argument("--max-tokens", type=int, default=32)
    d.add_argument("--temperature", type=float, default=0.0)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--runtime", default="onnx")
    d.add_argument("--no-baseline", action="store_true", help="skip the single-peer run")
    d.add_argument("--threads", type=int, default=None, help="inference threads per stage")
    d.add_argument(
        "--mode",
        choices=["push", "chain"],
        default="push",
        help="push: activations flow one way and the token comes straight back; "
        "chain: nested calls (one more traversal per step)",
    )
    d.add_argument("--model", type=Path, default=None, help="a GGUF to use instead of Gemma 3 270M")


def main(
    argv: list[str] | None = None, *, configure: Callable[[NodeConfig], NodeConfig] | None = None
) -> int:
    """Run one command. ``configure`` adjusts the node's config before ``node`` starts it: for
    programs that wrap this CLI (tests/fixtures/fault_node.py sets fault-injection knobs)."""
    args = _parser().parse_args(argv)
    _setup_process(args)
    try:
        return _dispatch(args, configure)
    except KeyboardInterrupt:
        return 130
    except EXPECTED + (OSError,) as exc:
        if args.verbose:
            log.exception("failed")
        print(f"edgemesh: {exc or type(exc).__name__}", file=sys.stderr)
        return 1


def _setup_process(args: argparse.Namespace) -> None:
    """Process-wide settings, made here and nowhere else: the library never makes them."""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        for noisy in ("aioice", "aiortc", "zeroconf", "aiohttp.access"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # kademlia warns on every lookup in a one-node DHT and on every lost UDP reply
        for noisy in ("kademlia", "rpcudp"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.command == "node":
        # The inference thread and the event loop hand the GIL back and forth on every step;
        # the default 5 ms switch interval would add up to that much to each handoff.
        sys.setswitchinterval(float(os.environ.get("EDGEMESH_SWITCH_INTERVAL", "0.0005")))


def _dispatch(
    args: argparse.Namespace, configure: Callable[[NodeConfig], NodeConfig] | None
) -> int:
    if args.command in ("node", "mesh"):
        from mesh.cli.mesh import join_before_start, run_mesh_command

        if args.command == "mesh":
            return run_mesh_command(args)
        join_before_start(args)  # node --join INVITE
        return asyncio.run(_run_node(args, configure))
    if args.command == "peers":
        return _peers(args)
    if args.command == "generate":
        from mesh.cli.generate import run_generate

        return asyncio.run(run_generate(args))
    if args.command == "model":
        from mesh.cli.model import run_model_command

        return run_model_command(args)
    if args.command == "hw":
        return run_hw_command(args)
    if args.command == "bench":
        from mesh.cli.bench import run_bench

        return run_bench(args)
    if args.command in ("put", "get", "job"):
        from mesh.cli.storage import run_storage_command

        return run_storage_command(args)
    if args.command == "demo":
        from mesh.cli.demo import run_demo

        return asyncio.run(
            run_demo(
                args.peers,
                args.dir,
                args.timeout,
                args.json,
                prompt=args.prompt,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                seed=args.seed,
                runtime=args.runtime,
                baseline=not args.no_baseline,
                model_path=args.model,
            )
        )
    return 2


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
    from mesh.net.transport import TransportConfig
    from mesh.node import NodeConfig

    return NodeConfig(
        data_dir=args.data_dir or default_data_dir(),
        name=args.name,
        api_host=args.api[0],
        api_port=args.api[1],
        signaling_host=args.signaling[0] if args.signaling else None,
        signaling_port=args.signaling[1] if args.signaling else 0,
        mdns=not args.no_mdns,
        mdns_interfaces=args.mdns_interface,
        static_peers=[f"{h}:{p}" for h, p in map(_hostport, args.peer)],
        ice_addresses=args.ice_address,
        ready_file=args.ready_file,
        transport=TransportConfig(ice_servers=tuple(args.stun)),
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
            runtime=args.runtime,
            threads=args.threads,
        ),
        storage=storage_config(args),
    )


async def _run_node(
    args: argparse.Namespace, configure: Callable[[NodeConfig], NodeConfig] | None
) -> int:
    from mesh.node import Node

    config = node_config(args)
    if configure is not None:
        config = configure(config)
    node = Node(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, node.stop)
    try:
        ready = await node.start()
        print(json.dumps(ready), flush=True)
        await node.run_until_stopped()
    finally:
        await node.stop()  # the same shutdown a signal started, awaited to its end
    return 0


def format_peers(peers: list[dict[str, Any]]) -> str:
    rows = [("PEER", "NAME", "STATE", "RTT MS", "SOURCE")]
    for p in peers:
        rtt = p.get("rtt_ms")
        rows.append(
            (
                str(p.get("peer_id", ""))[:16],
                str(p.get("name", ""))[:20],
                str(p.get("state", "")),
                f"{rtt:.2f}" if isinstance(rtt, float | int) else "-",
                str(p.get("source", "")),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _peers(args: argparse.Namespace) -> int:
    api = resolve_api(args.api)
    peers = api_get(api, "/v1/peers")
    if args.json:
        print(json.dumps({"api": api, "peers": peers}))
    else:
        print(format_peers(peers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
