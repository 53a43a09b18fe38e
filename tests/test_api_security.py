"""The HTTP API: loopback by default; beyond loopback only with a token; sizes capped."""

import asyncio
import os
import sys

import aiohttp
import pytest

from mesh.client import MeshClient

pytestmark = pytest.mark.network


async def test_exposed_api_without_token_refuses_to_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "EDGEMESH_API_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh",
        "node",
        "--data-dir",
        str(tmp_path),
        "--no-mdns",
        "--api",
        "0.0.0.0:0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1 and out == b""
    assert b"EDGEMESH_API_TOKEN" in err


async def test_token_required_when_set(local_mesh):
    local_mesh.env = {"EDGEMESH_API_TOKEN": "s3cret-token"}
    node = await local_mesh.start_node("t", ["--no-mdns"])
    async with aiohttp.ClientSession() as http:
        async with http.get(node.api + "/v1/peers") as resp:
            assert resp.status == 401
        headers = {"Authorization": "Bearer wrong"}
        async with http.get(node.api + "/v1/peers", headers=headers) as resp:
            assert resp.status == 401
        headers = {"Authorization": "Bearer s3cret-token"}
        async with http.get(node.api + "/v1/peers", headers=headers) as resp:
            assert resp.status == 200
        # requests are size-limited before they are read
        big = {"model": "x", "prompt": "a" * (2 << 20)}
        async with http.post(node.api + "/v1/generate", json=big, headers=headers) as resp:
            assert resp.status == 413
    async with MeshClient(node.api, token="s3cret-token") as client:
        assert await client.peers() == []
