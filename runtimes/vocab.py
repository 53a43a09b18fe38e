"""A GGUF's tokenizer fields, validated in Python and rewritten into a vocab-only GGUF of ours.

llama.cpp's tokenizer is the oracle's, so token ids come from it; but its C++ GGUF and
vocabulary loaders must never see bytes a peer wrote (a tokenizer blob may have been pulled
from anyone: its hash only proves it is the blob the peer's manifest names). So the fields
are read here (``gguf_io``'s bounded parser), checked against what llama.cpp's loader
assumes without checking (array lengths equal to the token count, element types it reads as
raw ``float`` / ``int`` memory, unique token texts, merges of the form "a b", special ids in
range), and only those fields are written, by ``gguf.GGUFWriter``, into a file llama.cpp then
loads. Nothing else of the peer's file is copied: not its chat template (llama-cpp-python
would compile it as a Jinja template; we never format chats through it), nor its hparams
(llama.cpp reads none to load a vocabulary; the architecture name is the validated one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .arch import ModelConfig
from .errors import MalformedModelError, ModelError, UnsupportedModelError
from .gguf_io import RawKV, open_gguf

__all__ = ["Vocab", "read_vocab", "write_vocab_gguf", "MAX_TOKENS"]

import gguf  # noqa: E402
from gguf import GGUFValueType as V  # noqa: E402

MAX_TOKENS = 1 << 20  # Gemma 3: 262,144
MAX_TOKEN_BYTES = 1 << 12  # one token's text
MAX_MERGES = 1 << 21  # Llama 3: 280,147
MAX_MERGE_BYTES = 2 * MAX_TOKEN_BYTES + 1
# The tokenizers of the architectures we run (SentencePiece "llama", byte-level BPE "gpt2");
# llama.cpp's others (WPM, UGM with its binary charsmap, RWKV, PLaMo-2) are refused.
MODELS = frozenset({"llama", "gpt2"})
# llama.cpp's BPE pre-tokenizer names (src/llama-vocab.cpp, llama_vocab::impl::load)
PRE_TYPES = frozenset(
    "default llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 deepseek-llm "
    "deepseek-coder deepseek-v3 falcon mpt starcoder gpt-2 phi-2 jina-es jina-de gigachat "
    "jina-v2-es jina-v2-de a.x-4.0 mellum jina-v1-en jina-v2-code roberta-bpe refact "
    "command-r qwen2 deepseek-r1-qwen kormo stablelm2 olmo dbrx smaug-bpe poro-chat glm4 "
    "chatglm-bpe viking jais tekken smollm codeshell bloom gpt3-finnish exaone exaone4 "
    "chameleon minerva-7b megrez gpt-4o llama4 superbpe trillion granite-docling bailingmoe "
    "bailingmoe2 llada-moe seed-coder hunyuan hunyuan-dense kimi-k2 grok-2 afmoe "
    "minimax-m2".split()
)
TOKEN_TYPES = range(0, 7)  # llama_token_type: UNDEFINED .. BYTE
_SPECIAL = (
    "bos eos eot eom unknown seperator padding mask fim_pre fim_suf fim_mid fim_pad "
    "fim_rep fim_sep prefix suffix middle".split()
)
SPECIAL_ID_KEYS = tuple(f"tokenizer.ggml.{name}_token_id" for name in _SPECIAL)
FLAG_KEYS = tuple(
    f"tokenizer.ggml.{name}"
    for name in ("add_bos_token", "add_eos_token", "add_sep_token", "add_space_prefix")
) + ("tokenizer.ggml.remove_extra_whitespaces",)
_ID_TYPES = frozenset({V.UINT8, V.UINT16, V.UINT32, V.INT8, V.INT16, V.INT32})


@dataclass(frozen=True)
class Vocab:
    """The validated tokenizer of one model: exactly what is written for llama.cpp."""

    config: ModelConfig
    model: str
    pre: str | None
    tokens: list[bytes]
    scores: list[float] | None
    types: list[int] | None
    merges: list[bytes] | None
    special_ids: dict[str, int]
    flags: dict[str, bool]


def _string(kv: RawKV | None, key: str, cap: int = 64) -> str | None:
    if kv is None:
        return None
    if kv.vtype != V.STRING or len(kv.value) > cap:
        raise MalformedModelError(f"{key} is not a short string")
    try:
        return str(kv.value.decode("utf-8"))
    except UnicodeDecodeError:
        raise MalformedModelError(f"{key} is not UTF-8") from None


def _strings(kv: RawKV, cap: int, item_cap: int) -> list[bytes]:
    if kv.vtype != V.ARRAY or kv.sub_type != V.STRING:
        raise MalformedModelError(f"{kv.key} is not an array of strings")
    items: list[bytes] = kv.value
    if not 0 < len(items) <= cap:
        raise MalformedModelError(f"{kv.key} has {len(items)} entries (at most {cap})")
    for i, item in enumerate(items):
        if len(item) > item_cap:
            raise MalformedModelError(f"{kv.key}[{i}] is {len(item)} bytes long")
        try:
            item.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedModelError(f"{kv.key}[{i}] is not UTF-8") from None
    return items


def _numbers(kv: RawKV | None, sub: V, n: int) -> np.ndarray[Any, Any] | None:
    """An array llama.cpp reads as raw memory of ``sub`` for ``n`` tokens, unchecked."""
    if kv is None:
        return None
    if kv.vtype != V.ARRAY or kv.sub_type != sub or len(kv.value) != n:
        raise MalformedModelError(f"{kv.key} must be {n} values of type {sub.name}")
    return np.asarray(kv.value)


def _check_tokens(tokens: list[bytes]) -> None:
    # llama.cpp names an empty token "[EMPTY_<i>]" and asserts (aborts) if two texts collide
    seen: set[bytes] = set()
    for i, t in enumerate(tokens):
        text = t or f"[EMPTY_{i}]".encode()
        if text in seen:
            raise MalformedModelError(f"tokenizer.ggml.tokens[{i}] repeats an earlier token")
        seen.add(text)


def _check_merges(merges: list[bytes]) -> None:
    for i, m in enumerate(merges):
        a, sep, b = m.partition(b" ")
        if not (a and sep and b) or b" " in b:
            raise MalformedModelError(f"tokenizer.ggml.merges[{i}] is not of the form 'a b'")


def _special_ids(raw: dict[str, RawKV], n: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for key in SPECIAL_ID_KEYS:
        kv = raw.get(key)
        if kv is None:
            continue
        if kv.vtype not in _ID_TYPES or not 0 <= int(kv.value) < n:
            raise MalformedModelError(f"{key} = {kv.value!r} is not a token id below {n}")
        out[key] = int(kv.value)
    return out


def _flags(raw: dict[str, RawKV]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for key in FLAG_KEYS:
        kv = raw.get(key)
        if kv is None:
            continue
        if kv.vtype != V.BOOL:
            raise MalformedModelError(f"{key} is not a bool")
        out[key] = bool(kv.value)
    return out


def read_vocab(path: str | os.PathLike[str]) -> Vocab:
    """The tokenizer of a GGUF (a whole model, or a blob holding the embedding or the head),
    validated; raises a ModelError subclass, never touching llama.cpp."""
    f = open_gguf(path)
    raw = {kv.key: kv for kv in f.raw}
    model = _string(raw.get("tokenizer.ggml.model"), "tokenizer.ggml.model")
    if model not in MODELS:
        raise UnsupportedModelError(f"{path}: tokenizer {model!r} is not one of {sorted(MODELS)}")
    pre = _string(raw.get("tokenizer.ggml.pre"), "tokenizer.ggml.pre")
    if pre is not None and pre not in PRE_TYPES:
        raise UnsupportedModelError(f"{path}: pre-tokenizer {pre!r} is not one llama.cpp knows")
    tok_kv = raw.get("tokenizer.ggml.tokens")
    if tok_kv is None:
        raise ModelError(f"{path} holds no tokenizer (no tokenizer.ggml.tokens)")
    tokens = _strings(tok_kv, MAX_TOKENS, MAX_TOKEN_BYTES)
    n = len(tokens)
    _check_tokens(tokens)
    scores = _numbers(raw.get("tokenizer.ggml.scores"), V.FLOAT32, n)
    if scores is not None and not np.all(np.isfinite(scores)):
        raise MalformedModelError("tokenizer.ggml.scores holds a non-finite score")
    types = _numbers(raw.get("tokenizer.ggml.token_type"), V.INT32, n)
    if (
        types is not None
        and types.size
        and not (TOKEN_TYPES.start <= int(types.min()) and int(types.max()) < TOKEN_TYPES.stop)
    ):
        raise MalformedModelError("tokenizer.ggml.token_type holds an unknown token type")
    merges = None
    if "tokenizer.ggml.merges" in raw:
        merges = _strings(raw["tokenizer.ggml.merges"], MAX_MERGES, MAX_MERGE_BYTES)
        _check_merges(merges)
    return Vocab(
        config=f.config,
        model=model,
        pre=pre,
        tokens=tokens,
        scores=None if scores is None else [float(x) for x in scores.tolist()],
        types=None if types is None else [int(x) for x in types.tolist()],
        merges=merges,
        special_ids=_special_ids(raw, n),
        flags=_flags(raw),
    )


def write_vocab_gguf(vocab: Vocab, out: str | os.PathLike[str]) -> Path:
    """A vocab-only GGUF of ours: the validated architecture name and tokenizer, nothing
    else (llama.cpp loading ``vocab_only`` reads no hparams and no tensors)."""
    path = Path(out)
    w = gguf.GGUFWriter(str(path), vocab.config.arch)
    w.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        w.add_tokenizer_pre(vocab.pre)
    w.add_key_value("tokenizer.ggml.tokens", vocab.tokens, V.ARRAY, sub_type=V.STRING)
    if vocab.scores is not None:
        w.add_key_value("tokenizer.ggml.scores", vocab.scores, V.ARRAY, sub_type=V.FLOAT32)
    if vocab.types is not None:
        w.add_key_value("tokenizer.ggml.token_type", vocab.types, V.ARRAY, sub_type=V.INT32)
    if vocab.merges:
        w.add_key_value("tokenizer.ggml.merges", vocab.merges, V.ARRAY, sub_type=V.STRING)
    for key, value in vocab.special_ids.items():
        w.add_uint32(key, value)
    for key, flag in vocab.flags.items():
        w.add_bool(key, flag)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
