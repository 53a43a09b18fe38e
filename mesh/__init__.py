"""edgemesh: a peer-to-peer edge inference mesh.

The public façade. Submodules are private by convention; import from here::

    from mesh import Node, NodeConfig, Identity, Error
"""

from .client import ClientError, MeshClient
from .errors import (
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
from .identity import Identity, peer_id_from_key
from .node import Node, NodeConfig
from .rpc import CallContext, Link, LinkParams, Reply
from .transport import TransportConfig
from .wire import Limits

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
