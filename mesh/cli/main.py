"""The ``edgemesh`` command: ``node``, ``peers``, ``ps``, ``generate``, ``model``, ``put``,
``get``, ``job``, ``hw``, ``bench``, ``demo``, ``mesh``.

Client subcommands find their node by ``--api HOST:PORT`` (or a URL) or ``--data-dir DIR``
(default: ``EDGEMESH_HOME`` or the default data dir) and take ``--json``. Errors print one
line on stderr and exit non-zero (2: another node runs from that data dir); ``-v`` adds
tracebacks. A signal at any moment ends the command without a traceback (130).
"""

from __future__ import annotations

# Only light modules at the top: the console script imports this one before main() can turn a
# Ctrl-C into a quiet exit, so everything heavy loads inside main().
import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.errors import EXPECTED
from mesh.local import DataDirInUse

if TYPE_CHECKING:
    from mesh.node import NodeConfig

__all__ = ["main", "node_config"]

log = logging.getLogger("mesh.cli")


def node_config(args: argparse.Namespace) -> NodeConfig:
    """The node's config from the ``node`` command's arguments (mesh.cli.node)."""
    from mesh.cli.node import node_config as config

    return config(args)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgemesh")
    except PackageNotFoundError:
        from mesh import __version__

        return __version__


def _parser() -> argparse.ArgumentParser:
    from mesh.cli.bench import add_bench_command
    from mesh.cli.generate import add_generate_command
    from mesh.cli.hw import add_hw_command
    from mesh.cli.mesh import add_mesh_commands
    from mesh.cli.model import add_model_commands
    from mesh.cli.node import add_node_command
    from mesh.cli.status import add_status_commands
    from mesh.cli.storage import add_storage_commands

    p = argparse.ArgumentParser(prog="edgemesh", description="Peer-to-peer edge inference mesh")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    p.add_argument("--version", action="version", version=f"edgemesh {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    add_node_command(sub)
    add_status_commands(sub)  # peers, ps
    add_model_commands(sub)
    add_generate_command(sub)
    add_hw_command(sub)
    add_bench_command(sub)
    add_storage_commands(sub)  # put, get, job
    _add_demo_command(sub)
    add_mesh_commands(sub)  # mesh create|invite|revoke|show, node --join
    return p


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
    verbose = False
    try:
        args = _parser().parse_args(argv)
        verbose = args.verbose
        _setup_process(args)
        return _dispatch(args, configure)
    except KeyboardInterrupt:
        return 130
    except DataDirInUse as exc:
        print(f"edgemesh: {exc}", file=sys.stderr)
        return 2
    except EXPECTED + (OSError,) as exc:
        if verbose:
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
        from mesh.cli.node import loop_factory, probe_data_dir, run_node

        if args.command == "mesh":
            return run_mesh_command(args)
        probe_data_dir(args)  # another node runs there: exit 2, having touched nothing
        join_before_start(args)  # node --join INVITE
        return _run(run_node(args, configure), loop_factory(args.event_loop))
    if args.command in ("peers", "ps"):
        from mesh.cli.status import run_status_command

        return run_status_command(args)
    if args.command == "generate":
        from mesh.cli.generate import run_generate

        return _run(run_generate(args))
    if args.command == "model":
        from mesh.cli.model import run_model_command

        return run_model_command(args)
    if args.command == "hw":
        from mesh.cli.hw import run_hw_command

        return run_hw_command(args)
    if args.command == "bench":
        from mesh.cli.bench import run_bench

        return run_bench(args)
    if args.command in ("put", "get", "job"):
        from mesh.cli.storage import run_storage_command

        return run_storage_command(args)
    if args.command == "demo":
        return _demo(args)
    return 2


def _run(coro: Any, loop_factory: Callable[[], Any] | None = None) -> int:
    import asyncio

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        result: int = runner.run(coro)
    return result


def _demo(args: argparse.Namespace) -> int:
    from mesh.cli.demo import run_demo

    return _run(
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


if __name__ == "__main__":
    sys.exit(main())
