"""The edgemesh command as a user runs it."""

import asyncio
import json
import signal
import sys

import pytest

from mesh.launch.localmesh import wait_for

pytestmark = pytest.mark.network


async def run_cli(*args, env=None):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, out.decode(), err.decode()


async def test_peers_command(local_mesh):
    a, b = await local_mesh.start_nodes(["a", "b"])
    await local_mesh.wait_connected(timeout=20)
    code, out, err = await run_cli("peers", "--api", a.api, "--json")
    assert code == 0, err
    body = json.loads(out)
    assert [p["peer_id"] for p in body["peers"]] == [b.peer_id]
    code, out, _ = await run_cli("peers", "--api", a.api)
    assert code == 0 and b.peer_id[:16] in out and "connected" in out


async def test_peers_command_finds_local_node_through_data_dir(local_mesh, tmp_path):
    import os

    home = tmp_path / "home"
    a = await local_mesh.start_node("a", ["--data-dir", str(home)])
    env = dict(os.environ, EDGEMESH_HOME=str(home))
    code, out, err = await run_cli("peers", "--json", env=env)
    assert code == 0, err
    assert json.loads(out)["api"] == a.api


async def test_unreachable_api_is_one_line_error():
    code, out, err = await run_cli("peers", "--api", "http://127.0.0.1:9")
    assert code == 1 and out == ""
    assert err.startswith("edgemesh: cannot reach node API") and err.count("\n") == 1


@pytest.mark.slow
async def test_demo_json(tmp_path):
    """The main job as `make demo` runs it: Gemma 3 270M split over 3 local peers."""
    code, out, err = await run_cli(
        "demo",
        "--peers",
        "3",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "16",
        "--temperature",
        "0",
        "--json",
        "--dir",
        str(tmp_path),
    )
    assert code == 0, err[-3000:]
    body = json.loads(out)
    for key in (
        "prompt_tokens",
        "tokens",
        "text",
        "stages",
        "ttft_ms",
        "tokens_per_s",
        "single_peer_tokens_per_s",
        "hop_ms",
    ):
        assert key in body, key
    assert len(body["stages"]) >= 2  # the memory limits force a split
    assert len({s["peer_id"] for s in body["stages"]}) == len(body["stages"])
    assert all(set(s) == {"peer_id", "layers", "runtime"} for s in body["stages"])
    assert len(body["tokens"]) == 16 and body["tokens"] == body["single_peer_tokens"]
    assert body["agrees_with_llamacpp"] is True, body["llamacpp"]  # but at near-ties
    assert "Paris" in body["text"] or "France" in body["text"]  # coherent, not noise
    assert body["tokens_per_s"] > 0 and body["single_peer_tokens_per_s"] > 0


async def test_demo_on_any_gguf_splits_and_agrees_with_llama_cpp(tmp_path):
    """`edgemesh demo --model PATH` on a generated GGUF: the limits it sets for that file's
    size force a split, and its greedy tokens are llama.cpp's on the same file."""
    pytest.importorskip("llama_cpp")
    from runtimes.testmodels import write_test_model

    model = write_test_model(tmp_path / "tiny.gguf", "llama")
    code, out, err = await run_cli(
        "demo",
        "--model",
        str(model),
        "--peers",
        "2",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--no-baseline",
        "--json",
        "--dir",
        str(tmp_path / "mesh"),
    )
    assert code == 0, err[-3000:]
    body = json.loads(out)
    assert len(body["stages"]) >= 2  # the limits forced a split
    assert len({s["peer_id"] for s in body["stages"]}) == len(body["stages"])
    assert len(body["tokens"]) == 8
    assert body["agrees_with_llamacpp"] is True
    assert body["llamacpp"]["tokens"] == body["tokens"] and body["llamacpp"]["same"]
    assert "agrees: yes, 8/8 tokens" in err


async def test_link_drop_reconnects(local_mesh):
    """A frozen peer (a closed laptop lid) is dropped, then rejoins when it wakes."""
    a, b = await local_mesh.start_nodes(["a", "b"])
    await local_mesh.wait_connected(timeout=20)
    local_mesh.kill(b, signal.SIGSTOP)
    try:

        async def a_lost_b():
            return b.peer_id not in await local_mesh.connected_ids(a)

        await wait_for(a_lost_b, 20, "a to notice b is silent")
    finally:
        local_mesh.kill(b, signal.SIGCONT)
    await local_mesh.wait_connected(timeout=30)
