"""A member naming the wrong objects for model manifests (real node processes).

The liar runs tests/fixtures/manifest_liar_node.py: it stores an 8 MiB object (any large
object of the mesh, e.g. someone's shard) and opens a stage on its peer as the source of
the model's manifest. Either its ``compute.manifest`` names the big object as the manifest
(``object``), or it serves an honest-looking manifest whose shard claims 1 byte but names the
big object (``blob``). The victim must refuse before pulling it and keep nothing pinned.
"""

from __future__ import annotations

from typing import Any

import pytest

from mesh.launch.localmesh import LocalMesh, NodeProcess
from tests.fixtures.manifest_liar_node import BIG

pytestmark = pytest.mark.network

LIAR = "tests.fixtures.manifest_liar_node"


async def _attack(mesh: LocalMesh, mode: str) -> tuple[NodeProcess, NodeProcess]:
    mesh.env = {"MANIFEST_LIE": mode}
    victim = await mesh.start_node("victim", ["--no-mdns"])
    liar = await mesh.start_node("liar", ["--no-mdns", "--peer", victim.signaling], module=LIAR)
    await mesh.wait_connected(30, [victim, liar])
    await liar.wait_logged("manifest lie answered", timeout=60)
    return victim, liar


async def _pulled(mesh: LocalMesh, node: NodeProcess) -> int:
    accounting = await mesh.get(node, "/v1/accounting")
    return int(accounting["by_kind"].get("fetch", 0))


async def _big(mesh: LocalMesh, node: NodeProcess) -> list[dict[str, Any]]:
    return [o for o in await mesh.get(node, "/v1/objects") if o["size"] == BIG]


async def test_a_big_object_named_as_a_manifest_is_refused_before_its_pull(
    local_mesh: LocalMesh,
) -> None:
    victim, liar = await _attack(local_mesh, "object")
    # Before: the victim pulled all 8 MiB, pinned it (never collectable) and joined it in RAM.
    assert not any(o["pinned"] or o["complete"] for o in await _big(local_mesh, victim))
    assert await _pulled(local_mesh, victim) == 0
    assert "bytes as the manifest of" in liar.log_text(), liar.log_text()[-2000:]
    assert victim.proc.returncode is None


async def test_a_shard_claiming_one_byte_is_refused_before_its_pull(
    local_mesh: LocalMesh,
) -> None:
    victim, liar = await _attack(local_mesh, "blob")
    # Before: the disk limit was checked for 1 byte, then all 8 MiB were pulled.
    assert await _pulled(local_mesh, victim) < 64 << 10  # the model manifest only
    assert not any(o["pinned"] or o["complete"] for o in await _big(local_mesh, victim))
    log = liar.log_text()
    assert "the manifest says 1 bytes" in log and str(BIG) in log, log[-2000:]
