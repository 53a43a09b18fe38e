"""Text <-> token ids with llama.cpp's own tokenizer, loaded vocabulary-only.

The tokenizer tables travel in the blobs holding the embedding or the head, so any peer that
holds either can tokenize; llama.cpp's tokenizer is the oracle's, so ids match it exactly.
Loading reads only the vocabulary (about 1 s for Gemma 3's 262,144 tokens).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from .errors import ModelError, RuntimeUnavailableError

__all__ = ["Tokenizer", "StreamDecoder"]

log = logging.getLogger(__name__)


class Tokenizer:
    """A GGUF's tokenizer. Thread-safe: llama.cpp's vocabulary calls are guarded by a lock."""

    def __init__(self, gguf_path: str | os.PathLike[str]) -> None:
        try:
            import llama_cpp
        except ImportError as exc:
            raise RuntimeUnavailableError(
                "tokenizing needs llama-cpp-python (pip install 'edgemesh[llamacpp]')"
            ) from exc
        path = Path(gguf_path)
        if not path.is_file():
            raise ModelError(f"no GGUF at {path}")
        try:
            self._llama = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"{path}: llama.cpp could not read its vocabulary: {exc}") from exc
        self._lock = threading.Lock()
        self.eos_id = int(self._llama.token_eos())
        self.bos_id = int(self._llama.token_bos())
        self.vocab_size = int(self._llama.n_vocab())

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        with self._lock:
            return [int(t) for t in self._llama.tokenize(text.encode(), add_bos=add_bos)]

    def token_bytes(self, token: int) -> bytes:
        if not 0 <= token < self.vocab_size:
            raise ModelError(f"token id {token} outside the vocabulary")
        with self._lock:
            return bytes(self._llama.detokenize([token]))

    def decode(self, tokens: list[int]) -> str:
        with self._lock:
            return bytes(self._llama.detokenize(tokens)).decode("utf-8", "replace")


class StreamDecoder:
    """Turns tokens into text as they arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._pending = b""

    def feed(self, token: int) -> str:
        data = self._pending + self.tokenizer.token_bytes(token)
        for cut in range(len(data), max(len(data) - 4, -1), -1):
            try:
                text = data[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self._pending = data[cut:]
            return text
        self._pending = b""
        return data.decode("utf-8", "replace")

    def flush(self) -> str:
        text = self._pending.decode("utf-8", "replace")
        self._pending = b""
        return text
