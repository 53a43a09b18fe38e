"""Homes behind real NAT routers (the lab of mesh/launch/natlab.py, network namespaces with
iptables MASQUERADE): cone NATs link through STUN, symmetric ones only through the
authenticated TURN relay. Node processes, mosquitto and coturn all run inside the lab."""

from __future__ import annotations

import logging
import time

import pytest

from mesh.launch.localmesh import NodeProcess, wait_for
from mesh.launch.natlab import NatLab

pytestmark = [pytest.mark.network, pytest.mark.natlab]
log = logging.getLogger(__name__)


async def linked_after(lab: NatLab, a: NodeProcess, b: NodeProcess, timeout: float) -> float:
    """Seconds from now (both nodes ready) until each lists the other as connected."""
    t0 = time.monotonic()
    await lab.mesh.wait_connected(timeout=timeout, nodes=[a, b])
    return time.monotonic() - t0


async def path(lab: NatLab, node: NodeProcess) -> dict[str, str]:
    (peer,) = await lab.mesh.get(node, "/v1/peers")
    return dict(peer["ice"])


async def test_cone_nats_link_through_stun(natlab: NatLab) -> None:
    """Two homes behind port-preserving NATs that drop unsolicited inbound: STUN gives each
    its public mapping, and the hole punched by both sides' checks carries the link."""
    homes = [await natlab.add_home("cone") for _ in range(2)]
    args = ["--mesh", "cone", "--stun", natlab.stun_url]
    a = await natlab.start_node("a", homes[0].hosts[0], args)
    b = await natlab.start_node("b", homes[1].hosts[0], args)
    took = await linked_after(natlab, a, b, 60)
    for node in (a, b):
        ice = await path(natlab, node)
        # host candidates are private: at least one side's is its NAT's mapping
        assert "srflx" in (ice["local"], ice["remote"]) and "relay" not in ice.values(), ice
    rtt = await natlab.mesh.post(a, "/v1/bench/rtt", {"peer": b.peer_id, "size": 1024, "count": 3})
    assert len(rtt["rtt_ms"]) == 3
    log.warning("LAB cone NATs: linked %.2f s after both nodes were ready", took)
    # The offer no longer waits out a dead direct address before the broker (it took 11.5 s):
    # ICE, DTLS and the handshake take well under a second here.
    assert took < 3.0, f"linked {took:.1f} s after both nodes were ready"


async def test_symmetric_nats_link_through_turn_only(natlab: NatLab, tmp_path) -> None:
    """Behind --random-fully NATs the STUN mapping is useless to the peer: with STUN only
    the dial fails and no link forms; with the lab's TURN server and its credentials (from
    the ICE config file) the same homes link over the relay."""
    homes = [await natlab.add_home("symmetric") for _ in range(2)]
    stun = ["--mesh", "sym-stun", "--stun", natlab.stun_url]
    a = await natlab.start_node("a", homes[0].hosts[0], stun)
    b = await natlab.start_node("b", homes[1].hosts[0], stun)

    async def a_dial_failed() -> bool:  # whichever dials (the lower id), it fails
        infos = [await natlab.mesh.get(n, "/v1/info") for n in (a, b)]
        return sum(int(i["counters"]["dial_failures"]) for i in infos) >= 1

    await wait_for(a_dial_failed, 90, "the dial between a and b to fail")
    assert b.peer_id not in await natlab.mesh.connected_ids(a)
    assert a.peer_id not in await natlab.mesh.connected_ids(b)
    for node in (a, b):
        await node_stop(natlab, node)

    def ice(name: str) -> list[str]:
        return ["--mesh", "sym-turn", "--ice-config", str(natlab.ice_file(tmp_path / name))]

    a = await natlab.start_node("a2", homes[0].hosts[0], ice("a.json"))
    b = await natlab.start_node("b2", homes[1].hosts[0], ice("b.json"))
    took = await linked_after(natlab, a, b, 60)
    for node in (a, b):
        assert "relay" in (await path(natlab, node)).values()
    rtt = await natlab.mesh.post(a, "/v1/bench/rtt", {"peer": b.peer_id, "size": 1024, "count": 3})
    assert len(rtt["rtt_ms"]) == 3
    log.warning("LAB symmetric NATs: linked over TURN %.2f s after both nodes were ready", took)
    assert took < 3.0, f"linked {took:.1f} s after both nodes were ready"  # it was 11.8 s


async def node_stop(lab: NatLab, node: NodeProcess) -> None:
    import signal

    lab.mesh.kill(node, signal.SIGTERM)
    await node.proc.wait()
