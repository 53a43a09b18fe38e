"""The NAT lab's own parts, without nodes: its routers translate (a host behind one is seen
at its router's public address), delay what they forward and drop the share they are told
to, and the wan forwards nothing to private addresses. Probed with STUN binding requests to
the lab's coturn, from sockets opened inside a home's host namespace."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import pytest
from aioice import stun

from mesh.launch.natlab import WAN_IP, Host, NatLab, in_netns, ns_connect
from mesh.launch.stunprobe import stun_bindings

pytestmark = [pytest.mark.network, pytest.mark.natlab]


async def test_routers_translate_delay_and_drop(natlab: NatLab) -> None:
    home = await natlab.add_home("cone")
    (rtt, mapped), *_ = await stun_bindings(home.hosts[0], 3)
    assert mapped.startswith(home.public_ip + ":")  # seen at the router's public address
    assert rtt < 0.05
    await natlab.set_link(home, delay_ms=30, loss=0)
    rtts = [r for r, _ in await stun_bindings(home.hosts[0], 5)]
    assert len(rtts) == 5 and min(rtts) >= 0.06  # 30 ms each way through the router
    await natlab.set_link(home, delay_ms=0, loss=0.3)
    answered = len(await stun_bindings(home.hosts[0], 200, timeout=0.3))
    # each way 30 % lost: 49 % answered; 200 draws put it in 70..130 with p > 0.999
    assert 70 <= answered <= 130, answered


async def test_the_delayer_runs_ahead_of_the_nodes(natlab: NatLab) -> None:
    """A router's delayer shares this machine's cores with the lab's nodes; at an ordinary
    priority a node computing on every core held each packet 1.5-5 ms past its time (STUN
    probes through a 10 ms router, three processes busy on the 2 cores: median 23.9 ms, p90
    31.9 ms for 20 ms nominal; 20.7 / 20.75 ms in real time). Every thread of it, the
    reader and the verdict thread included, runs SCHED_FIFO."""
    probe = "import os; os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))"
    cmd = [sys.executable, "-c", probe]
    tried = await asyncio.to_thread(subprocess.run, cmd, check=False, capture_output=True)
    if tried.returncode != 0:
        pytest.skip("this kernel or container refuses SCHED_FIFO (no CAP_SYS_NICE)")
    home = await natlab.add_home("cone", delay_ms=5)
    assert home.delayer is not None
    tasks = os.listdir(f"/proc/{home.delayer.pid}/task")
    assert len(tasks) >= 3  # the event loop's, the reader's and the verdict thread
    assert {os.sched_getscheduler(int(t)) for t in tasks} == {os.SCHED_FIFO}


async def mapped_port(host: Host) -> tuple[int, int]:
    """(source port, the port the lab's STUN server saw) of one binding from ``host``."""
    sock = in_netns(host.ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    sock.bind(("0.0.0.0", 0))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        req = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        await loop.sock_sendto(sock, bytes(req), (WAN_IP, 3478))
        async with asyncio.timeout(2):
            reply = stun.parse_message(await loop.sock_recv(sock, 2048))
        return sock.getsockname()[1], int(reply.attributes["XOR-MAPPED-ADDRESS"][1])
    finally:
        sock.close()


async def test_cone_nat_keeps_ports_symmetric_nat_randomizes_them(natlab: NatLab) -> None:
    cone, sym = await natlab.add_home("cone"), await natlab.add_home("symmetric")
    source, seen = await mapped_port(cone.hosts[0])
    assert source == seen  # port-preserving MASQUERADE
    # --random-fully: a random port per mapping (the same one by chance: p ~ 1/28000)
    source, seen = await mapped_port(sym.hosts[0])
    assert source != seen


async def test_the_wan_drops_private_destinations(natlab: NatLab) -> None:
    a, b = await natlab.add_home("cone"), await natlab.add_home("cone")
    server = in_netns(b.hosts[0].ns, lambda: socket.socket())
    server.bind(("0.0.0.0", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        with pytest.raises(TimeoutError):  # silently dropped, as on the internet: no RST
            await asyncio.wait_for(ns_connect(a.hosts[0].ns, b.hosts[0].ip, port), 2)
        with pytest.raises((TimeoutError, OSError)):  # and the router refuses unsolicited
            await asyncio.wait_for(ns_connect(a.hosts[0].ns, b.public_ip, port), 2)
    finally:
        server.close()


async def test_the_lab_is_torn_down_after_a_failure(tmp_path) -> None:
    """A test failing inside the lab leaves no namespace and no process of it behind."""
    from mesh.launch.natlab import lab_unavailable

    if (reason := lab_unavailable()) is not None:
        pytest.skip(reason)
    with pytest.raises(RuntimeError, match="failed here"):
        async with NatLab(tmp_path / "lab") as lab:
            home = await lab.add_home("cone", hosts=2, delay_ms=5, loss=0.01)
            tag = lab.tag
            assert home.delayer is not None
            delayer = home.delayer.pid
            raise RuntimeError("the test failed here")
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "list", stdout=asyncio.subprocess.PIPE
    )
    names, _ = await proc.communicate()
    assert tag.encode() not in names
    with pytest.raises(ProcessLookupError):
        os.kill(delayer, 0)
