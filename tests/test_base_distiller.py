"""The base distiller's training on (shallow, deep) pairs, without a model: a learnable target."""

from __future__ import annotations

import torch

from esamp_sgl import base_distiller
from esamp_sgl.base_distiller import States, base_path, train_base
from esamp_sgl.config import ESampConfig
from esamp_sgl.mix import novelty


def test_training_fits_held_out_rows_of_a_learnable_map(monkeypatch) -> None:
    monkeypatch.setattr(base_distiller, "TRAIN_STEPS", 150)
    gen = torch.Generator().manual_seed(0)
    d = 32
    x = torch.randn(2000, d, generator=gen)
    mix = torch.randn(d, d, generator=gen) / d**0.5
    h = torch.nn.functional.layer_norm(x + torch.tanh(x @ mix) * 2, (d,))
    held_out = torch.arange(2000) < 200
    cfg = ESampConfig(init="base", rank=8)
    weights, error = train_base(States(x, h, held_out, 0.0), cfg)
    untrained = novelty(h, torch.nn.functional.layer_norm(x, (d,))).mean()
    assert set(weights) == {"A", "G", "b", "B", "ln_w", "ln_b"} and weights["A"].shape == (d, 8)
    assert error < 0.7 * float(untrained)


def test_base_file_is_per_source_and_rank(tmp_path) -> None:
    assert base_path(tmp_path, ESampConfig(init="base")).name == "esamp-base-embed-r32.safetensors"
    assert base_path(tmp_path, ESampConfig(init="base", source="layer:2", rank=8)).name == \
        "esamp-base-layer2-r8.safetensors"
