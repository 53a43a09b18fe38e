"""Containment for batch-job models: a peer's ONNX graph is checked, then run in a child.

A job's model comes from any peer, and onnxruntime is not a sandbox: a tensor stored as
*external data* at a relative path is read from the process's working directory (a worker's
``identity.key`` came back in a job's results that way), and a graph can ask for any amount
of memory or time. So, before a session exists:

* :func:`check_model` refuses any graph with external data (initializers, sparse
  initializers and tensor attributes of every node, subgraphs of If/Loop/Scan included),
  with model-local functions or training info, or with an operator outside :data:`ALLOWED_OPS`
  of the default ONNX domain;
* :func:`run_model` runs the session in a child process (``_child.py``) started in an empty
  temporary working directory with a minimal environment, whose address space, CPU seconds,
  file writes and open files are limited (:class:`Limits`), and which is killed at a wall
  clock deadline. The child gets the model and the records on stdin and returns the output
  on stdout, read with a cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mesh.errors import Error

__all__ = [
    "JobError",
    "BadInput",
    "ModelRefused",
    "Limits",
    "ALLOWED_OPS",
    "check_model",
    "run_model",
]

CHILD = Path(__file__).with_name("_child.py")

# Pure tensor arithmetic of the default domain: enough for classifiers and small nets, and
# nothing that reaches outside the process (no custom domains, no contrib ops).
ALLOWED_OPS = frozenset(
    """Abs Acos Add And ArgMax ArgMin Asin Atan AveragePool BatchNormalization Cast Ceil Celu
    Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace Div
    Dropout Einsum Elu Equal Erf Exp Expand Flatten Floor Gather GatherElements GatherND Gelu
    Gemm GlobalAveragePool GlobalMaxPool Greater GreaterOrEqual HardSigmoid HardSwish Hardmax
    Identity If InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
    LessOrEqual Log LogSoftmax Loop LpNormalization MatMul Max MaxPool Mean Min Mish Mod Mul
    Neg Not OneHot Or PRelu Pad Pow Range Reciprocal ReduceL1 ReduceL2 ReduceLogSumExp
    ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
    Round Scan Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
    SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh Tile TopK Transpose Trilu Unsqueeze
    Where Xor""".split()
)
_DOMAINS = ("", "ai.onnx")


class JobError(Error):
    """A job is malformed or some task could not run anywhere."""


class BadInput(JobError):
    """A job's dataset is malformed (a record of it): every peer would refuse it the same
    way, so the task is not retried elsewhere and the job fails with this message."""


class ModelRefused(JobError):
    """A job's model uses something a peer's model may not (external data, an operator
    outside the allowlist, ...)."""


@dataclass(frozen=True)
class Limits:
    """What one task's child may use."""

    memory: int = 1 << 30  # address space, bytes (RLIMIT_AS)
    cpu_seconds: int = 60  # RLIMIT_CPU
    deadline: float = 120.0  # wall clock, seconds: killed then
    max_output: int = 8 << 20  # bytes of float32 output read back
    max_model: int = 256 << 20  # bytes of a model this node checks and runs


def _external(t: Any) -> bool:
    return bool(t.data_location == 1 or len(t.external_data))  # TensorProto.EXTERNAL == 1


def check_model(data: bytes) -> None:
    """Refuse (ModelRefused) a serialized ONNX model a peer's job may not run."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.ModelProto.FromString(data)
    except (DecodeError, RuntimeError, ValueError):
        raise ModelRefused("the model is not a serialized ONNX ModelProto") from None
    if len(model.functions) or len(model.training_info):
        raise ModelRefused("model-local functions and training info are not allowed")
    for op in model.opset_import:
        if op.domain not in _DOMAINS:
            raise ModelRefused(f"operator domain {op.domain[:40]!r} is not allowed")
    graphs = [model.graph]
    while graphs:  # iterative: a deep nest of subgraphs cannot exhaust the stack
        g = graphs.pop()
        tensors = list(g.initializer)
        for s in g.sparse_initializer:
            tensors += [s.values, s.indices]
        for node in g.node:
            if node.domain not in _DOMAINS or node.op_type not in ALLOWED_OPS:
                raise ModelRefused(f"operator {node.domain}:{node.op_type[:40]} is not allowed")
            for a in node.attribute:
                tensors += [a.t, *a.tensors]
                for s in [a.sparse_tensor, *a.sparse_tensors]:
                    tensors += [s.values, s.indices]
                graphs += [a.g, *a.graphs] if a.HasField("g") else list(a.graphs)
        for t in tensors:
            if _external(t):
                raise ModelRefused(f"tensor {t.name[:40]!r} names external data")


def _child_env(home: str) -> dict[str, str]:
    env = {"HOME": home, "TMPDIR": home, "OMP_NUM_THREADS": "1", "PATH": os.defpath}
    for key in ("LD_LIBRARY_PATH",):  # how some installs find their native libraries
        if key in os.environ:
            env[key] = os.environ[key]
    return env


async def run_model(model: Iterable[bytes], size: int, x: np.ndarray, limits: Limits) -> Any:
    """Run ``model`` (its chunks, ``size`` bytes in all) on ``x`` in a sandboxed child;
    returns the first output as a float32 array. Raises JobError."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="edgemesh-job-") as cwd:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            "-B",
            str(CHILD),
            str(limits.memory),
            str(limits.cpu_seconds),
            cwd=cwd,
            env=_child_env(cwd),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            return await asyncio.wait_for(_talk(proc, model, size, x, limits), limits.deadline)
        except TimeoutError:
            raise JobError(f"the task ran past its {limits.deadline:g} s deadline") from None
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def _talk(
    proc: asyncio.subprocess.Process,
    model: Iterable[bytes],
    size: int,
    x: np.ndarray,
    limits: Limits,
) -> Any:
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    head = {"model": size, "rows": x.shape[0], "cols": x.shape[1]}
    try:
        proc.stdin.write(json.dumps(head).encode() + b"\n")
        chunks = iter(model)
        # Streamed, each read off the event loop: the model is never joined here.
        while (chunk := await asyncio.to_thread(next, chunks, b"")) != b"":
            proc.stdin.write(chunk)
            await proc.stdin.drain()
        proc.stdin.write(x.tobytes())
        await proc.stdin.drain()
        proc.stdin.close()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the child died early: its status and stderr say why
    line = await proc.stdout.readline()
    shape: Any = None
    with contextlib.suppress(ValueError):
        shape = json.loads(line).get("shape") if line else None
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        err = (await proc.stderr.read(2000)).decode(errors="replace").strip()
        code = await proc.wait()
        raise JobError(f"the model failed in its sandbox (status {code}): {err[:300]}")
    n = int(np.prod(shape, dtype=np.int64)) * 4
    if n > limits.max_output:
        raise JobError(f"the model's output ({n} bytes) is over {limits.max_output}")
    try:
        data = await proc.stdout.readexactly(n)
    except asyncio.IncompleteReadError:
        raise JobError("the sandboxed model's output was cut short") from None
    return np.frombuffer(data, dtype=np.float32).reshape(shape)
