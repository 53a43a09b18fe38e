"""edgemesh: a peer-to-peer edge inference mesh.

The public façade. Submodules are private by convention; import from here::

    from mesh import Node, NodeConfig, Identity, Error
"""

from typing import TYPE_CHECKING, Any

from mesh.errors import (
    DeadlineExceeded,
    DiscoveryError,
    Error,
    HandshakeError,
    IdentityError,
    PeerUnavailable,
    RemoteError,
    RPCError,
    SignalingError,
    TooManyRequests,
    TransportError,
    WireError,
)

if TYPE_CHECKING:
    from mesh.client import ClientError, MeshClient
    from mesh.net.identity import Identity, peer_id_from_key
    from mesh.net.rpc import CallContext, Link, LinkParams, Reply
    from mesh.net.transport import TransportConfig
    from mesh.net.wire import Limits
    from mesh.node import Node, NodeConfig

# Heavy parts load on first use: importing mesh.errors (as runtimes/ does) must not pull in
# the node, aiortc and the runtimes, and nothing is wired at import time. Even the identity
# (cryptography) and the wire format wait: ``edgemesh`` loads in a few milliseconds before it
# can turn a Ctrl-C into a quiet exit (mesh/__main__.py).
_LAZY = {
    "Identity": "net.identity",
    "peer_id_from_key": "net.identity",
    "Limits": "net.wire",
    "ClientError": "client",
    "MeshClient": "client",
    "Node": "node",
    "NodeConfig": "node",
    "CallContext": "net.rpc",
    "Link": "net.rpc",
    "LinkParams": "net.rpc",
    "Reply": "net.rpc",
    "TransportConfig": "net.transport",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mesh' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [
    "CallContext",
    "ClientError",
    "MeshClient",
    "DeadlineExceeded",
    "DiscoveryError",
    "Error",
    "HandshakeError",
    "Identity",
    "IdentityError",
    "Limits",
    "Link",
    "LinkParams",
    "Node",
    "NodeConfig",
    "PeerUnavailable",
    "RPCError",
    "RemoteError",
    "Reply",
    "SignalingError",
    "TooManyRequests",
    "TransportConfig",
    "TransportError",
    "WireError",
    "peer_id_from_key",
]

__version__ = "0.1.0"
