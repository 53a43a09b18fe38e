"""Baseline for bench_transport: a plain TCP echo/sink server in its own process.

Messages are a 4-byte big-endian length and a body whose first byte says what to do:
``E`` echo the body back, ``S`` answer the 4-byte length only (a sink). Prints its port.
"""

from __future__ import annotations

import socket
import struct
import sys


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def serve() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    print(srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            (n,) = struct.unpack(">I", recv_exact(conn, 4))
            body = recv_exact(conn, n)
            if body[:1] == b"E":
                conn.sendall(struct.pack(">I", n) + body)
            else:
                conn.sendall(struct.pack(">I", n))
    except ConnectionError:
        pass


if __name__ == "__main__":
    serve()
    sys.exit(0)
