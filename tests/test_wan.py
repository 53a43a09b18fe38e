"""Joining across networks: MQTT rendezvous and the signed DHT, with real node processes."""

import asyncio
import os

import pytest

pytestmark = pytest.mark.network


async def test_mqtt_mesh_connects_and_other_mesh_sees_nothing(local_mesh, broker):
    mqtt = ["--no-mdns", "--mqtt", broker.url, "--mesh", "alpha"]
    nodes = await local_mesh.start_nodes([f"m{i}" for i in range(3)], mqtt)
    other = await local_mesh.start_node(
        "other", ["--no-mdns", "--mqtt", broker.url, "--mesh", "beta"]
    )
    await local_mesh.wait_connected(timeout=30, nodes=nodes)
    for n in nodes:
        peers = await local_mesh.get(n, "/v1/peers")
        assert all("mqtt" in p["sources"] for p in peers)
        assert other.peer_id not in {p["peer_id"] for p in peers}
    assert await local_mesh.get(other, "/v1/peers") == []


async def test_dht_bootstrap_mesh_connects_and_finds_peer_records(local_mesh):
    first = await local_mesh.start_node(
        "d0", ["--no-mdns", "--dht-port", "0", "--signaling", "127.0.0.1:0"]
    )
    assert "dht" in first.ready
    nodes = [first] + [
        await local_mesh.start_node(
            f"d{i}", ["--no-mdns", "--bootstrap", first.ready["dht"], "--signaling", "127.0.0.1:0"]
        )
        for i in (1, 2)
    ]
    await local_mesh.wait_connected(timeout=30, nodes=nodes)
    for n in nodes:
        for m in nodes:
            if m is n:
                continue
            rec = await local_mesh.get(n, f"/v1/dht/peer/{m.peer_id}")
            assert rec["peer_id"] == m.peer_id and rec["verified"] is True
            assert any(a.endswith(m.signaling.rsplit(":", 1)[1]) for a in rec["body"]["addrs"])


async def test_private_mesh_key_seals_broker_traffic(local_mesh, broker, tmp_path):
    import aiomqtt

    from mesh.errors import SignalingError
    from mesh.net.signaling import parse_envelope

    key = tmp_path / "mesh.key"
    key.write_text(os.urandom(32).hex())
    key.chmod(0o600)
    host, port = broker.url.removeprefix("mqtt://").split(":")
    seen = []
    async with aiomqtt.Client(host, int(port)) as spy:
        await spy.subscribe("edgemesh/v1/secret/#")
        args = ["--no-mdns", "--mqtt", broker.url, "--mesh", "secret", "--mesh-key", str(key)]
        a = await local_mesh.start_node("a", args)
        b = await local_mesh.start_node("b", args)
        outsider = await local_mesh.start_node(
            "outsider", ["--no-mdns", "--mqtt", broker.url, "--mesh", "secret"]
        )
        await local_mesh.wait_connected(timeout=30, nodes=[a, b])

        async def collected():
            while True:
                msg = await anext(spy.messages)
                seen.append(msg.payload)
                if len(seen) >= 2:
                    return True

        await asyncio.wait_for(collected(), 10)
    # the broker (and anyone subscribed) sees only ciphertext
    for payload in seen:
        if payload:
            with pytest.raises(SignalingError):
                parse_envelope(payload)
    assert await local_mesh.get(outsider, "/v1/peers") == []
    assert a.peer_id not in await local_mesh.connected_ids(outsider)
    info = await local_mesh.get(outsider, "/v1/info")
    assert info["counters"]["mqtt_rejected"] >= 2  # it saw sealed presences it cannot open


async def test_peer_record_carries_the_hardware_summary(local_mesh):
    first = await local_mesh.start_node(
        "h0", ["--no-mdns", "--dht-port", "0", "--signaling", "127.0.0.1:0"]
    )
    second = await local_mesh.start_node(
        "h1", ["--no-mdns", "--bootstrap", first.ready["dht"], "--signaling", "127.0.0.1:0"]
    )
    await local_mesh.wait_connected(timeout=30)

    async def hw_in_record():
        async with local_mesh._http.get(f"{second.api}/v1/dht/peer/{first.peer_id}") as resp:
            if resp.status != 200:
                return None
            return (await resp.json())["body"].get("hw")

    from mesh.launch.localmesh import wait_for

    hw = await wait_for(hw_in_record, 30, "the hardware summary in the peer record")
    assert hw["cores"] >= 1 and hw["ram_mb"] > 0
