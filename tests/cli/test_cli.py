"""The moec command: compile, inspect, errors and exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moec.cli import main
from moec.ir.plan import WEIGHTS_FILE


@pytest.fixture(scope="module")
def qwen_plan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "plan"
    assert main(["compile", "--model", "tiny-qwen2-moe", "-o", str(folder)]) == 0
    return folder


def test_compile_prints_layers_and_parity(qwen_plan, capsys):
    assert main(["compile", "--model", "tiny-mixtral"]) == 0
    out = capsys.readouterr().out
    assert "moe.experts" in out and "moe.route" in out
    assert out.count("ok (tolerance 0.0001)") == 2


def test_inspect_shows_shared_expert_and_gate(qwen_plan, capsys):
    assert main(["inspect", str(qwen_plan)]) == 0
    out = capsys.readouterr().out
    assert "moe.shared_expert(" in out  # the IR text
    assert "gate=@model.layers.0.mlp.shared_expert_gate.weight" in out
    assert "sigmoid gate" in out  # the table's description of the shared expert


def test_inspect_a_corrupted_plan_names_the_checksum(qwen_plan, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in qwen_plan.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    data = bytearray((broken / WEIGHTS_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (broken / WEIGHTS_FILE).write_bytes(bytes(data))
    assert main(["inspect", str(broken)]) == 1
    captured = capsys.readouterr()
    assert "checksum mismatch" in captured.err and "Traceback" not in captured.err + captured.out


def test_bad_usage_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["compile", "--dtype", "float7"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_unknown_model_is_one_clear_error(capsys):
    assert main(["compile", "--model", "no-such-model"]) == 1
    err = capsys.readouterr().err
    assert "no-such-model" in err and "Traceback" not in err


def test_default_compile_is_real_minilm_with_parity():
    """The console script with no arguments: the real all-MiniLM-L6-v2 weights, offline, with parity."""
    result = subprocess.run([sys.executable, "-m", "moec.cli", "compile"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ffn.dense") == 6
    assert result.stdout.count("ok (tolerance 0.0001)") == 2
