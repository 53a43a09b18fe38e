"""The network room: identities, frames, RPC links, WebRTC transport, signaling, connections.

Dependencies point down: wire and identity at the bottom, then rpc, handshake, transport,
signaling, connections, peers; view (coordinates, zones, costs) sits on the links."""
