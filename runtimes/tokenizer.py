"""Text <-> token ids with llama.cpp's own tokenizer, loaded vocabulary-only.

The tokenizer tables travel in the blobs holding the embedding or the head, so any peer that
holds either can tokenize; llama.cpp's tokenizer is the oracle's, so ids match it exactly.
A blob may come from any peer, so llama.cpp never reads it: :mod:`runtimes.vocab` validates
its tokenizer fields in Python and writes them into a private vocab-only GGUF, the only file
llama.cpp loads (3-5 s for Gemma 3's 262,144 tokens, once per model).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

from .errors import ModelError, RuntimeUnavailableError
from .llamaload import load_llama
from .vocab import read_vocab, write_vocab_gguf

__all__ = ["Tokenizer", "StreamDecoder"]

log = logging.getLogger(__name__)


class Tokenizer:
    """A GGUF's tokenizer. Thread-safe: llama.cpp's vocabulary calls are guarded by a lock."""

    def __init__(self, gguf_path: str | os.PathLike[str]) -> None:
        try:
            import llama_cpp  # noqa: F401 - a clear error here, not inside load_llama
        except ImportError as exc:
            raise RuntimeUnavailableError(
                "tokenizing needs llama-cpp-python (pip install 'edgemesh[llamacpp]')"
            ) from exc
        path = Path(gguf_path)
        if not path.is_file():
            raise ModelError(f"no GGUF at {path}")
        vocab = read_vocab(path)  # validated before llama.cpp sees any of it
        work = Path(tempfile.mkdtemp(prefix="edgemesh-vocab-"))  # mode 0700, ours alone
        try:
            ours = write_vocab_gguf(vocab, work / "vocab.gguf")
            self._llama = load_llama(str(ours), vocab_only=True, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:  # OSError: writing our copy
            raise ModelError(f"{path}: llama.cpp could not read its vocabulary: {exc}") from exc
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self._lock = threading.Lock()
        self.eos_id = int(self._llama.token_eos())
        self.bos_id = int(self._llama.token_bos())
        self.vocab_size = int(self._llama.n_vocab())
        if self.vocab_size != len(vocab.tokens):
            raise ModelError(
                f"{path}: llama.cpp read {self.vocab_size} tokens, not {len(vocab.tokens)}"
            )

    def encode(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """``special``: control tokens written in the text (a chat template's turn markers)
        become their ids, as llama.cpp does for a rendered chat prompt."""
        with self._lock:
            ids = self._llama.tokenize(text.encode(), add_bos=add_bos, special=special)
            return [int(t) for t in ids]

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
