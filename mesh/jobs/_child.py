"""The sandboxed child that runs one batch task's ONNX model (see :mod:`mesh.jobs.sandbox`).

Started as ``python -I -B _child.py MEMORY CPU`` in an empty temporary working directory with
a minimal environment; it imports nothing of edgemesh (``-I`` ignores PYTHONPATH and the
script's directory). Before it reads a byte of the model it limits its own address space,
CPU seconds, file size (no writes) and, once its libraries are loaded, open files. stdin: a
JSON header line ``{"model": N, "rows": R, "cols": C}``, the model's N bytes, then R*C
float32 values; stdout: a JSON header line ``{"shape": [...]}`` then the first output's float32
values. Any failure: one line on stderr and exit status 2.
"""

import json
import resource
import signal
import sys


def _limit(memory: int, cpu: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write fails instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def main() -> int:
    _limit(int(sys.argv[1]), int(sys.argv[2]))
    import numpy as np
    import onnxruntime as ort

    resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))  # libraries are loaded by now
    stdin = sys.stdin.buffer
    head = json.loads(stdin.readline(4096))
    model = stdin.read(int(head["model"]))
    rows, cols = int(head["rows"]), int(head["cols"])
    x = np.frombuffer(stdin.read(rows * cols * 4), dtype=np.float32).reshape(rows, cols)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # stderr is for the one failure line
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    y = np.ascontiguousarray(session.run(None, {name: x})[0], dtype=np.float32)
    out = sys.stdout.buffer
    out.write(json.dumps({"shape": list(y.shape)}).encode() + b"\n")
    out.write(y.tobytes())
    out.flush()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MemoryError:
        sys.stderr.write("out of memory (the job's memory limit)\n")
    except Exception as exc:  # everything the model can make onnxruntime raise
        sys.stderr.write(f"{type(exc).__name__}: {str(exc)[:300]}\n")
    sys.exit(2)
