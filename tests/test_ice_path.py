"""The ICE candidate pair each link runs over, in /v1/peers and ``edgemesh peers``, read from
the live ICE transport of either engine (real node processes on loopback: host candidates)."""

import pytest

from mesh.cli.status import format_peers
from mesh.launch.localmesh import wait_for
from tests.test_cli import run_cli

pytestmark = pytest.mark.network


async def test_peers_show_the_candidate_pair_in_use(local_mesh):
    a = await local_mesh.start_node("a")
    b = await local_mesh.start_node("b")
    await local_mesh.wait_connected(timeout=20, nodes=[a, b])
    host_pair = {"local": "host", "remote": "host", "protocol": "udp"}
    for me, other in ((a, b), (b, a)):

        async def settled(me=me) -> bool:
            (peer,) = await local_mesh.get(me, "/v1/peers")
            return bool(peer["ice"] == host_pair)

        # wrtc (libwebrtc) checks from every local interface, so a pair with a peer-reflexive
        # remote (the peer's unoffered address) may be in use for a moment before ICE
        # settles on the offered host pair; aiortc reads host->host at once.
        await wait_for(settled, 10, "the host candidate pair")
        (peer,) = await local_mesh.get(me, "/v1/peers")
        assert peer["peer_id"] == other.peer_id
        # loopback: both ends gathered host candidates only; the data channel is UDP
        assert peer["ice"] == host_pair
    info = await local_mesh.get(a, "/v1/info")
    assert info["counters"]["turn_relay_failures"] == 0 and info["last_turn_error"] is None

    # `edgemesh peers` shows the same, as the table's PATH column
    code, out, err = await run_cli("peers", "--api", a.api)
    assert code == 0, err
    header, row = out.splitlines()
    assert "PATH" in header and "host->host udp" in row


def test_format_peers_shows_relay_paths():
    peers = [
        {
            "peer_id": "ab" * 8,
            "state": "connected",
            "rtt_ms": 1.5,
            "source": "mdns",
            "ice": {
                "local": "relay",
                "remote": "srflx",
                "protocol": "udp",
                "relay_protocol": "tcp",
            },
        },
        {"peer_id": "cd" * 8, "state": "reconnecting", "rtt_ms": None, "ice": None},
    ]
    lines = format_peers(peers).splitlines()
    assert "relay->srflx udp (turn tcp)" in lines[1]
    assert lines[2].split()[2:4] == ["-", "-"]
