"""Every RPC a node calls is one a node serves, under its service's namespace.

RPC names are ``<service>.<method>`` (mesh.net.rpc.handlers_of); a call site that names a
method no service serves fails only at run time on a peer ("NotFound"), so this test reads
every literal method name passed to ``call``/``notify`` in mesh/ and checks it against the
handler table of a real node.
"""

from __future__ import annotations

import re
from pathlib import Path

from mesh.node import Node, NodeConfig

ROOT = Path(__file__).resolve().parent.parent
# .call(<peer>, "name" / .notify(<peer>, "name" (the peer may be an attribute or a call), and
# a link's own .call("name" (the link already knows its peer)
CALL = re.compile(
    r"\.(?:call|notify)\(\s*(?:(?:[^,()\"']|\([^()]*\))+,\s*)?\"([a-z_]+(?:\.[a-z_]+)?)\""
)


def _called() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for path in sorted((ROOT / "mesh").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for m in CALL.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            out.setdefault(m.group(1), []).append(f"{path.relative_to(ROOT)}:{line}")
    return out


def test_every_called_rpc_is_served_under_its_namespace(tmp_path: Path) -> None:
    node = Node(NodeConfig(data_dir=tmp_path / "n", profile_hardware=False))
    served = set(node.handlers)
    assert all("." in name for name in served), sorted(n for n in served if "." not in n)
    called = _called()
    assert len(called) >= 15  # the scan found the call sites
    missing = {name: where for name, where in called.items() if name not in served}
    assert missing == {}


def test_the_scan_sees_a_wrong_name() -> None:
    """The scan would pass vacuously if it matched nothing."""
    sample = 'await self.node.call(peer, "storage.chunk_raed", {"sha": sha})'
    assert [m.group(1) for m in CALL.finditer(sample)] == ["storage.chunk_raed"]


def test_info_is_the_merge_of_the_services_status(tmp_path: Path) -> None:
    node = Node(NodeConfig(data_dir=tmp_path / "n", profile_hardware=False))
    info = node.info()
    names = [svc.name for svc in node.services]
    assert len(names) == len(set(names))  # one namespace per service
    for svc in node.services:
        assert info[svc.name] == svc.status()
    assert info["compute"]["sessions"] == 0 and "memory_limit" in info["compute"]
