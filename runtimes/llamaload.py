"""Every llama.cpp load in this process, one at a time.

llama-cpp-python silences a load (``verbose=False``) by ``dup2``-ing /dev/null over fds 1 and
2 and restoring the saved fds afterwards. Two loads on two threads interleave: the second
saves the first's /dev/null and restores it last, and the process's stdout and stderr stay on
/dev/null for good. A node's log is its stderr, so a node that built two tokenizers side by
side (a batch job's first generations) went silent mid-job. Loads therefore hold one lock;
inference calls do not touch the fds and run freely.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import llama_cpp

__all__ = ["load_llama"]

_LOADING = threading.Lock()


def load_llama(*args: Any, **kwargs: Any) -> llama_cpp.Llama:
    """``llama_cpp.Llama(*args, **kwargs)``, never beside another load in this process."""
    import llama_cpp  # noqa: F811 - imported on use: no import-time cost

    with _LOADING:
        return llama_cpp.Llama(*args, **kwargs)
