"""A load killed mid-way leaves no weight file behind once the next load has run
(onnx_weights.sweep_dead): a real child process, SIGKILLed while its weights file exists."""

from __future__ import annotations

import importlib
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

importlib.import_module("onnxruntime")

from runtimes.onnx_rt import OnnxRuntime  # noqa: E402
from runtimes.shards import ShardSpec  # noqa: E402
from runtimes.testmodels import write_test_model  # noqa: E402

# The child loads the model, but stops for good when onnxruntime is about to map the weights
# (the file is then complete, as when a large model is killed during session creation), after
# saying so on stdout: the parent kills it at exactly that point.
CHILD = """
import sys, time
import onnxruntime
from runtimes.onnx_rt import OnnxRuntime
from runtimes.shards import ShardSpec

def held(*args, **kwargs):
    print("mapping", flush=True)
    while True:
        time.sleep(60)

onnxruntime.InferenceSession = held
OnnxRuntime(ShardSpec.open(sys.argv[1]), threads=1)
"""


def _leftovers(d: Path) -> list[Path]:
    return sorted(d.glob("edgemesh-onnx-*"))


def test_a_killed_load_leaves_no_weight_file_after_the_next_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = write_test_model(tmp_path / "m.gguf", "llama")
    weights = tmp_path / "weights"
    weights.mkdir()
    env = dict(os.environ, EDGEMESH_ONNX_TMPDIR=str(weights))
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(model)], env=env, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 120)
        assert ready and child.stdout.readline().strip() == b"mapping", "child did not load"
        left = _leftovers(weights)
        assert len(left) == 1 and (left[0] / "weights.bin").stat().st_size > 0
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert _leftovers(weights), "the killed load left its directory (what the sweep is for)"
    monkeypatch.setenv("EDGEMESH_ONNX_TMPDIR", str(weights))
    OnnxRuntime(ShardSpec.open(model), threads=1).close()
    assert _leftovers(weights) == []


def test_a_live_loads_directory_is_not_swept(tmp_path: Path) -> None:
    from runtimes.onnx_weights import WeightFile, sweep_dead

    with WeightFile(str(tmp_path)) as wf:
        assert sweep_dead(str(tmp_path)) == []
        assert wf.dir.exists()
    # a directory named by a pid that has exited is swept
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(timeout=30)
    dead = tmp_path / f"edgemesh-onnx-{p.pid}-abc"
    dead.mkdir()
    assert sweep_dead(str(tmp_path)) == [str(dead)] and not dead.exists()
