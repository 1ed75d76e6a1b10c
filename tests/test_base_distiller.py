"""The base distiller's training on (shallow, deep) pairs, without a model: a learnable target."""

from __future__ import annotations

import torch

from esamp_sgl import base_distiller
from esamp_sgl.base_distiller import base_path, train_base
from esamp_sgl.config import ESampConfig
from esamp_sgl.mix import novelty
from tests.gpu_checks import learnable_states


def test_training_fits_held_out_rows_of_a_learnable_map(monkeypatch) -> None:
    monkeypatch.setattr(base_distiller, "TRAIN_STEPS", 150)
    d = 32
    states = learnable_states(d)
    x, h = states.x, states.h
    cfg = ESampConfig(init="base", rank=8)
    weights, error = train_base(states, cfg)
    untrained = novelty(h, torch.nn.functional.layer_norm(x, (d,))).mean()
    assert set(weights) == {"A", "G", "b", "B", "ln_w", "ln_b"} and weights["A"].shape == (d, 8)
    assert error < 0.7 * float(untrained)


def test_base_file_is_per_source_and_rank(tmp_path) -> None:
    assert base_path(tmp_path, ESampConfig(init="base")).name == "esamp-base-embed-r32.safetensors"
    assert base_path(tmp_path, ESampConfig(init="base", source="layer:2", rank=8)).name == \
        "esamp-base-layer2-r8.safetensors"
