"""The HTTP API: loopback by default; beyond loopback only with a token; sizes capped; on
loopback too, a token for all that acts, and no foreign Host, Origin or body type."""

import asyncio
import json
import os
import signal
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
        for path in ("/v1/peers", "/v1/mesh", "/v1/info"):
            async with http.get(node.api + path) as resp:
                assert resp.status == 401, path
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


# --- A web page, a rebinding DNS name or another local program against the loopback API ---
# Each attack below ran against the node before the guard and succeeded (see docs/security.md).

EVIL_ORIGIN = "http://attacker.example"


def _port(node):
    return node.api.rsplit(":", 1)[1]


async def _status(http, method, url, **kw):
    async with http.request(method, url, **kw) as resp:
        await resp.read()
        return resp.status


async def test_cross_site_text_plain_post_is_refused(local_mesh):
    """A page's <form> or fetch(no-cors) sends text/plain with its Origin, no preflight."""
    node = await local_mesh.start_node("victim", ["--no-mdns"])
    simple = {"Content-Type": "text/plain", "Origin": EVIL_ORIGIN}
    async with aiohttp.ClientSession() as http:
        for path, body in [
            ("/v1/storage/gc", "{}"),
            ("/v1/objects?name=planted", "planted bytes"),
            ("/v1/jobs", '{"model": "x", "input": "y"}'),
            ("/v1/bench/bulk", '{"peer": "x"}'),
            ("/v1/models", '{"path": "/etc/hostname"}'),
            ("/v1/generate", '{"model": "x", "prompt": "hi"}'),
        ]:
            status = await _status(http, "POST", node.api + path, data=body, headers=simple)
            assert status == 403, (path, status)
        # with the token but a text/plain body, a JSON endpoint still refuses to parse it
        authed = {"Content-Type": "text/plain", **node.auth_headers()}
        status = await _status(http, "POST", node.api + "/v1/storage/gc", data="{}", headers=authed)
        assert status == 415
        # the node's own page (same origin) is not affected
        own = {"Origin": node.api, **node.auth_headers()}
        status = await _status(http, "POST", node.api + "/v1/storage/gc", json={}, headers=own)
        assert status == 200


async def test_rebinding_host_and_foreign_origin_are_refused(local_mesh):
    """DNS rebinding: attacker.example now resolves to 127.0.0.1, so the browser sends that Host."""
    node = await local_mesh.start_node("victim", ["--no-mdns"])
    port = _port(node)
    async with aiohttp.ClientSession() as http:
        for path in ("/v1/info", "/v1/peers", "/v1/mesh", "/", "/v1/storage"):
            rebound = {"Host": f"attacker.example:{port}", **node.auth_headers()}
            assert await _status(http, "GET", node.api + path, headers=rebound) == 403, path
        for path in ("/v1/info", "/v1/peers", "/v1/mesh"):
            foreign = {"Origin": EVIL_ORIGIN}
            assert await _status(http, "GET", node.api + path, headers=foreign) == 403, path
            assert await _status(http, "GET", node.api + path, headers={"Origin": "null"}) == 403
        # its own names are accepted: 127.0.0.1, localhost and [::1] on its port
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
            assert await _status(http, "GET", node.api + "/v1/info", headers={"Host": host}) == 200
        assert (
            await _status(http, "GET", node.api + "/v1/info", headers={"Host": "127.0.0.1:1"})
            == 403
        )


async def test_no_token_no_mutation_on_loopback(local_mesh):
    """Another program on this machine (or a page that got past the browser) has no token."""
    node = await local_mesh.start_node("victim", ["--no-mdns"])
    async with aiohttp.ClientSession() as http:
        for method, path in [
            ("POST", "/v1/storage/gc"),
            ("POST", "/v1/jobs"),
            ("POST", "/v1/bench/rtt"),
            ("POST", "/v1/models"),
            ("POST", "/v1/generate"),
            ("POST", "/v1/completions"),
            ("POST", "/v1/chat/completions"),
            ("POST", "/v1/objects/" + "0" * 64 + "/pin"),
            ("DELETE", "/v1/objects/" + "0" * 64 + "/pin"),
            ("GET", "/v1/objects/" + "0" * 64),  # fetches from peers, reads the store
            ("GET", "/v1/models"),
            ("GET", "/v1/storage"),
        ]:
            status = await _status(http, method, node.api + path, json={})
            assert status == 401, (method, path, status)
            wrong = {"Authorization": "Bearer " + "x" * 43}
            assert await _status(http, method, node.api + path, json={}, headers=wrong) == 401
        # status reads for the topology page stay open on loopback (after the Host check)
        for path in ("/v1/info", "/v1/peers", "/v1/mesh", "/", "/web/topology.js"):
            assert await _status(http, "GET", node.api + path) == 200, path
        status = await _status(http, "GET", node.api + "/v1/storage", headers=node.auth_headers())
        assert status == 200


async def test_token_file_is_private_and_fresh(local_mesh):
    node = await local_mesh.start_node("victim", ["--no-mdns"])
    path = node.data_dir / "api.token"
    assert path.stat().st_mode & 0o777 == 0o600
    token = path.read_text().strip()
    assert len(token) >= 32 and node.token == token
    local_mesh.kill(node, signal.SIGTERM)
    await asyncio.wait_for(node.proc.wait(), 30)
    assert not path.exists()  # a stopped node's token is not left behind


def test_token_file_is_created_private_whatever_the_umask(tmp_path):
    from mesh.api.auth import TOKEN_FILE, node_token

    old = os.umask(0)
    try:
        token = node_token(tmp_path, None, "127.0.0.1")
    finally:
        os.umask(old)
    assert (tmp_path / TOKEN_FILE).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / TOKEN_FILE).read_text() == token
    assert node_token(tmp_path, None, "127.0.0.1") != token  # a new one every start
    # an operator's token is never written to disk; a stale generated one is removed
    assert node_token(tmp_path, "operator-token", "127.0.0.1") == "operator-token"
    assert not (tmp_path / TOKEN_FILE).exists()


async def test_cli_sends_the_token(local_mesh, tmp_path):
    local_mesh.env = {"EDGEMESH_API_TOKEN": "s3cret-token"}
    node = await local_mesh.start_node("t", ["--no-mdns"])
    env = dict(os.environ, EDGEMESH_API_TOKEN="s3cret-token", EDGEMESH_HOME=str(tmp_path / "h"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh", "peers", "--api", node.api, "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert json.loads(out)["peers"] == []


async def test_cli_finds_the_generated_token_in_the_data_dir(local_mesh):
    node = await local_mesh.start_node("t", ["--no-mdns"])
    env = {k: v for k, v in os.environ.items() if k != "EDGEMESH_API_TOKEN"}
    env["EDGEMESH_HOME"] = str(node.data_dir)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh", "model", "list", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()


async def test_meshclient_reads_the_token_from_the_data_dir(local_mesh, monkeypatch):
    node = await local_mesh.start_node("t", ["--no-mdns"])
    monkeypatch.delenv("EDGEMESH_API_TOKEN", raising=False)
    async with MeshClient(node.api, data_dir=node.data_dir) as client:
        assert await client.models() == []
    monkeypatch.setenv("EDGEMESH_HOME", str(node.data_dir))
    async with MeshClient() as client:  # the local node: its address and token from the dir
        assert await client.models() == []
    # a token is never sent to an address that is not the data dir's node
    async with MeshClient("http://127.0.0.1:9", data_dir=node.data_dir) as client:
        assert client.token is None
