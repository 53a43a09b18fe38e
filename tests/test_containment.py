"""Containment (issue 13): what a peer's job model, manifest or header cannot make a node do.

Fast tests with real objects: the ONNX checks on real graphs built with onnx.helper, the
sandbox as a real child process. The cross-process attack (a peer's job reading the worker's
identity key) is in tests/test_jobs_mesh.py.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

from mesh.errors import Error
from mesh.jobs.sandbox import JobError, Limits, ModelRefused, check_model, run_model
from mesh.storage.manifest import StoreError
from tests.test_jobs_mesh import D, classifier, exfiltrator

onnx = importlib.import_module("onnx")
helper, numpy_helper, TensorProto = onnx.helper, onnx.numpy_helper, onnx.TensorProto


def external(name: str, location: str = "secret.bin", n: int = 4) -> object:
    t = TensorProto(name=name, data_type=TensorProto.UINT8, dims=[n])
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(n))):
        t.external_data.add(key=key, value=value)
    return t


def model_bytes(nodes: list, initializer: list | None = None, **kw: object) -> bytes:  # type: ignore[type-arg]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=initializer or [],
        **kw,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def test_the_classifier_passes_the_check(tmp_path: Path) -> None:
    classifier(tmp_path / "m.onnx")
    check_model((tmp_path / "m.onnx").read_bytes())


def test_external_data_is_refused_wherever_it_hides(tmp_path: Path) -> None:
    exfiltrator(tmp_path / "x.onnx", ".local/share/edgemesh/identity.key")
    with pytest.raises(ModelRefused, match="external data"):
        check_model((tmp_path / "x.onnx").read_bytes())
    # in a Constant node's value attribute
    const = helper.make_node("Constant", [], ["c"])
    const.attribute.add().CopyFrom(helper.make_attribute("value", external("c")))
    with pytest.raises(ModelRefused, match="external data"):
        check_model(model_bytes([const, helper.make_node("Identity", ["x"], ["y"])]))
    # in the initializer of an If branch (a subgraph)
    branch = helper.make_graph(
        [helper.make_node("Cast", ["w"], ["o"], to=TensorProto.FLOAT)],
        "b",
        [],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)],
        initializer=[external("w")],
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    iff = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
    with pytest.raises(ModelRefused, match="external data"):
        check_model(model_bytes([iff], [cond]))
    # in a sparse initializer's values
    sparse = helper.make_sparse_tensor(
        external("s"), numpy_helper.from_array(np.array([0], np.int64), "i"), [4]
    )
    with pytest.raises(ModelRefused, match="external data"):
        check_model(
            model_bytes([helper.make_node("Identity", ["x"], ["y"])], sparse_initializer=[sparse])
        )


def test_operators_outside_the_allowlist_are_refused() -> None:
    for node in (
        helper.make_node("MyOp", ["x"], ["y"], domain="com.evil"),
        helper.make_node("Upsample", ["x"], ["y"]),  # default domain, not on the list
    ):
        with pytest.raises(ModelRefused, match="not allowed"):
            check_model(model_bytes([node]))
    with pytest.raises(ModelRefused):
        check_model(b"\xff\xff not protobuf")


async def test_the_sandbox_has_an_empty_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defense in depth: a model that got past the check still cannot read the files next to
    the node (the check is bypassed here on purpose)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.bin").write_bytes(b"SECRET!!")
    exfiltrator(tmp_path / "x.onnx", "secret.bin", 8)
    data = (tmp_path / "x.onnx").read_bytes()
    with pytest.raises(JobError, match="sandbox"):
        await run_model([data], len(data), np.zeros((1, D), np.float32), Limits())


async def test_the_sandbox_runs_a_good_model_and_limits_memory_and_time(tmp_path: Path) -> None:
    classifier(tmp_path / "m.onnx")
    data = (tmp_path / "m.onnx").read_bytes()
    x = np.random.default_rng(0).normal(size=(5, D)).astype(np.float32)
    y = await run_model([data[:100], data[100:]], len(data), x, Limits())
    assert y.shape == (5, 3) and np.allclose(y.sum(axis=1), 1.0, atol=1e-5)
    # 8 GiB of zeros under a 512 MiB address-space limit
    shape = numpy_helper.from_array(np.array([1 << 31], np.int64), "shape")
    big = model_bytes([helper.make_node("ConstantOfShape", ["shape"], ["y"])], [shape])
    with pytest.raises(JobError, match="sandbox"):
        await run_model([big], len(big), x, Limits(memory=512 << 20))
    with pytest.raises(JobError, match="deadline"):
        await run_model([data], len(data), x, Limits(deadline=0.001))
    # an output larger than the cap is not read back
    with pytest.raises(JobError, match="over"):
        await run_model([data], len(data), x, Limits(max_output=16))


def repeated_manifest(times: int = 13_500) -> bytes:
    """A 1 MiB manifest that names one 2 MiB chunk ``times`` times: 27 GiB from one chunk."""
    import json

    from mesh.storage.manifest import CHUNK_MAX, sha256

    chunk = [sha256(b"one chunk"), CHUNK_MAX]
    doc = {"v": 1, "size": CHUNK_MAX * times, "chunks": [chunk] * times, "format": "raw"}
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def test_a_manifest_from_the_network_may_not_repeat_a_chunk() -> None:
    from mesh.storage.manifest import MAX_MANIFEST, parse_manifest, sha256

    raw = repeated_manifest()
    assert len(raw) <= MAX_MANIFEST
    # Before: accepted, a 27 GiB object named by one chunk.
    with pytest.raises(StoreError, match="more than once"):
        parse_manifest(raw, sha256(raw))
    # The store's own objects may repeat a chunk (a file with two equal 2 MiB runs).
    assert parse_manifest(raw, repeats=True).size == 13_500 * (2 << 20)


async def test_get_manifest_refuses_a_peers_repeated_chunks(tmp_path: Path) -> None:
    """The network path: a holder answering obj_manifest with the repeated manifest."""
    from mesh.net.rpc import Reply
    from mesh.storage.manifest import sha256
    from mesh.storage.service import ObjectService, StorageConfig

    raw = repeated_manifest(3)

    class Holder:  # the one method get_manifest calls on the node: a peer's reply
        me = "me"

        def link(self, peer: str) -> None:
            raise Error("no link measured")  # the cost estimate falls back to defaults

        async def call(self, peer: str, method: str, params: dict, timeout: float) -> Reply:  # type: ignore[type-arg]
            return Reply({"n": len(raw)}, raw)

    objects = ObjectService(Holder(), StorageConfig(), tmp_path)  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="no holder gave"):
        await objects.get_manifest(sha256(raw), ["peer"])
    assert objects.store.manifest(sha256(raw)) is None
