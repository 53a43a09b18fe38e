"""Runs inside ``unshare -rn`` (a user + network namespace: no privileges needed) for
tests/test_faults_net.py: two nodes in two network namespaces joined by a veth pair, the
link cut (veth down) and restored. Prints one JSON object with the measured outcome."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from mesh.launch.localmesh import LocalMesh, NodeProcess, wait_for
from runtimes.testmodels import write_test_model

log = logging.getLogger(__name__)
A_IP, B_IP = "10.77.0.1", "10.77.0.2"
PROMPT = [1, 5, 9, 40, 77, 100, 3, 8, 200, 7]


def ip(*args: str, pid: int | None = None) -> None:
    ns = ["nsenter", "-t", str(pid), "-n"] if pid else []
    subprocess.run([*ns, "/usr/sbin/ip", *args], check=True, capture_output=True)


async def generate(mesh: LocalMesh, node: NodeProcess, body: dict[str, Any]) -> dict[str, Any]:
    assert mesh._http is not None
    async with asyncio.timeout(60):
        async with mesh._http.post(node.api + "/v1/generate", json=body) as resp:
            lines = [json.loads(x) async for x in resp.content if x.strip()]
    assert "error" not in lines[-1], lines[-1]
    return dict(lines[-1])


async def main(work: Path) -> dict[str, Any]:
    ip("link", "set", "lo", "up")
    # The second namespace is held by a sleeping process; B runs in it through nsenter.
    holder = await asyncio.create_subprocess_exec("unshare", "-n", "sleep", "600")
    try:
        await wait_for(
            lambda: os.readlink(f"/proc/{holder.pid}/ns/net") != os.readlink("/proc/self/ns/net"),
            5,
            "the second namespace",
        )
        ip("link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", str(holder.pid))
        ip("addr", "add", f"{A_IP}/24", "dev", "va")
        ip("link", "set", "va", "up")
        for cmd in (["link", "set", "lo", "up"], ["addr", "add", f"{B_IP}/24", "dev", "vb"]):
            ip(*cmd, pid=holder.pid)
        ip("link", "set", "vb", "up", pid=holder.pid)
        return await run(work, holder.pid)
    finally:
        holder.kill()
        await holder.wait()


async def run(work: Path, pid: int) -> dict[str, Any]:
    token = os.urandom(16).hex()  # B's API listens on its veth address: it needs a token
    model = write_test_model(work / "llama.gguf", "llama")
    async with LocalMesh(
        work / "mesh", mdns_interface=None, env={"EDGEMESH_API_TOKEN": token}
    ) as mesh:
        assert mesh._http is not None
        await mesh._http.close()
        mesh._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=10),
            headers={"Authorization": f"Bearer {token}"},
        )

        def at(addr: str) -> list[str]:
            return ["--signaling", f"{addr}:0", "--ice-address", addr, "--api", f"{addr}:0"]

        a = await mesh.start_node("a", at(A_IP))
        b = await mesh.start_node("b", at(B_IP), wrap=["nsenter", "-t", str(pid), "-n"])
        t0 = time.monotonic()
        await mesh.wait_connected(timeout=30)  # found over mDNS on the veth
        found_s = time.monotonic() - t0
        await mesh.post(a, "/v1/models", {"path": str(model), "name": "tiny"})
        body = {"model": "tiny", "tokens": PROMPT, "max_tokens": 12, "split": 2, "temperature": 0}
        clean = await generate(mesh, a, body)

        ip("link", "set", "va", "down")  # the cut: nothing crosses the veth any more
        t0 = time.monotonic()

        async def a_lost_b() -> bool:
            return b.peer_id not in await mesh.connected_ids(a)

        await wait_for(a_lost_b, 30, "a to drop b while the link is cut")
        drop_s = time.monotonic() - t0
        alone = await generate(mesh, a, dict(body, split=None))  # a runs it alone meanwhile

        ip("link", "set", "va", "up")
        t0 = time.monotonic()
        await mesh.wait_connected(timeout=60)
        reconnect_s = time.monotonic() - t0
        after = await generate(mesh, a, body)
        return {
            "found_s": round(found_s, 2),
            "drop_s": round(drop_s, 2),
            "reconnect_s": round(reconnect_s, 2),
            "clean": clean["tokens"],
            "clean_stages": [s["peer_id"] for s in clean["stages"]],
            "alone_stages": [s["peer_id"] for s in alone["stages"]],
            "alone": alone["tokens"],
            "after": after["tokens"],
            "after_stages": [s["peer_id"] for s in after["stages"]],
            "a": a.peer_id,
            "b": b.peer_id,
        }


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    print(json.dumps(asyncio.run(main(Path(sys.argv[1])))), flush=True)
