"""The example scripts and ``edgemesh bench``, run as a user runs them (fast: tiny models)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.client import MeshClient
from mesh.launch.localmesh import LocalMesh
from runtimes.testmodels import write_test_model

pytestmark = pytest.mark.network
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_model(tmp_path_factory.mktemp("examples") / "llama.gguf", "llama")


async def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=ROOT,
        env=dict(os.environ, **(env or {})),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_embed_client_lists_models_and_streams_the_greedy_completion(
    tmp_path: Path, tiny: Path
) -> None:
    async with LocalMesh(tmp_path / "mesh", mdns_interface=None) as mesh:
        node = await mesh.start_node("app", ["--no-mdns"])
        await mesh.post(node, "/v1/models", {"path": str(tiny), "name": "tiny"})
        async with MeshClient(node.api, token=node.token) as client:
            expected = "".join([t async for t in client.generate("tiny", "hello", max_tokens=6)])
        code, out, err = await run(
            str(EXAMPLES / "embed_client.py"),
            "--api",
            node.api,
            "--model",
            "tiny",
            "--prompt",
            "hello",
            "--max-tokens",
            "6",
            env={"EDGEMESH_HOME": str(node.data_dir)},  # where the example finds the token
        )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "models: tiny"
    assert ("hello" + expected) in out  # the prompt, then the same greedy continuation
    assert "[tiny: 6 tokens over 1 stage(s), TTFT" in out


async def test_bench_latency_quick_writes_json_table_and_plot(tmp_path: Path, tiny: Path) -> None:
    docs = tmp_path / "docs"
    code, out, err = await run(
        str(EXAMPLES / "bench_latency.py"),
        "--quick",
        "--peers",
        "1,2",
        "--model",
        str(tiny),
        "--json",
        env={"EDGEMESH_BENCH_DOCS": str(docs)},
    )
    assert code == 0, err[-2000:]
    result = json.loads(out)
    assert {"machine", "model", "runtime", "max_tokens", "baseline", "runs"} <= set(result)
    runs = result["runs"]
    assert [r["peers"] for r in runs] == [1, 2]
    assert [r["n_stages"] for r in runs] == [1, 2]
    for r in runs:
        assert {
            "ttft_ms",
            "tokens_per_s",
            "hop_ms",
            "stages",
            "step_ms",
            "compute_ms",
            "tokens_per_s_ratio",
            "ttft_ratio",
            "same_tokens_as_1_peer",
        } <= set(r)
        assert r["tokens_per_s"] > 0 and r["ttft_ms"] > 0 and len(r["tokens"]) == 16
        assert all(s["ms"] > 0 for s in r["stages"])
    assert runs[0]["tokens_per_s_ratio"] == 1.0
    # demo-style limits are sized from the file's own stages: even a tiny model splits by them
    assert runs[1]["split_by"] == "memory"
    assert runs[1]["same_tokens_as_1_peer"]  # a split must not change greedy output
    assert runs[1]["hop_ms"] > 0 and runs[1]["activation_bytes_per_token"] > 0
    assert json.loads((docs / "bench" / "latency.json").read_text())["runs"] == runs
    assert (docs / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (docs / "benchmarks.md").read_text()
    assert "## Latency vs peers (examples/bench_latency.py)" in md
    assert "Where the per-hop time goes" in md and "| 2 | 2 |" in md


async def test_bench_wan_in_the_lab_puts_each_figure_beside_its_floor(
    tmp_path: Path, tiny: Path
) -> None:
    from mesh.launch.natlab import lab_unavailable

    why = lab_unavailable()
    if why:
        pytest.skip(f"the NAT lab needs root and its tools: {why}")
    docs = tmp_path / "docs"
    args = ["--stages", "1,2", "--delays", "0,4", "--loss-delay", "4", "--max-tokens", "6"]
    code, out, err = await run(
        str(EXAMPLES / "bench_wan.py"),
        *args,
        "--repeats",
        "1",
        "--model",
        str(tiny),
        env={"EDGEMESH_BENCH_DOCS": str(docs)},
        timeout=240,
    )
    assert code == 0, err[-2000:]
    rows = json.loads((docs / "bench" / "wan.json").read_text())["rows"]
    got = [(r["stages"], r["delay_ms"], r["loss"]) for r in rows]
    assert got == [(n, d, x) for n in (1, 2) for d, x in ((0, 0), (4, 0), (4, 0.01))]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["same_tokens"], r
        assert r["crossings"] == (0 if r["stages"] == 1 else 2), r
        # the floor counts the delay once per crossing; a 2-stage token pays it twice (each
        # figure is rounded to 0.01 ms on its own, so the sum may differ by one in the last place)
        want = r["compute_ms"] + r["crossings"] * r["delay_ms"]
        assert r["floor_ms"] == pytest.approx(want, abs=0.0101)
    delayed = next(r for r in rows if r["stages"] == 2 and r["delay_ms"] == 4 and not r["loss"])
    assert delayed["step_ms"] >= 2 * 4  # the lab's delay is real: two crossings of 4 ms
    md = (docs / "benchmarks.md").read_text()
    assert "## WAN (examples/bench_wan.py)" in md and "over the measured ring" in md
    assert "% loss" in md and tiny.name in md
    assert all(r["path_ms"] >= r["delay_ms"] * r["crossings"] for r in rows), rows
    echoed = [r for r in rows if r["stages"] == 2]  # message round trips by size, each delay
    assert all(set(r["echo_ms"]) == {"2560", "21000", "84000", "330000"} for r in echoed)
    assert all(r["echo_ms"]["2560"] >= 2 * r["delay_ms"] for r in echoed), echoed
    assert "by message size" in md


async def test_bench_stage_idle_times_each_stage_back_to_back_and_after_its_wait(
    tiny: Path,
) -> None:
    code, out, err = await run(
        str(EXAMPLES / "bench_stage_idle.py"), "--model", str(tiny), "--bounds", "0,1,4",
        "--steps", "4", "--json", timeout=120,
    )  # fmt: skip
    assert code == 0, err[-2000:]
    got = json.loads(out)
    assert [s["units"] for s in got["stages"]] == [[0, 1], [1, 4]]
    alone = [s["back_to_back_ms"] for s in got["stages"]]
    assert all(ms > 0 for ms in alone)
    assert got["sum_back_to_back_ms"] == pytest.approx(sum(alone), abs=0.002)  # each rounded
    # each stage waits what the others took back to back: the pipeline's wait
    assert [s["wait_ms"] for s in got["stages"]] == pytest.approx(alone[::-1], abs=0.002)
    code, _, err = await run(str(EXAMPLES / "bench_stage_idle.py"), "--bounds", "3,1")
    assert code == 2 and "increasing units" in err


async def test_bench_decode_parts_times_blocks_and_head_against_bandwidth_and_llama_cpp(
    tiny: Path,
) -> None:
    code, out, err = await run(
        str(EXAMPLES / "bench_decode_parts.py"), "--model", str(tiny), "--steps", "4",
        "--bandwidth-mib", "16", "--json", "--no-docs", timeout=180,
    )  # fmt: skip
    assert code == 0, err[-2000:]
    got = json.loads(out)
    n = 4  # the tiny model's units: embedding, two blocks, head
    assert [p["units"] for p in got["parts"]] == [[1, n - 1], [n - 1, n]]
    assert all(got["bandwidth_gb_s"][k] > 0 for k in ("1", "2"))
    for p in got["parts"]:
        assert p["ms"] > 0 and p["mb"] > 0
        assert p["gb_s"] == pytest.approx(p["mb"] / p["ms"], rel=0.05)  # MB per ms is GB/s
    assert got["onnx_vs_llamacpp"] == pytest.approx(got["llamacpp_ms"] / got["onnx_ms"], rel=0.01)
    code, _, err = await run(str(EXAMPLES / "bench_decode_parts.py"), "--steps", "1")
    assert code == 2 and "--steps at least 2" in err


async def test_natlab_delay_precision_probes_the_router_idle_and_loaded() -> None:
    from mesh.launch.natlab import lab_unavailable

    why = lab_unavailable()
    if why:
        pytest.skip(f"the NAT lab needs root and its tools: {why}")
    code, out, err = await run(
        str(EXAMPLES / "natlab.py"), "--homes", "cone", "--hosts", "1", "--delay-ms", "3",
        "--delay-precision", "20", "--json", timeout=120,
    )  # fmt: skip
    assert code == 0, err[-2000:]
    got = json.loads(out)
    assert got["nominal_ms"] == 6 and got["busy_processes"] == 3 * (os.cpu_count() or 1)
    for half in ("idle", "loaded"):
        # every probe answered, none faster than the two 3 ms passes through the router
        assert got[half]["answered"] == 20 and got[half]["median_ms"] >= 6, got
        assert got[half]["median_ms"] <= got[half]["p90_ms"] <= got[half]["p99_ms"], got
    assert await asyncio.to_thread(busy_left) == [], "the load's processes outlived the run"


def busy_left() -> list[str]:
    """Processes still running the probe's load (examples/natlab.py's BUSY)."""
    ps = subprocess.run(["pgrep", "-f", "while True: pass"], capture_output=True, text=True)
    return ps.stdout.split()


async def test_edgemesh_bench_quick_runs_sim_egress_and_refreshes_the_docs(
    tmp_path: Path,
) -> None:
    docs = tmp_path / "docs"
    code, out, err = await run(
        "-m", "mesh", "bench", "--only", "sim_egress", "--quick", "--docs", str(docs), "--json"
    )
    assert code == 0, err[-2000:]
    summary = json.loads(out)
    assert summary["ok"] and summary["quick"]
    assert [(s["name"], s["status"]) for s in summary["scripts"]] == [("sim_egress", "ok")]
    md = (docs / "benchmarks.md").read_text()
    assert "## Egress simulation (examples/sim_egress.py)" in md
    assert "## Last `edgemesh bench` run" in md and "| examples/sim_egress.py | ok |" in md


FAKE_RUNTIME = """import json, sys
print(json.dumps({"model": "m", "cpu_count": 2, "results": [
    {"runtime": "llamacpp", "load_s": 0.4, "prefill_tok_s": 400.0, "decode_tok_s": 40.0,
     "peak_rss_mb": 400.0, "decode_vs_llamacpp": 1.0, "same_tokens_as_llamacpp": True},
    {"runtime": "onnx", "load_s": 2.0, "prefill_tok_s": 800.0, "decode_tok_s": 48.0,
     "peak_rss_mb": 900.0, "decode_vs_llamacpp": 1.2, "same_tokens_as_llamacpp": True}]}))
"""


async def test_edgemesh_bench_order_quick_args_missing_and_failing_scripts(
    tmp_path: Path,
) -> None:
    ex, docs, log = tmp_path / "ex", tmp_path / "docs", tmp_path / "argv.log"
    ex.mkdir()
    record = f"import sys\nopen({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
    (ex / "bench_join.py").write_text(record)
    (ex / "bench_transport.py").write_text(record + "sys.exit(3)\n")
    (ex / "bench_runtime.py").write_text(FAKE_RUNTIME)
    code, out, err = await run(
        "-m", "mesh", "bench", "--quick", "--examples", str(ex), "--docs", str(docs), "--json"
    )
    assert code == 1, err  # one script failed
    summary = json.loads(out)
    assert [(s["name"], s["status"]) for s in summary["scripts"]] == [
        ("bench_transport", "failed"),
        ("bench_join", "ok"),
        ("bench_runtime", "ok"),
        ("bench_latency", "missing"),
        ("sim_egress", "missing"),
    ]
    assert not summary["ok"]
    assert log.read_text().splitlines() == ["--count 100 --bulk-mib 8", "--members 3 --joins 2"]
    md = (docs / "benchmarks.md").read_text()
    assert "| onnx | 2 | 800 | 48 | 1.2 | 900 | yes |" in md
    assert "| examples/bench_transport.py | failed |" in md
    assert "| examples/bench_latency.py | missing |" in md


async def test_edgemesh_bench_rejects_an_unknown_script() -> None:
    code, _, err = await run("-m", "mesh", "bench", "--only", "nonsense")
    assert code == 2 and "invalid choice" in err


@pytest.mark.parametrize("engine", ["wrtc", "aiortc"])
async def test_engine_floor_echoes_between_two_processes(engine: str) -> None:
    """The floor bench_transport puts beside the link's round trip: a raw channel, two
    processes, every echo checked against what was sent."""
    from mesh.net.transport import wrtc_available

    if engine == "wrtc" and not wrtc_available():
        pytest.skip("wrtc is not installed")
    code, out, err = await run(
        str(EXAMPLES / "engine_floor.py"), "--engine", engine, "--count", "20"
    )
    assert code == 0, err[-2000:]
    result = json.loads(out)
    assert result["count"] == 20 and 0 < result["rtt_median_ms"] <= result["rtt_p99_ms"] < 1000
