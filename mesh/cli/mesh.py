"""``edgemesh mesh create|invite|revoke|show`` and ``edgemesh node --join INVITE``.

The mesh commands work on a data dir's files (the owner's, by default the local node's), so
they need no running node: a running owner node notices new invites and revocations in its
data dir. ``--join`` redeems an invite before the node starts and dials the inviter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from mesh.cli.common import CliError
from mesh.local import default_data_dir
from mesh.net.identity import Identity
from mesh.trust.invite import InviteStore, create_invite, parse_invite
from mesh.trust.join import redeem_invite
from mesh.trust.keys import Anchor
from mesh.trust.policy import load_policy
from mesh.trust.provision import create_mesh, owner_of, revoke, save_membership

__all__ = ["add_mesh_commands", "run_mesh_command", "join_before_start", "parse_duration"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """``90``, ``30m``, ``24h``, ``7d``, ``2w`` as seconds."""
    t = text.strip().lower()
    unit = _UNITS.get(t[-1:], 0)
    try:
        value = float(t[:-1] if unit else t) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration such as 24h, got {text!r}") from None
    if not 0 < value < 100 * 365 * 86400:
        raise argparse.ArgumentTypeError("duration must be positive")
    return value


def add_mesh_commands(sub: Any) -> None:
    m = sub.add_parser("mesh", help="create a private mesh, invite nodes, revoke them")
    msub = m.add_subparsers(dest="mesh_command", required=True)
    c = msub.add_parser("create", help="make this data dir the owner of a new mesh")
    c.add_argument("--open", action="store_true", help="admit strangers (with a reduced surface)")
    i = msub.add_parser("invite", help="print an invite string for a new node")
    i.add_argument("--expires", type=parse_duration, default=24 * 3600.0, metavar="DURATION")
    i.add_argument("--uses", type=int, default=1, metavar="N", help="nodes it admits (default 1)")
    i.add_argument(
        "--address",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="the owner node's signaling address (default: the running node's)",
    )
    r = msub.add_parser("revoke", help="revoke a member; the revocation spreads to all")
    r.add_argument("peer_id")
    msub.add_parser("show", help="this data dir's mesh, certificate and revocations")
    for p in (c, i, r, msub.choices["show"]):
        p.add_argument("--data-dir", type=Path, default=None, help="(default: the local node's)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
    node = sub.choices.get("node")
    if node is not None:
        node.add_argument(
            "--join", default=None, metavar="INVITE", help="redeem an invite, then run"
        )


def _print(args: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    print(json.dumps(obj) if args.json else text)


def run_mesh_command(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir or default_data_dir())
    cmd = args.mesh_command
    if cmd == "create":
        anchor = create_mesh(data_dir, open_mesh=args.open)
        kind = "open" if anchor.open else "private"
        _print(args, anchor.to_json(), f"created {kind} mesh {anchor.mesh_id} in {data_dir}")
    elif cmd == "invite":
        _invite(args, data_dir)
    elif cmd == "revoke":
        rev = revoke(data_dir, args.peer_id)
        _print(
            args,
            {"revoked": rev.peer_id, "mesh_id": rev.mesh_id},
            f"revoked {rev.peer_id}; the owner node spreads it to the mesh",
        )
    elif cmd == "show":
        _show(args, data_dir)
    return 0


def _invite(args: argparse.Namespace, data_dir: Path) -> None:
    owner, _ = owner_of(data_dir)
    addresses = list(args.address)
    if not addresses:
        try:
            addresses = [json.loads((data_dir / "node.json").read_text())["signaling"]]
        except (OSError, ValueError, KeyError):
            raise CliError(
                "the owner node is not running: start it, or pass --address HOST:PORT"
            ) from None
    invite = create_invite(owner, ttl=args.expires, uses=args.uses, addresses=addresses)
    InviteStore(data_dir).record(invite)
    obj = {"invite": invite.text, "expires": invite.expires, "uses": invite.uses}
    _print(args, obj, invite.text)


def _show(args: argparse.Namespace, data_dir: Path) -> None:
    policy = load_policy(data_dir)
    if policy.anchor is None:
        raise CliError(f"{data_dir} is in no mesh: `edgemesh mesh create` or `node --join`")
    cert = policy.own_cert
    obj: dict[str, Any] = {
        **policy.anchor.to_json(),
        "owner": (data_dir / "mesh.key").exists(),
        "member": None
        if cert is None
        else {"peer_id": cert.peer_id, "expires": cert.expires, "roles": list(cert.roles)},
        "revoked": sorted(policy.revocations.by_peer) if policy.revocations else [],
    }
    lines = [f"mesh {obj['mesh_id']} ({'open' if obj['open'] else 'private'})"]
    if cert is not None:
        when = time.strftime("%Y-%m-%d", time.gmtime(cert.expires))
        lines.append(f"member {cert.peer_id} until {when} {' '.join(cert.roles)}".rstrip())
    else:
        lines.append("no valid member certificate")
    lines.append(f"{len(obj['revoked'])} revoked")
    _print(args, obj, "\n".join(lines))


def join_before_start(args: argparse.Namespace) -> None:
    """``node --join INVITE``: redeem it (unless already a member of that mesh) and dial
    the inviter."""
    text = getattr(args, "join", None)
    if not text:
        return
    invite = parse_invite(text)
    data_dir = Path(args.data_dir or default_data_dir())
    anchor = Anchor.load(data_dir)
    policy = load_policy(data_dir)
    if anchor is None or anchor.owner_key != invite.owner_key or policy.own_cert is None:
        identity = Identity.load_or_create(data_dir)
        anchor, cert = asyncio.run(redeem_invite(invite, identity))
        save_membership(data_dir, anchor, cert)
    args.peer = list(args.peer) + [a for a in invite.addresses if a not in args.peer]
