"""`esamp-sgl serve`'s command line: CPU defaults are added, SGLang flags pass through."""

from __future__ import annotations

import pytest

from esamp_sgl.cli import main
from esamp_sgl.serve import CPU_DEFAULTS, server_command


def test_cpu_defaults_fill_only_missing_flags(tiny_model_path):
    cmd = server_command(str(tiny_model_path), ["--max-total-tokens=4096", "--dtype", "float32",
                                                "--enable-metrics"], cpu=True)
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    assert cmd[cmd.index("--model-path") + 1] == str(tiny_model_path)
    assert "--max-total-tokens=4096" in cmd and cmd.count("--dtype") == 1
    assert not any(a == "--max-total-tokens" for a in cmd)  # the user's value wins
    assert "--enable-metrics" in cmd
    for flag in CPU_DEFAULTS:
        assert any(a == flag or a.startswith(flag + "=") for a in cmd), flag


def test_gpu_command_passes_flags_unchanged(tiny_model_path):
    cmd = server_command(str(tiny_model_path), ["--tp-size", "2"], cpu=False)
    assert cmd[3:] == ["--model-path", str(tiny_model_path), "--tp-size", "2"]


def test_model_must_be_given_once(tiny_model_path):
    with pytest.raises(ValueError, match="not both"):
        server_command(str(tiny_model_path), ["--model-path", "x"], cpu=True)
    with pytest.raises(ValueError, match="no model"):
        server_command(None, [], cpu=True)


def test_unknown_model_is_a_clear_cli_error(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2
    assert "neither a known model" in capsys.readouterr().err


def test_unknown_flag_outside_serve_is_refused():
    with pytest.raises(SystemExit):
        main(["models", "list", "--bogus"])
