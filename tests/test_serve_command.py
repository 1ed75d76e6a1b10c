"""`esamp-sgl serve`'s command line: CPU defaults are added, SGLang flags pass through,
--esamp-* flags become the config every server process reads."""

from __future__ import annotations

import json

import pytest

from esamp_sgl.cli import main
from esamp_sgl.config import ENV_VAR, ESampConfig
from esamp_sgl.models import write_tiny_model
from esamp_sgl.serve import CPU_DEFAULTS, build_launch, cpu_threads_bind


def test_cpu_defaults_fill_only_missing_flags(tiny_model_path):
    cmd = build_launch(str(tiny_model_path), ["--max-total-tokens=4096", "--dtype", "float32",
                                              "--enable-metrics"], cpu=True).command
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    assert cmd[cmd.index("--model-path") + 1] == str(tiny_model_path)
    assert "--max-total-tokens=4096" in cmd and cmd.count("--dtype") == 1
    assert not any(a == "--max-total-tokens" for a in cmd)  # the user's value wins
    assert "--enable-metrics" in cmd
    for flag in CPU_DEFAULTS:
        assert any(a == flag or a.startswith(flag + "=") for a in cmd), flag


def test_gpu_command_passes_flags_unchanged(tiny_model_path):
    launch = build_launch(str(tiny_model_path), ["--tp-size", "2", "--no-esamp"], cpu=False)
    assert launch.command[3:] == ["--model-path", str(tiny_model_path), "--tp-size", "2"]
    assert ENV_VAR not in launch.env and launch.esamp is None


def test_tensor_parallel_ranks_agree_on_each_token_with_esamp_on(tiny_model_path, monkeypatch):
    monkeypatch.delenv("SYNC_TOKEN_IDS_ACROSS_TP", raising=False)
    for cpu in (True, False):
        assert build_launch(str(tiny_model_path), ["--tp-size", "2"], cpu=cpu).env["SYNC_TOKEN_IDS_ACROSS_TP"] == "1"
    assert "SYNC_TOKEN_IDS_ACROSS_TP" not in build_launch(str(tiny_model_path), ["--tp-size", "2", "--no-esamp"],
                                                          cpu=True).env
    assert "SYNC_TOKEN_IDS_ACROSS_TP" not in build_launch(str(tiny_model_path), [], cpu=True).env


def test_esamp_flags_become_the_config_and_leave_sglang_flags(tiny_model_path):
    launch = build_launch(str(tiny_model_path), ["--esamp-rank", "16", "--esamp-mix=orthogonal", "--tp-size", "1"],
                          cpu=True)
    assert launch.esamp == ESampConfig(rank=16, mix="orthogonal")
    assert launch.env[ENV_VAR] == launch.esamp.to_env()
    assert not any(a.startswith("--esamp") for a in launch.command)


def test_bad_esamp_flag_value_names_the_field(tiny_model_path):
    with pytest.raises(ValueError, match="mix='loud'"):
        build_launch(str(tiny_model_path), ["--esamp-mix", "loud"], cpu=True)


@pytest.mark.parametrize("flags,match", [(["--pp-size", "2"], "--pp-size"),
                                         (["--pipeline-parallel-size=2"], "--pipeline-parallel-size"),
                                         (["--speculative-algorithm", "EAGLE3"], "--speculative-algorithm"),
                                         (["--enable-dp-attention"], "--enable-dp-attention"),
                                         (["--attn-dp-size", "2"], "--attn-dp-size"),
                                         (["--tp-size", "2", "--esamp-init", "svd"], "--esamp-init svd")])
def test_unsupported_setups_are_refused_with_esamp_on(tiny_model_path, flags, match):
    with pytest.raises(ValueError, match=match):
        build_launch(str(tiny_model_path), flags, cpu=True)
    assert build_launch(str(tiny_model_path), flags + ["--no-esamp"], cpu=True).esamp is None


def test_layer_source_is_refused_where_sglang_captures_something_else(tmp_path):
    """Gemma 3's capture is not the residual stream (tests/test_families.py shows it differs)."""
    path = write_tiny_model(tmp_path / "tiny-gemma3", arch="gemma3", layers=3)
    with pytest.raises(ValueError, match="--esamp-source layer:1: Gemma3ForCausalLM"):
        build_launch(str(path), ["--esamp-source", "layer:1"], cpu=True)
    assert build_launch(str(path), [], cpu=True).esamp.source == "embed"


def test_a_multimodal_checkpoint_is_refused_before_anything_loads(tmp_path):
    path = write_tiny_model(tmp_path / "tiny-gemma3", arch="gemma3", layers=1)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"architectures": ["Gemma3ForConditionalGeneration"]}))
    with pytest.raises(ValueError, match="Gemma3ForConditionalGeneration is a multimodal"):
        build_launch(str(path), [], cpu=True)
    assert build_launch(str(path), ["--no-esamp"], cpu=True).esamp is None


def test_parallel_cpu_servers_get_what_sglang_needs_there(tiny_model_path):
    launch = build_launch(str(tiny_model_path), ["--tp-size", "2", "--dp-size=2"], cpu=True)
    assert launch.env["SGLANG_CPU_OMP_THREADS_BIND"].count("|") == 3  # one entry per scheduler process
    assert "SGLANG_NCCL_SO_PATH" in launch.env  # gloo only: NCCL must not load on CPU
    assert "SGLANG_CPU_OMP_THREADS_BIND" not in build_launch(str(tiny_model_path), [], cpu=True).env
    assert "SGLANG_NCCL_SO_PATH" not in build_launch(str(tiny_model_path), ["--dp-size", "2"], cpu=True).env


@pytest.mark.parametrize("ranks,cores,bind", [(2, [0, 1], "0|1"), (2, range(8), "0-3|4-7"), (3, [0, 1], "0|1|0"),
                                              (1, [2, 3], "2-3")])
def test_cpu_threads_bind_splits_the_cores(ranks, cores, bind):
    assert cpu_threads_bind(ranks, cores) == bind


def test_model_must_be_given_once(tiny_model_path):
    with pytest.raises(ValueError, match="not both"):
        build_launch(str(tiny_model_path), ["--model-path", "x"], cpu=True)
    with pytest.raises(ValueError, match="no model"):
        build_launch(None, [], cpu=True)


def test_unknown_model_is_a_clear_cli_error(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2
    assert "neither a known model" in capsys.readouterr().err


def test_unknown_flag_outside_serve_is_refused():
    with pytest.raises(SystemExit):
        main(["models", "list", "--bogus"])


def test_source_flag_accepts_embed_or_a_layer(tiny_model_path):
    assert build_launch(str(tiny_model_path), ["--esamp-source", "layer:2"], cpu=True).esamp.source_layer == 2
    with pytest.raises(ValueError, match="source='layer:x'"):
        build_launch(str(tiny_model_path), ["--esamp-source", "layer:x"], cpu=True)


def test_the_base_distillers_build_uses_only_the_servers_gpus(monkeypatch):
    """The build's child loads the model over the GPUs it sees: on a machine that runs several
    servers (--base-gpu-id), only those of the server it builds for, as SGLang counts them."""
    from esamp_sgl.base_distiller import child_env_on
    from esamp_sgl.serve import server_gpus

    assert server_gpus(["--tp-size", "2", "--base-gpu-id", "4"]) == [4, 5]
    assert server_gpus(["--tp-size=2", "--dp-size", "2", "--base-gpu-id=1", "--gpu-id-step", "2"]) == [1, 3, 5, 7]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7,9,11,13")
    assert child_env_on(server_gpus(["--tp-size", "2", "--base-gpu-id", "2"]))["CUDA_VISIBLE_DEVICES"] == "7,9"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert child_env_on([4, 5])["CUDA_VISIBLE_DEVICES"] == "4,5"
    assert "CUDA_VISIBLE_DEVICES" not in child_env_on(None)
