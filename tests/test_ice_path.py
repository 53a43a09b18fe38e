"""The ICE candidate pair each link runs over, in /v1/peers and ``edgemesh peers``, read from
the live ICE transport of either engine (real node processes on loopback: host candidates)."""

import pytest

from mesh.cli.status import format_peers
from mesh.launch.localmesh import LocalMeshError, wait_for
from tests.test_cli import run_cli

pytestmark = pytest.mark.network


async def test_peers_show_the_candidate_pair_in_use(local_mesh):
    a, b = await local_mesh.start_nodes(["a", "b"])
    await local_mesh.wait_connected(timeout=20, nodes=[a, b])
    # Loopback: both ends offer host candidates only and the data channel is UDP. wrtc
    # (libwebrtc) also checks from interfaces we do not offer, so on a machine with another
    # interface the pair in use may keep a peer-reflexive remote (the peer's unoffered
    # address, learnt from its checks) for good: in a clean-clone CI run it never left it
    # within 10 s. Both are a direct path; a relay or srflx pair here would be a bug.
    direct_pairs = [{"local": "host", "remote": r, "protocol": "udp"} for r in ("host", "prflx")]
    for me, other in ((a, b), (b, a)):
        seen: list[object] = []

        async def settled(me=me, seen=seen) -> bool:
            (peer,) = await local_mesh.get(me, "/v1/peers")
            seen.append(peer["ice"])
            return bool(peer["ice"] in direct_pairs)

        try:
            await wait_for(settled, 10, "a direct candidate pair")
        except LocalMeshError:
            raise AssertionError(f"pairs seen: {seen[-3:]}") from None
        (peer,) = await local_mesh.get(me, "/v1/peers")
        assert peer["peer_id"] == other.peer_id
        assert peer["ice"] in direct_pairs, peer["ice"]
    info = await local_mesh.get(a, "/v1/info")
    assert info["counters"]["turn_relay_failures"] == 0 and info["last_turn_error"] is None

    # `edgemesh peers` shows the same, as the table's PATH column
    code, out, err = await run_cli("peers", "--api", a.api)
    assert code == 0, err
    header, row = out.splitlines()
    assert "PATH" in header
    assert "host->host udp" in row or "host->prflx udp" in row, row


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


def test_format_peers_with_errors_says_why_a_peer_never_linked():
    peers = [
        {"peer_id": "ab" * 8, "state": "connected", "rtt_ms": 0.4, "last_error": None},
        {"peer_id": "cd" * 8, "state": "discovered", "last_error": "not a member (expired)"},
    ]
    header, linked, refused = format_peers(peers, errors=True).splitlines()
    assert header.split()[-2:] == ["LAST", "ERROR"]
    assert linked.rstrip().endswith("-")
    assert refused.endswith("not a member (expired)")
    assert "LAST ERROR" not in format_peers(peers)
