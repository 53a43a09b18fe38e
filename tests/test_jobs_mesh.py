"""Batch jobs, acceptance: a dataset stored in one zone, compute peers in both zones.

The model is a small ONNX classifier (Gemm + Softmax, built with onnx.helper) stored in the
mesh like any object. The dataset lives on a storage-only peer in zone a; capable peers sit in
zones a and b. Our placement must move fewer bytes across zones than the random policy, and the
results must equal running the model locally. Uses the CLI end to end (put, job run --json).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from mesh.launch.localmesh import LocalMesh, NodeProcess

pytestmark = pytest.mark.network
onnx = importlib.import_module("onnx")
ort = importlib.import_module("onnxruntime")

D, K = 8, 3


def classifier(path: Path, seed: int = 1) -> None:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(D, K)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.normal(size=(K,)).astype(np.float32), "B")
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "W", "B"], ["z"]),
            helper.make_node("Softmax", ["z"], ["p"], axis=1),
        ],
        "clf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["n", K])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())


async def cli(*args: str, node: NodeProcess) -> dict:  # type: ignore[type-arg]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh",
        *args,
        "--api",
        node.api,
        "--json",
        env=dict(os.environ, EDGEMESH_API_TOKEN=node.token),  # the CLI sends it
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    return dict(json.loads(out))


async def test_job_runs_near_its_data_and_beats_random(local_mesh: LocalMesh, tmp_path: Path):
    mesh = local_mesh
    # 1 per GB: a 64 KiB input chunk costs ~6.5 ms to pull across zones, ten times its compute
    # (at 0.1 the two were even, and a peer's measured speed could tip a task across)
    price = ["--egress-price", "1.0"]
    store = await mesh.start_node("a0", ["--zone", "a", "--no-jobs", *price])
    a = await mesh.start_nodes([f"a{i}" for i in (1, 2)], ["--zone", "a", *price])
    b = await mesh.start_nodes([f"b{i}" for i in (0, 1)], ["--zone", "b", *price])
    await mesh.wait_connected(timeout=40)

    rng = np.random.default_rng(7)
    x = rng.normal(size=(6000, D)).round(4)
    dataset = tmp_path / "data.jsonl"
    dataset.write_text("".join(json.dumps({"x": row.tolist()}) + "\n" for row in x))
    model_path = tmp_path / "clf.onnx"
    classifier(model_path)
    data_id = (await cli("put", str(dataset), "--chunk-size", str(64 << 10), node=store))["id"]
    model_id = (await cli("put", str(model_path), node=store))["id"]

    report = await cli(
        "job", "run", "--model", model_id, "--input", data_id, "--compare", node=a[0]
    )
    ours, rand = report["policies"]
    assert (ours["policy"], rand["policy"]) == ("ours", "random")
    assert report["tasks"] >= 6 and report["records"] == len(x)
    zone_b = {n.peer_id for n in b}
    assert not set(ours["placement"]) & zone_b  # nothing was worth the cross-zone price
    assert set(rand["placement"]) & zone_b  # the baseline spread tasks over both zones
    assert ours["cross_zone_bytes"] < rand["cross_zone_bytes"]
    assert ours["input_cross_zone_bytes"] == 0
    assert report["same_results"] is True

    # The results object equals running the model here.
    out = tmp_path / "result.jsonl"
    await cli("get", report["id"], "-o", str(out), node=b[1])
    got = [json.loads(line) for line in out.read_text().splitlines()]
    sess = ort.InferenceSession(model_path.read_bytes(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"x": x.astype(np.float32)})[0]
    assert len(got) == len(x)
    np.testing.assert_allclose(np.array([g["y"] for g in got]), want, rtol=1e-5, atol=1e-6)
    assert [g["label"] for g in got] == want.argmax(axis=1).tolist()

    acc = await mesh.get(a[0], "/v1/accounting")
    assert acc["by_kind"].get("job-result", 0) > 0


def exfiltrator(path: Path, location: str, n: int = 32) -> None:
    """A hostile job model: its initializer ``W`` is ``n`` bytes of *external data* at
    ``location`` (relative: onnxruntime reads it from the worker's working directory); every
    output row is those bytes, as floats."""
    from onnx import TensorProto, helper, numpy_helper

    w = TensorProto(name="W", data_type=TensorProto.UINT8, dims=[n])
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(n))):
        w.external_data.add(key=key, value=value)
    z = numpy_helper.from_array(np.zeros((D, n), np.float32), "Z")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["W"], ["wf"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["x", "Z"], ["m"]),
            helper.make_node("Add", ["m", "wf"], ["y"]),
        ],
        "exfil",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", n])],
        initializer=[w, z],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())


async def test_a_job_model_cannot_read_the_workers_files(
    local_mesh: LocalMesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A peer submits a job whose model names the worker's identity key as external data
    (relative to the worker's working directory, as ``.local/share/edgemesh/identity.key`` is
    from a home directory) and reads the results."""
    monkeypatch.chdir(tmp_path)  # the node processes start here: their working directory
    attacker = await local_mesh.start_node("attacker", ["--no-jobs"])
    victim = await local_mesh.start_node("victim")
    await local_mesh.wait_connected(timeout=40)
    key_path = victim.data_dir / "identity.key"
    key = key_path.read_bytes()
    model_path = tmp_path / "exfil.onnx"
    exfiltrator(model_path, str(key_path.relative_to(tmp_path)), len(key))
    dataset = tmp_path / "one.jsonl"
    dataset.write_text(json.dumps({"x": [0.0] * D}) + "\n")
    data_id = (await cli("put", str(dataset), node=attacker))["id"]
    model_id = (await cli("put", str(model_path), node=attacker))["id"]

    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "mesh", "job", "run", "--model", model_id, "--input", data_id],
        *["--api", attacker.api, "--json"],
        env=dict(os.environ, EDGEMESH_API_TOKEN=attacker.token),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    # Before: the job succeeded and its results were the 32 bytes of the victim's signing key.
    assert proc.returncode != 0, out.decode()
    assert "external data" in err.decode(), err.decode()[-2000:]
    await victim.wait_logged("external data")
