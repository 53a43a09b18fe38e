"""Separate node processes on loopback: mDNS discovery, WebRTC links, liveness."""

import json
import signal
import time

import pytest

from mesh.launch.localmesh import wait_for

pytestmark = pytest.mark.network


async def test_three_nodes_connect_and_a_killed_fourth_disappears(local_mesh, tmp_path):
    ready_file = tmp_path / "ready-0.json"
    nodes = [await local_mesh.start_node("n0", ["--ready-file", str(ready_file)])]
    nodes += await local_mesh.start_nodes([f"n{i}" for i in (1, 2)])
    # within 20 s of the last node being ready (each start-up is a second of imports)
    await local_mesh.wait_connected(timeout=20, nodes=nodes)

    ready = json.loads(ready_file.read_text())
    assert ready["peer_id"] == nodes[0].peer_id
    assert ready["api"].startswith("http://127.0.0.1:") and ":" in ready["signaling"]
    peers = await local_mesh.get(nodes[0], "/v1/peers")
    assert {p["state"] for p in peers} == {"connected"}
    assert all(set(p) >= {"peer_id", "state", "rtt_ms", "path_ms", "frame_size"} for p in peers)

    fourth = await local_mesh.start_node("n3")
    await local_mesh.wait_connected(timeout=20, nodes=nodes + [fourth])
    local_mesh.kill(fourth, signal.SIGKILL)
    killed_at = time.monotonic()

    async def gone_everywhere():
        for n in nodes:
            listed = {p["peer_id"] for p in await local_mesh.get(n, "/v1/peers")}
            if fourth.peer_id in listed:
                return False
        return True

    await wait_for(gone_everywhere, 30, "the killed node to disappear")
    assert time.monotonic() - killed_at < 30
    # the survivors are untouched
    await local_mesh.wait_connected(timeout=5, nodes=nodes)


async def test_sigterm_says_goodbye(local_mesh):
    a, b = await local_mesh.start_nodes(["a", "b"])
    await local_mesh.wait_connected(timeout=20)
    local_mesh.kill(b, signal.SIGTERM)
    assert await b.proc.wait() == 0  # clean shutdown

    async def b_gone():
        return b.peer_id not in await local_mesh.connected_ids(a)

    # a bye on the link: far quicker than the silence timeout
    t0 = time.monotonic()
    await wait_for(b_gone, 5, "b to leave a's list")
    assert time.monotonic() - t0 < 5


async def test_static_peer_without_mdns(local_mesh):
    a = await local_mesh.start_node("a", ["--no-mdns", "--signaling", "127.0.0.1:0"])
    b = await local_mesh.start_node("b", ["--no-mdns", "--peer", a.signaling])
    await local_mesh.wait_connected(timeout=20)
    peers = await local_mesh.get(b, "/v1/peers")
    assert peers[0]["peer_id"] == a.peer_id and peers[0]["source"] == "static"
    rtt = await local_mesh.post(b, "/v1/bench/rtt", {"peer": a.peer_id, "count": 20})
    assert len(rtt["rtt_ms"]) == 20


async def test_nodes_started_side_by_side_share_the_first_ones_hardware_profile(
    tmp_path, monkeypatch
):
    """LocalMesh.start_nodes: with no profile measured yet in this process, the first node
    benchmarks the machine and the others start with its profile (none benchmarks over the
    others); a later mesh's nodes start with it too; share_hw_profile=False opts out."""
    from mesh.launch import localmesh
    from mesh.launch.localmesh import LocalMesh

    monkeypatch.setattr(localmesh, "_HW_SEED", {})  # as in a fresh process

    def measured(node) -> bool:  # hw.bench logs this line only when it benchmarks
        log = node.data_dir / "node.log"  # the whole log (stderr_tail keeps its last lines)
        return log.exists() and "benchmarks:" in log.read_text()

    async with LocalMesh(tmp_path / "one") as mesh:
        nodes = await mesh.start_nodes(["a", "b", "c"])
        await mesh.wait_connected(timeout=20)
        profiles = [(n.data_dir / "hw.json").read_bytes() for n in nodes]
        assert profiles[1] == profiles[0] and profiles[2] == profiles[0]
        assert [measured(n) for n in nodes] == [True, False, False]
        info = await mesh.get(nodes[2], "/v1/info")
        assert info["hw"]["gbps"] > 0  # the seeded profile is the one in use
    async with LocalMesh(tmp_path / "two") as mesh:
        (later,) = await mesh.start_nodes(["d"])
        await wait_for(lambda: (later.data_dir / "hw.json").exists(), 10, "d's profile")
        assert (later.data_dir / "hw.json").read_bytes() == profiles[0]
    async with LocalMesh(tmp_path / "three", share_hw_profile=False) as mesh:
        own = await mesh.start_node("e")
        await wait_for(lambda: measured(own), 20, "e to benchmark its machine")
