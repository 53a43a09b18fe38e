"""The CLI's habits (issue 17): finding the node by its data dir, one node per data dir, a
stable API port, a clean Ctrl-C at any moment of start-up, and the client commands as a user
types them (positional prompt, id prefixes, ps, model rm, --version, get -o -)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.launch.localmesh import LocalMesh, wait_for
from mesh.local import BadAddress, api_url, parse_api_address
from runtimes.testmodels import write_test_model

pytestmark = pytest.mark.network


async def run_cli(
    *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh",
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ, **(env or {})),
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_model(tmp_path_factory.mktemp("habits") / "llama.gguf", "llama")


def test_api_address_forms() -> None:
    """HOST:PORT, :PORT, PORT, [V6]:PORT and http:// URLs name the same thing everywhere."""
    assert parse_api_address("127.0.0.1:8477") == ("127.0.0.1", 8477)
    assert parse_api_address("http://127.0.0.1:8477/") == ("127.0.0.1", 8477)
    assert parse_api_address(":9000") == ("127.0.0.1", 9000)
    assert parse_api_address("9000") == ("127.0.0.1", 9000)
    assert parse_api_address("[::1]:9000") == ("::1", 9000)
    assert api_url("localhost:9000") == "http://localhost:9000"
    assert api_url("http://[::1]:9000") == "http://[::1]:9000"
    for bad in ("nohost", "1.2.3.4:99999", "ftp://x:1", "http://x:1/v1"):
        with pytest.raises(BadAddress):
            parse_api_address(bad)


async def test_client_commands_find_the_node_by_data_dir(tmp_path: Path) -> None:
    """--data-dir (and EDGEMESH_HOME) lead peers, ps and model list to the node and its token;
    --api takes HOST:PORT as node --api does."""
    async with LocalMesh(tmp_path / "mesh", mdns_interface=None) as mesh:
        node = await mesh.start_node("a", ["--no-mdns"])
        home = str(node.data_dir)
        code, out, err = await run_cli("peers", "--data-dir", home, "--json")
        assert code == 0, err
        assert json.loads(out)["api"] == node.api
        code, out, err = await run_cli("ps", "--data-dir", home, "--json")
        assert code == 0, err
        ps = json.loads(out)
        assert ps["peer_id"] == node.peer_id and ps["shards"] == [] and "memory_limit" in ps
        code, out, err = await run_cli("model", "list", "--data-dir", home, "--json")
        assert code == 0, err and json.loads(out)["data"] == []
        hostport = node.api.removeprefix("http://")
        code, out, err = await run_cli("ps", "--api", hostport, env={"EDGEMESH_HOME": home})
        assert code == 0, err
        assert out.startswith(f"node {node.peer_id[:16]}") and "no shards loaded" in out
    code, out, err = await run_cli("ps", "--data-dir", str(tmp_path / "nobody"))
    assert code == 1 and "no running node found" in err and "--data-dir" in err


async def test_second_node_on_the_same_data_dir_exits_and_touches_nothing(
    tmp_path: Path,
) -> None:
    async with LocalMesh(tmp_path / "mesh", mdns_interface=None) as mesh:
        first = await mesh.start_node("a", ["--no-mdns"])
        files = {n: (first.data_dir / n).read_bytes() for n in ("node.json", "api.token")}
        t0 = time.monotonic()
        code, out, err = await run_cli(
            "node", "--data-dir", str(first.data_dir), "--no-mdns", "--api", "127.0.0.1:0"
        )
        assert code == 2, err
        assert time.monotonic() - t0 < 30
        assert f"another node (pid {first.ready['pid']})" in err and "Traceback" not in err
        assert out == ""  # never ready
        assert {n: (first.data_dir / n).read_bytes() for n in files} == files
        assert (await mesh.get(first, "/v1/info"))["peer_id"] == first.peer_id
        info = await mesh.get(first, "/v1/info")  # the first's token still opens its API
        assert info["api"] == first.api


async def test_default_api_port_falls_back_when_taken(tmp_path: Path) -> None:
    """Without --api the node takes the default port; taken, it says so and binds another."""
    from mesh.local import DEFAULT_API_PORT

    blocker = socket.socket()
    with contextlib.suppress(OSError):  # already taken by someone else: just as good
        blocker.bind(("127.0.0.1", DEFAULT_API_PORT))
        blocker.listen()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mesh",
            "node",
            "--data-dir",
            str(tmp_path / "b"),
            "--no-mdns",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        try:
            ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
            assert ready["api"] != f"http://127.0.0.1:{DEFAULT_API_PORT}"
        finally:
            proc.send_signal(signal.SIGINT)
            _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert f"API port 127.0.0.1:{DEFAULT_API_PORT} is taken" in err.decode()
        assert proc.returncode == 0
    finally:
        blocker.close()


def _cli_loaded(pid: int) -> bool:
    """The child runs edgemesh's code: mesh.local (imported by mesh.cli.main) maps fcntl,
    which neither the interpreter nor ``site`` loads. Before that point a Ctrl-C lands in
    Python's own start-up (see below)."""
    return "/fcntl." in Path(f"/proc/{pid}/maps").read_text()


async def _interrupted_start(data_dir: Path, when: str) -> tuple[int, str, float]:
    """Start a node with mDNS on loopback, SIGINT it at ``when``; (code, stderr, seconds from
    the signal to the exit)."""
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "mesh", "node", "--data-dir", str(data_dir)],
        *["--mdns-interface", "127.0.0.1", "--mesh", f"ctrlc-{os.urandom(4).hex()}"],
        *["--api", "127.0.0.1:0"],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    point, _, later = when.partition(" + ")
    err = b""
    if point == "cli loaded":
        await wait_for(lambda: _cli_loaded(proc.pid), 60, "the CLI to load", interval=0.005)
    elif point == "first log line":
        err = await asyncio.wait_for(proc.stderr.readline(), 60)
    elif point == "ready":
        await asyncio.wait_for(proc.stdout.readline(), 60)
    if later:  # a moment after the point: imports, Node(), signaling, mDNS, the API...
        await asyncio.sleep(float(later.removesuffix(" s")))
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, rest = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, (err + rest).decode(errors="replace"), time.monotonic() - sent


@pytest.fixture
def sigint_at_default() -> Iterator[None]:
    """The node starts as from a terminal, where SIGINT has its default action. A test run
    started in the background (``make test &``, nohup) ignores SIGINT, and an ignored signal
    stays ignored across exec: the node would get it ignored until it installs its own
    handler at start-up, so a Ctrl-C before then would be lost, not tested. A handler here
    is reset to the default action by exec."""
    if signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


# "right away" lands before the interpreter installs its SIGINT handler (the default action:
# a quiet death by the signal). Between that and "cli loaded" (~50 ms) a Ctrl-C is Python's
# own: it interrupts ``site`` (the venv's .pth files) with a traceback no project code can
# catch. From "cli loaded" on, every moment is ours: imports, building the node, start-up.
@pytest.mark.parametrize(
    "when",
    [
        "right away",
        "cli loaded",
        "cli loaded + 0.5 s",
        "cli loaded + 1.0 s",
        "first log line",
        "first log line + 0.2 s",
        "ready",
    ],
)
async def test_ctrl_c_at_any_moment_of_start_up_is_clean(
    tmp_path: Path, when: str, sigint_at_default: None
) -> None:
    code, err, seconds = await _interrupted_start(tmp_path / "n", when)
    assert "Traceback" not in err, err[-3000:]
    assert code in (0, 130, -signal.SIGINT), (code, err[-2000:])
    if when == "ready":
        assert code == 0  # a ready node stops as it always does
    assert seconds < 15, seconds
    assert not (tmp_path / "n" / "node.json").exists()  # a stopped node leaves no address


async def test_version_and_runtime_validation(tmp_path: Path) -> None:
    code, out, err = await run_cli("--version")
    assert code == 0 and out.startswith("edgemesh ") and out.split()[1][0].isdigit()
    code, out, err = await run_cli(
        "node", "--data-dir", str(tmp_path), "--no-mdns", "--runtime", "bogus"
    )
    assert code == 1 and out == ""
    assert "--runtime bogus: unknown runtime" in err and "available on this machine:" in err
    assert "fake" in err.split("available on this machine:")[1]  # the list, never empty
    assert not (tmp_path / "node.json").exists()


async def test_generate_ps_model_rm_through_the_data_dir(tmp_path: Path, tiny: Path) -> None:
    """generate PROMPT (positional, or stdin) with the id prefix model list prints; ps shows
    the loaded shard; model rm forgets the model and deletes what no loaded shard holds."""
    async with LocalMesh(tmp_path / "mesh", mdns_interface=None) as mesh:
        node = await mesh.start_node("a", ["--no-mdns"])
        home = ["--data-dir", str(node.data_dir)]
        added = await mesh.post(node, "/v1/models", {"path": str(tiny), "name": "tiny"})
        code, listing, err = await run_cli("model", "list", *home)
        assert code == 0, err
        prefix = added["model_id"][:16]
        assert prefix in listing
        gen = ["--max-tokens", "4", "--json"]
        code, out, err = await run_cli("generate", "hello", "--model", prefix, *gen, *home)
        assert code == 0, err
        first = json.loads(out)
        assert len(first["tokens"]) == 4
        code, out, err = await run_cli("generate", "--model", "tiny", *gen, *home, stdin=b"hello")
        assert code == 0, err
        assert json.loads(out)["tokens"] == first["tokens"]  # stdin: the same prompt
        code, out, err = await run_cli("ps", *home, "--json")
        assert code == 0, err
        shards = json.loads(out)["shards"]
        assert shards and all(s["model_id"] == added["model_id"] for s in shards)
        code, out, err = await run_cli("ps", *home)
        assert prefix in out and "RUNTIME" in out
        code, out, err = await run_cli("model", "rm", "--api", node.api, "nonesuch")
        assert code == 1 and "HTTP 401" in err  # no token for a bare --api: refused
        code, out, err = await run_cli("model", "rm", prefix, *home, "--json")
        assert code == 0, err
        removed = json.loads(out)
        assert removed["model_id"] == added["model_id"] and removed["names"] == ["tiny"]
        assert removed["unpinned"]  # its manifest and shards: kept by nothing now
        code, out, err = await run_cli("model", "list", *home, "--json")
        assert code == 0 and json.loads(out)["data"] == [], out
        code, out, err = await run_cli("model", "rm", "tiny", *home)
        assert code == 1 and "HTTP 404" in err and "unknown model" in err


def test_model_prefixes_resolve_and_an_ambiguous_one_is_a_clear_error() -> None:
    from mesh.cli.common import CliError
    from mesh.cli.generate import resolve_model

    models = [
        {"id": "x", "name": "x", "model_id": "ab" + "0" * 62},
        {"id": "y", "name": "y", "model_id": "ac" + "0" * 62},
    ]
    assert resolve_model(models, "ab") == models[0]["model_id"]  # a unique prefix: the id
    assert resolve_model(models, "y") == "y"  # a name: as it is
    assert resolve_model(models, "zz") == "zz"  # unknown here: the node will say so
    with pytest.raises(CliError, match="ambiguous: ab00000000000000, ac00000000000000"):
        resolve_model(models, "a")


async def test_get_to_stdout_and_put_reports_replicas(tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(100_000))
    async with LocalMesh(tmp_path / "mesh", mdns_interface=None) as mesh:
        node = await mesh.start_node("a", ["--no-mdns"])
        home = ["--data-dir", str(node.data_dir)]
        code, out, err = await run_cli(
            "put", str(data), "--replicas", "3", "--replica-wait", "1", "--json", *home
        )
        assert code == 0, err
        doc = json.loads(out)
        assert doc["placed"] == 1 and "only 1 of 3 replicas placed" in err
        proc = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "mesh", "get", doc["id"], "-o", "-", *home],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=tmp_path,
        )
        got, err_b = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err_b
        assert got == data.read_bytes()
        assert not (tmp_path / "-").exists()


async def test_job_help_documents_the_input_formats() -> None:
    code, out, _ = await run_cli("job", "run", "--help")
    assert code == 0 and '{"x": [float, ...]}' in out and "(batch, d)" in out
