"""Where the onnx runtime's weights live, so that each is held once.

onnxruntime prepacks every ``MatMulNBits`` (and float ``MatMul``) weight into its own buffer
and then drops the initializer, if no other node reads it. Handed over as OrtValues the
original bytes stay ours and stay resident beside the packed copy; read from an ONNX
external-data file, onnxruntime maps each initializer from the file on its own and unmaps it
once packed. :class:`WeightFile` therefore writes the re-laid-out weights one at a time to a
private temporary file as the graph is built (never all in memory at once) and the session
loads the graph from there; the file is deleted once the session exists (what onnxruntime
still maps stays readable until it unmaps it). A load killed before that leaves its
directory behind: it is named by the loader's pid, and every load first sweeps those of dead
processes (:func:`sweep_dead`). The file goes to ``$EDGEMESH_ONNX_TMPDIR`` or the system's
temporary directory: it needs room for the shard's re-laid-out weights
(``quant.onnx_weight_bytes``; 284 MB for Gemma 3 270M) while the shard loads.

The token embedding is not in the graph: :func:`embedding_rows` dequantizes the rows of the
step's tokens straight from the GGUF's memory map, so a tied table is held once (as the head's
packed copy) and an untied one not at all beyond the pages of the rows used.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType as Q

from .gguf_io import TensorRef

__all__ = ["WeightFile", "embedding_rows", "sweep_dead"]

log = logging.getLogger(__name__)

_PREFIX = "edgemesh-onnx-"  # then the loading process's pid: see sweep_dead
_ALIGN = 4096  # onnxruntime maps external data in place when the offset is page-aligned
WEIGHTS_FILE = "weights.bin"
_MADV_PAGEOUT = 21  # Linux >= 5.4; older kernels answer EINVAL and nothing is released


class WeightFile:
    """A temporary directory holding ``weights.bin`` (external data) and ``model.onnx``."""

    def __init__(self, directory: str | None = None) -> None:
        sweep_dead(directory)
        prefix = f"{_PREFIX}{os.getpid()}-"
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir=directory))
        self._f = open(self.dir / WEIGHTS_FILE, "wb")  # noqa: SIM115 - closed in close()
        self.nbytes = 0

    def add(self, arr: npt.NDArray[Any]) -> list[tuple[str, str]]:
        """Writes ``arr`` and returns its ``external_data`` entries (location, offset, length)."""
        pad = -self.nbytes % _ALIGN
        if pad:
            self._f.write(b"\0" * pad)
            self.nbytes += pad
        offset = self.nbytes
        data = np.ascontiguousarray(arr)
        self._f.write(data.data.cast("B"))
        self.nbytes += data.nbytes
        return [("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(data.nbytes))]

    def release_mapped_pages(self) -> int:
        """Drops from the resident set the pages onnxruntime still maps from ``weights.bin``
        (inputs it read while prepacking but keeps, such as MatMulNBits scales: clean file
        pages, read again from the file if used). Linux only; returns the bytes advised."""
        return release_file_pages(str(self.dir / WEIGHTS_FILE))

    @contextmanager
    def releasing_pages(self, every_s: float = 0.05) -> Iterator[None]:
        """While the body runs (onnxruntime creating the session: mapping, prepacking and
        unmapping one initializer after another), keeps paging out the mapped file pages, so
        that the inputs it keeps mapped (scales, zero points) and the one being packed do not
        add up beside the packed copies (see release_file_pages for why this is safe)."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(every_s):
                self.release_mapped_pages()

        t = threading.Thread(target=loop, name="edgemesh-onnx-pages", daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()
            self.release_mapped_pages()

    def write_model(self, model_bytes: bytes) -> str:
        self._f.close()
        path = self.dir / "model.onnx"
        path.write_bytes(model_bytes)
        return str(path)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> WeightFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sweep_dead(directory: str | None = None) -> list[str]:
    """Deletes the weight directories of loads whose process is gone (killed mid-load: the
    directory is named by the loading process's pid, and only a live load can still need
    it). Returns the paths deleted."""
    root = Path(directory or tempfile.gettempdir())
    gone: list[str] = []
    try:
        entries = list(root.glob(f"{_PREFIX}*-*"))
    except OSError:
        return gone
    for d in entries:
        pid_text = d.name[len(_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or not d.is_dir() or _alive(int(pid_text)):
            continue
        shutil.rmtree(d, ignore_errors=True)
        gone.append(str(d))
    if gone:
        log.info("removed %d weight directories left by killed loads", len(gone))
    return gone


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive, and not ours to judge
        return True
    return True


def release_file_pages(path: str) -> int:
    """madvise(MADV_PAGEOUT) every unwritten mapping of ``path`` in this process: its clean
    file pages leave the resident set and are read from the file again when touched.

    PAGEOUT, not DONTNEED, because this runs while onnxruntime unmaps initializers and
    allocates packed buffers: a range read from smaps may be reused for anonymous memory by
    the time of the madvise, and DONTNEED would zero it (it did: packed weights and malloc
    headers, garbage tokens and "free(): invalid pointer"); PAGEOUT never loses data (anonymous
    pages go to swap or stay). onnxruntime maps external data private and writable but never
    writes constant initializers; a mapping with a page copied on write ("Anonymous" in
    smaps) is skipped all the same. Returns the bytes advised; 0 off Linux."""
    if sys.platform != "linux":
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ranges = _clean_mappings(path)
    except OSError:
        return 0
    done = 0
    for lo, hi in ranges:
        if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_PAGEOUT) == 0:
            done += hi - lo
    return done


def _clean_mappings(path: str) -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of ``path`` with no copied-on-write page."""
    out: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):  # a mapping's first line
                current = None
                if line.rstrip("\n").endswith(path):
                    lo, hi = head.split("-")
                    current = (int(lo, 16), int(hi, 16))
            elif current is not None and head == "Anonymous:":  # copied-on-write pages
                if int(line.split()[1]) == 0:
                    out.append(current)
                current = None
    return out


def default_weight_dir() -> str | None:
    """``EDGEMESH_ONNX_TMPDIR`` if set, else the system's temporary directory."""
    return os.environ.get("EDGEMESH_ONNX_TMPDIR") or None


def embedding_rows(ref: TensorRef, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    """Float32 rows ``ids`` of an embedding table ``[vocab, d]``, dequantized as llama.cpp
    does, reading only those rows' bytes (the caller has checked the ids' range)."""
    rows = ref.shape[0]
    raw = np.asarray(ref.data).reshape(rows, -1)[ids]
    if ref.qtype == Q.F32:
        out = np.asarray(raw, dtype=np.float32)
    elif ref.qtype == Q.F16:
        out = np.asarray(raw, dtype=np.float16).astype(np.float32)
    else:
        out = np.asarray(gguf.quants.dequantize(raw, ref.qtype), dtype=np.float32)
    return np.ascontiguousarray(out.reshape(len(ids), ref.shape[1]))
