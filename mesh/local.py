"""Finding the local node: the default data dir, the ``node.json`` a running node writes and
the API token it keeps beside it (``api.token``, mode 0600), and the API address forms the
CLI accepts (``HOST:PORT``, ``:PORT``, ``PORT`` or ``http://HOST:PORT``)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import urllib.parse
from pathlib import Path

from mesh.errors import Error

__all__ = [
    "DEFAULT_API_PORT",
    "BadAddress",
    "DataDirInUse",
    "DataDirLock",
    "NoLocalNode",
    "api_url",
    "default_data_dir",
    "parse_api_address",
    "resolve_api",
    "resolve_token",
]

# The node's API listens here unless told otherwise (a node finding it taken picks a free
# one and says so), so a saved ``base_url`` survives restarts.
DEFAULT_API_PORT = 8477


class NoLocalNode(Error):
    """No API address was given and no node runs from the data dir."""


class DataDirInUse(Error):
    """Another node runs from this data dir (it holds the dir's lock)."""


class BadAddress(Error, ValueError):
    """An API address in none of the accepted forms."""


def default_data_dir() -> Path:
    env = os.environ.get("EDGEMESH_HOME")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "edgemesh"


def parse_api_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``(host, port)`` from ``HOST:PORT``, ``[V6]:PORT``, ``:PORT``, ``PORT`` or a URL
    ``http://HOST:PORT[/]`` (no path: the API is at the root)."""
    t = text.strip()
    if "://" in t:
        u = urllib.parse.urlsplit(t)
        if u.scheme != "http" or not u.hostname or u.path.strip("/") or u.query:
            raise BadAddress(f"expected http://HOST:PORT, got {text!r}")
        try:
            port = u.port
        except ValueError:
            raise BadAddress(f"bad port in {text!r}") from None
        return u.hostname, port if port is not None else 80
    host, sep, port_text = t.rpartition(":")
    if not sep:
        host, port_text = "", t
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise BadAddress(f"expected HOST:PORT or http://HOST:PORT, got {text!r}")
    return host.strip("[]") or default_host, int(port_text)


def api_url(text: str) -> str:
    """The base URL (``http://host:port``, no trailing slash) of an address in any form; an
    ``https://`` URL (a proxy in front of a node) is kept as it is."""
    if text.strip().startswith("https://"):
        return text.strip().rstrip("/")
    host, port = parse_api_address(text)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _running_api(data_dir: Path) -> str:
    return str(json.loads((data_dir / "node.json").read_text())["api"]).rstrip("/")


def resolve_api(api: str | None, data_dir: Path | None = None) -> str:
    """``api`` as a base URL, or the API of the node running from ``data_dir`` (default:
    the default data dir, ``EDGEMESH_HOME`` when set)."""
    if api:
        return api_url(api)
    base = data_dir if data_dir is not None else default_data_dir()
    try:
        return _running_api(base)
    except (OSError, ValueError, KeyError, TypeError):
        raise NoLocalNode(
            f"no running node found ({base / 'node.json'} missing); start one, or pass "
            "--data-dir DIR (the node's) or --api HOST:PORT"
        ) from None


def resolve_token(api: str, data_dir: Path | None = None) -> str | None:
    """The token to send to ``api``: ``EDGEMESH_API_TOKEN`` when set, else the one the node
    running from ``data_dir`` (default: the default data dir) wrote, but only when ``api`` is
    that node's address: a token is never handed to some other server named by ``--api``."""
    env = os.environ.get("EDGEMESH_API_TOKEN")
    if env:
        return env
    base = data_dir if data_dir is not None else default_data_dir()
    try:
        if _running_api(base) != api.rstrip("/"):
            return None
        token = (base / "api.token").read_text(encoding="ascii").strip()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return token or None


LOCK_FILE = "node.lock"


class DataDirLock:
    """The one-node-per-data-dir lock: ``flock`` on ``DATA_DIR/node.lock``, held for the
    node's life. The kernel drops it when the process dies, however it dies, so a stale lock
    never blocks a restart; the file itself stays (deleting it would let a third node lock a
    new file while the first still runs). The holder's pid is written in it, for the error."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock now or raise :class:`DataDirInUse` (never waits)."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise DataDirInUse(
                f"another node (pid {holder or '?'}) runs from {self.path.parent}: stop it, "
                "or give this one its own --data-dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
