"""Tokenizer tables for the test models (runtimes/testmodels.py): a SentencePiece-style vocab
and a GPT-2 byte-level BPE one, small but complete enough for llama.cpp to load and use."""

from __future__ import annotations

import gguf

__all__ = ["spm_vocab", "bpe_vocab", "byte_unicode"]


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocab: unk, bos, eos, 256 byte tokens, then word pieces."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.CONTROL), int(gguf.TokenType.CONTROL)]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [int(gguf.TokenType.BYTE)] * 256
    letters = "abcdefghijklmnopqrstuvwxyz"
    pieces = ["\u2581" + c for c in letters] + list(letters)
    pieces += ["\u2581the", "\u2581of", "\u2581and", "in", "er", "on", "\u2581"]
    tokens += pieces
    types += [int(gguf.TokenType.NORMAL)] * len(pieces)
    scores = [0.0] * 3 + [-1000.0] * 256 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def byte_unicode() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def bpe_vocab() -> tuple[list[str], list[int], list[str]]:
    """A GPT-2 byte-level BPE vocab with a few merges (each merge's result is a token)."""
    tokens = byte_unicode()
    merges: list[str] = []
    for a, b in [
        ("\u0120", "t"),
        ("h", "e"),
        ("i", "n"),
        ("\u0120t", "he"),
        ("e", "r"),
        ("o", "n"),
        ("\u0120", "a"),
        ("a", "n"),
        ("r", "e"),
        ("\u0120", "s"),
    ]:
        merges.append(f"{a} {b}")
        if a + b not in tokens:
            tokens.append(a + b)
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    tokens.append("<|endoftext|>")
    types.append(int(gguf.TokenType.CONTROL))
    return tokens, types, merges
