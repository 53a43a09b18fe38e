"""Where peers come from: mDNS on the LAN, the MQTT rendezvous broker, the signed DHT.

Every source yields hints only; a peer counts once the handshake proves its key."""
