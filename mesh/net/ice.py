"""ICE servers: STUN/TURN URLs with their credentials, checked before a node starts.

Where they come from (:func:`resolve_ice_servers`):

- ``--stun URL`` (repeatable): URLs only. A URL carrying ``user:pass@`` is refused, since the
  command line is visible to every local user (``ps``);
- the ICE config file, ``--ice-config PATH`` or else ``DATA_DIR/ice.json`` when it exists: a
  JSON list of ``{"urls": URL or [URL, ...], "username": ..., "credential": ...}``, the shape
  of the browser's ``RTCIceServer``;
- the environment: ``EDGEMESH_TURN_USERNAME`` / ``EDGEMESH_TURN_CREDENTIAL`` apply to every
  ``turn:``/``turns:`` URL that has no credentials of its own.

aiortc (1.16) uses one STUN and one TURN server per connection and silently skips any other,
and any URL it cannot use (``stuns:``, ``turns:`` over UDP); a TURN server without credentials
gets a 401 and its relay candidate is dropped without a word. Each of these is refused here
with a message instead, so a node never starts with an ICE configuration that cannot work.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiortc import RTCIceServer
from aiortc.rtcicetransport import parse_stun_turn_uri

from mesh.errors import Error

__all__ = [
    "IceConfigError",
    "IceServer",
    "ICE_FILE",
    "ENV_USERNAME",
    "ENV_CREDENTIAL",
    "parse_url",
    "load_ice_file",
    "check_servers",
    "resolve_ice_servers",
]

log = logging.getLogger(__name__)

ICE_FILE = "ice.json"  # in the data dir
ENV_USERNAME = "EDGEMESH_TURN_USERNAME"
ENV_CREDENTIAL = "EDGEMESH_TURN_CREDENTIAL"
_WHERE = f"put credentials in {ICE_FILE} (or --ice-config) or in ${ENV_USERNAME}/${ENV_CREDENTIAL}"
_SHAPES = "stun:HOST[:PORT], turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT]"
MAX_FILE = 64 * 1024


class IceConfigError(Error, ValueError):
    """An ICE server configuration that cannot work (or would leak a credential)."""


@dataclass(frozen=True)
class IceServer:
    """One STUN or TURN URL and, for TURN, its long-term credential."""

    url: str
    username: str | None = None
    credential: str | None = field(default=None, repr=False)  # never in logs

    @property
    def is_turn(self) -> bool:
        return self.url.startswith("turn")

    def describe(self) -> str:
        """The URL and whether it has credentials, for logs and status (never the secret)."""
        return f"{self.url} (user {self.username})" if self.username else self.url

    def rtc(self) -> RTCIceServer:
        return RTCIceServer(urls=self.url, username=self.username, credential=self.credential)


def _redacted(url: str) -> str:
    scheme, _, rest = url.partition(":")
    return f"{scheme}:***@{rest.rpartition('@')[2]}"


def parse_url(url: str) -> dict[str, Any]:
    """aiortc's parse of ``url`` (scheme, host, port, transport), refusing what it would skip."""
    if "@" in url:
        raise IceConfigError(
            f"ICE server {_redacted(url)}: credentials in a URL are refused (the command line "
            f"and config dumps show them); {_WHERE}"
        )
    try:
        parsed = parse_stun_turn_uri(url)
    except ValueError as exc:
        raise IceConfigError(f"ICE server {url!r}: {exc} (expected {_SHAPES})") from None
    scheme, transport = parsed["scheme"], parsed.get("transport")
    if scheme == "stuns":
        raise IceConfigError(f"ICE server {url}: stuns: is not supported (use stun: or turns:)")
    if scheme == "turn" and transport not in ("udp", "tcp"):
        raise IceConfigError(f"ICE server {url}: turn: transport must be udp or tcp")
    if scheme == "turns" and transport != "tcp":
        raise IceConfigError(f"ICE server {url}: turns: runs over TLS on TCP only")
    if not 0 < parsed["port"] < 65536:
        raise IceConfigError(f"ICE server {url}: port out of range")
    return parsed


def _entry(i: int, raw: Any, path: Path) -> list[IceServer]:
    where = f"{path}: entry {i}"
    if not isinstance(raw, dict):
        raise IceConfigError(f"{where}: expected an object with urls, username, credential")
    unknown = set(raw) - {"urls", "username", "credential", "credentialType"}
    if unknown:
        raise IceConfigError(f"{where}: unknown keys {sorted(unknown)}")
    if raw.get("credentialType", "password") != "password":
        raise IceConfigError(f"{where}: only credentialType 'password' is supported")
    urls = raw.get("urls")
    urls = [urls] if isinstance(urls, str) else urls
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        raise IceConfigError(f"{where}: urls must be a URL or a non-empty list of URLs")
    user, secret = raw.get("username"), raw.get("credential")
    for key, value in (("username", user), ("credential", secret)):
        if value is not None and not isinstance(value, str):
            raise IceConfigError(f"{where}: {key} must be a string")
    return [IceServer(u, user or None, secret or None) for u in urls]


def load_ice_file(path: Path) -> list[IceServer]:
    """The ICE servers of a config file (a JSON list of RTCIceServer-shaped objects)."""
    try:
        text = path.read_text()[: MAX_FILE + 1]
    except OSError as exc:
        raise IceConfigError(f"ICE config {path}: {exc.strerror or exc}") from None
    if len(text) > MAX_FILE:
        raise IceConfigError(f"ICE config {path}: larger than {MAX_FILE} bytes")
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise IceConfigError(f"ICE config {path}: not JSON ({exc})") from None
    if not isinstance(raw, list):
        raise IceConfigError(f"ICE config {path}: expected a JSON list of ICE servers")
    servers = [s for i, entry in enumerate(raw) for s in _entry(i, entry, path)]
    if any(s.credential for s in servers) and path.stat().st_mode & 0o077:
        log.warning("ICE config %s holds a TURN credential and is readable by others", path)
    return servers


def check_servers(servers: Iterable[IceServer]) -> None:
    """IceConfigError unless aiortc would use every one of ``servers`` as written."""
    seen: dict[str, str] = {}
    for server in servers:
        parse_url(server.url)
        kind = "TURN" if server.is_turn else "STUN"
        if kind in seen:
            raise IceConfigError(
                f"ICE servers {seen[kind]} and {server.url}: aiortc uses one {kind} server per "
                "connection and would ignore the second; list one"
            )
        seen[kind] = server.url
        if kind == "TURN" and not (server.username and server.credential):
            raise IceConfigError(
                f"TURN server {server.url} has no username and credential (it would answer "
                f"401 and no relay candidate would be gathered); {_WHERE}"
            )
        if kind == "STUN" and (server.username or server.credential):
            raise IceConfigError(f"STUN server {server.url}: STUN takes no credentials")


def resolve_ice_servers(
    urls: Iterable[str],
    *,
    config_file: Path | None,
    default_file: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[IceServer, ...]:
    """The node's checked ICE servers from ``--stun`` URLs, the config file and ``env``.

    ``config_file`` must exist when given; ``default_file`` (DATA_DIR/ice.json) is read when
    it exists. The environment's TURN credentials fill in TURN URLs that have none.
    """
    env = os.environ if env is None else env
    servers = [IceServer(u) for u in urls]
    for url in urls:
        parse_url(url)  # a credential in argv: refused before anything else is read
    path = config_file if config_file is not None else default_file
    if path is not None and (config_file is not None or path.exists()):
        servers += load_ice_file(path)
    user, secret = env.get(ENV_USERNAME) or None, env.get(ENV_CREDENTIAL) or None
    if (user is None) != (secret is None):
        raise IceConfigError(f"set both ${ENV_USERNAME} and ${ENV_CREDENTIAL}, or neither")
    servers = [
        IceServer(s.url, user, secret) if s.is_turn and not s.username and not s.credential else s
        for s in servers
    ]
    check_servers(servers)
    return tuple(servers)
