"""``edgemesh model inspect`` / ``shard`` (mesh/cli/model.py), driven through argparse."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import pytest

importlib.import_module("gguf")

from mesh.cli.model import add_model_commands, run_model_command  # noqa: E402
from runtimes.testmodels import write_test_model  # noqa: E402


def _run(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    add_model_commands(sub)
    return run_model_command(p.parse_args(argv))


def test_inspect_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_test_model(tmp_path / "g.gguf", "gemma3")
    assert _run(["model", "inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "gemma3" and info["layers"] == 6
    assert len(info["units"]) == 8
    assert info["units"][0]["kind"] == "embed" and info["units"][-1]["kind"] == "head"
    assert info["units"][-1]["types"] == {"F32": 1, "Q8_0": 1}  # tied Q8_0 embedding as head


def test_inspect_text_and_shard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_test_model(tmp_path / "l.gguf", "llama")
    assert _run(["model", "inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "llama" in text and "Q4_K" in text and "head" in text
    assert _run(["model", "shard", str(path), "--store", str(tmp_path / "s"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["blobs"] == 4 and len(doc["model_id"]) == 64
    assert (tmp_path / "s" / "manifests" / f"{doc['model_id']}.json").is_file()


def test_inspect_says_how_each_runtime_runs_each_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 14: per tensor type, whether each runtime runs it exactly, never silently."""
    path = write_test_model(tmp_path / "g.gguf", "gemma3")
    assert _run(["model", "inspect", str(path), "--json"]) == 0
    support = json.loads(capsys.readouterr().out)["runtime_support"]
    assert set(support) >= {"F32", "Q8_0"}
    assert support["Q8_0"] == {"llamacpp": "exact", "onnx": "exact", "tinygrad": "dequantized"}
    assert support["F32"]["onnx"] == "exact"
    assert _run(["model", "inspect", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["type"])
    assert lines[header].split() == ["type", "llamacpp", "onnx", "tinygrad"]
    assert "Q8_0     exact        exact        dequantized" in lines[header + 1 :]
