"""`mt demo`: a tiny Llama built here (no download): mt convert -> mt quantize -> mt verify, printing each report."""

from __future__ import annotations

import json
from collections import Counter
import tempfile
from pathlib import Path

import click
import numpy as np

from mt.convert.convert import convert

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Release pipelines must never ship a broken model.",
    "Der schnelle braune Fuchs springt über den faulen Hund. Le renard brun saute par-dessus le chien.",
    "El zorro marrón salta sobre el perro perezoso. La volpe marrone salta sopra il cane pigro.",
    "Szybki brązowy lis przeskakuje nad leniwym psem. A raposa marrom salta sobre o cão preguiçoso.",
    "素早い茶色の狐がのろまな犬を飛び越える。敏捷的棕色狐狸跳过了懒狗。 الثعلب البني السريع يقفز فوق الكلب",
    "digits 0123456789 3.14159 2026-11-27, tabs\tand  spaces, emoji 🦙🚀✅",
]
PROMPT = "The quick brown fox jumps over the lazy dog. Der schnelle braune Fuchs 🦙 0123"


def build_tokenizer(folder: Path) -> int:
    """A byte-level BPE (GPT-2 pre-tokenizer) trained on the embedded corpus; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.save(str(folder / "tokenizer.json"))
    eos = "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": eos, "eos_token": eos, "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast",
         "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"}))
    return tok.get_vocab_size()


def build_tiny_llama(folder: Path, seed: int = 0, hidden: int = 64, inter: int = 160) -> Path:
    """config.json + model.safetensors (F16) of a 2-layer Llama, and its tokenizer."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(folder)
    layers, heads, kv_heads = 2, 4, 2
    head_dim = hidden // heads
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 512,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 0,
              "eos_token_id": 0, "torch_dtype": "float16", "hidden_act": "silu"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    rng = np.random.default_rng(seed)

    def w(*shape: int, scale: float = 0.08) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float16)

    tensors = {"model.embed_tokens.weight": w(vocab, hidden, scale=1.0), "lm_head.weight": w(vocab, hidden, scale=0.3),
               "model.norm.weight": (1 + w(hidden, scale=0.1)).astype(np.float16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {p + "input_layernorm.weight": (1 + w(hidden, scale=0.1)).astype(np.float16),
                    p + "post_attention_layernorm.weight": (1 + w(hidden, scale=0.1)).astype(np.float16),
                    p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
                    p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
                    p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden),
                    p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
                    p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
                    p + "mlp.down_proj.weight": w(hidden, inter)}
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def run_demo(workdir: Path | None = None) -> bool:
    """Returns whether every file passed mt verify."""
    from mt.quant.quantize import quantize_gguf
    from mt.verify.verify import Verifier

    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="mt-demo-"))
    src = build_tiny_llama(root / "tiny-llama")
    click.echo(f"built {src} (2-layer Llama, byte-level BPE tokenizer trained on an embedded multilingual text)")
    f16 = root / "tiny-llama-F16.gguf"
    result = convert(src, f16, "f16", force=True)
    click.echo(f"mt convert --outtype f16: {f16.name}, {len(result.plan.entries)} tensors, {f16.stat().st_size:,} bytes")
    q4 = root / "tiny-llama-Q4_K_M.gguf"
    quantized = quantize_gguf(f16, q4, "q4_k_m", force=True)
    counts = Counter(t.name for t in quantized.types.values())
    click.echo(f"mt quantize {f16.name} {q4.name} Q4_K_M: {q4.stat().st_size:,} bytes, "
               + ", ".join(f"{n} {name}" for name, n in sorted(counts.items())))
    passed = True
    with Verifier(src) as verifier:  # the reference conversion and the source's logits, made once for both files
        for path in (f16, q4):
            report = verifier.verify(path)
            click.echo(report.to_text())
            passed = passed and report.passed
    click.echo(f"files are in {root}")
    return passed
