"""Two node processes that can only reach each other through an authenticated coturn relay
(relay-only ICE), and a wrong credential that gathers no relay candidate, said aloud."""

import json
import shutil

import pytest

from mesh.launch.localmesh import wait_for
from tests.turnserver import PASSWORD, USER, TurnServer

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(shutil.which("turnserver") is None, reason="coturn not installed"),
]


@pytest.fixture
async def turn(tmp_path):
    server = TurnServer(tmp_path / "turn")
    await server.start()
    yield server
    await server.stop()


def ice_file(path, url, username, credential):
    path.write_text(json.dumps([{"urls": url, "username": username, "credential": credential}]))
    path.chmod(0o600)
    return str(path)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_nodes_connect_through_the_relay_only(local_mesh, turn, tmp_path, transport):
    url = f"{turn.url}?transport={transport}"
    args = ["--ice-relay-only", "--ice-config"]
    a = await local_mesh.start_node(
        "a", args + [ice_file(tmp_path / "a.json", url, USER, PASSWORD)]
    )
    b = await local_mesh.start_node(
        "b", args + [ice_file(tmp_path / "b.json", url, USER, PASSWORD)]
    )
    await local_mesh.wait_connected(timeout=30, nodes=[a, b])
    for me in (a, b):
        (peer,) = await local_mesh.get(me, "/v1/peers")
        assert peer["ice"] == {
            "local": "relay", "remote": "relay", "protocol": "udp", "relay_protocol": transport
        }  # fmt: skip
    # RPCs run over it: node.echo round trips through coturn
    rtt = await local_mesh.post(a, "/v1/bench/rtt", {"peer": b.peer_id, "size": 1024, "count": 5})
    assert len(rtt["rtt_ms"]) == 5
    info = await local_mesh.get(a, "/v1/info")
    assert info["counters"]["turn_relay_failures"] == 0


async def test_a_wrong_credential_is_counted_and_logged_not_dropped(local_mesh, turn, tmp_path):
    good = ice_file(tmp_path / "good.json", turn.url, USER, PASSWORD)
    bad = ice_file(tmp_path / "bad.json", turn.url, USER, "wrong")
    a = await local_mesh.start_node("a", ["--ice-relay-only", "--ice-config", good])
    b = await local_mesh.start_node("b", ["--ice-relay-only", "--ice-config", bad])

    async def b_counted() -> bool:
        return (await local_mesh.get(b, "/v1/info"))["counters"]["turn_relay_failures"] > 0

    await wait_for(b_counted, 30, "b to count its failed TURN allocation")
    info = await local_mesh.get(b, "/v1/info")
    assert f"127.0.0.1:{turn.port}" in info["last_turn_error"]
    assert "401" in info["last_turn_error"]
    assert "wrong" not in info["last_turn_error"]
    await b.wait_logged("no relay candidate: TURN 127.0.0.1")
    assert await local_mesh.get(a, "/v1/peers") == []  # no relay, no other way: no link
