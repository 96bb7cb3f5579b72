"""`mt speak` against HumeAI's own TADA code (tests/tada_oracle.py runs it in its own virtual environment).

A tiny TadaForCausalLM (2 layers, hidden 64, Llama 3.2's tokenizer and special ids, llama3 rope scaling) and a tiny
codec Decoder are built by HumeAI's classes, every parameter re-drawn from a seed, and saved; mt converts them (F32)
and speaks the same text from the same injected noise, llama.cpp running the backbone with an F32 KV cache. Each
step's hidden states, the flow's output, the durations, the codec's input frames and the waveform are compared.
"""

from __future__ import annotations

import json
import shutil
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mt.cli import main
from mt.speak.acoustic import FlowOptions, gray_to_time, scheduled_cfg
from mt.speak.measure import log_mel_distance
from mt.speak.speak import Speaker, SpeakOptions
from mt.speak.voice import load_voice
from tests.checkpoints import LLAMA3_ROPE_SCALING, write_llama32_tokenizer
from tests.tada_oracle import run_hume

TEXT = "Hello world, this is a test."
VOICE_TEXT = "The quick brown fox jumps."
ACOUSTIC_DIM, TIME_BITS = 16, 6
LATENT = ACOUSTIC_DIM + 2 * TIME_BITS
TOLERANCE = 1e-4
CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128256, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=500000.0,
              rope_scaling=dict(LLAMA3_ROPE_SCALING), tie_word_embeddings=True, bos_token_id=128000,
              eos_token_id=[128001, 128008, 128009], acoustic_dim=ACOUSTIC_DIM, num_time_classes=2 ** TIME_BITS,
              head_layers=2, head_ffn_ratio=3.0, shift_acoustic=5)
DECODER = dict(embed_dim=ACOUSTIC_DIM, hidden_dim=32, num_attn_layers=2, num_attn_heads=4, attn_dim_feedforward=64,
               wav_decoder_channels=32, strides=[4, 4, 5, 6], block_attention="v2")


def clipped_noise(seed: int, rows: int = 96) -> np.ndarray:
    """Standard normal noise cut at ±1.2: with the small random head the time bits stay inside ±2, where HumeAI's
    Gray decoding is defined (beyond it, it indexes past the time classes)."""
    return np.clip(np.random.default_rng(seed).standard_normal((rows, LATENT)), -1.2, 1.2).astype(np.float32)


@dataclass
class Hume:
    out: Path  # HumeAI's saved model and codec, and its results
    oracle: dict[str, np.ndarray]
    noise: np.ndarray
    backbone: Path  # mt's F32 conversion: tada.gguf, tada-acoustic.gguf, tada-codec.gguf beside it


def convert(args: list[str]) -> None:
    result = CliRunner().invoke(main, ["convert", *args, "--quiet"])
    assert result.exit_code == 0, result.output


def hume_run(root: Path, voice_text: str | None, **options: object) -> Hume:
    tokenizer = root / "tokenizer"
    tokenizer.mkdir(parents=True)
    write_llama32_tokenizer(tokenizer)
    noise = clipped_noise(5)
    np.save(root / "noise.npy", noise)
    spec = {"tokenizer": str(tokenizer), "config": CONFIG, "decoder": DECODER, "seed": 3, "init_std": 0.05,
            "conv_gain": 0.6, "text": TEXT, "noise": str(root / "noise.npy"), "voice_text": voice_text,
            "options": {"text_do_sample": False, **options}}
    out = root / "hume"
    oracle = run_hume(spec, out)
    for f in tokenizer.iterdir():  # save_pretrained of the model writes no tokenizer
        shutil.copy(f, out / "tada" / f.name)
    gguf = root / "gguf"
    gguf.mkdir()
    convert([str(out / "tada"), "-o", str(gguf / "tada.gguf"), "--outtype", "f32"])
    convert([str(out / "decoder"), "-o", str(gguf / "tada-codec.gguf"), "--outtype", "f32"])
    return Hume(out, oracle, noise, gguf / "tada.gguf")


@pytest.fixture(scope="module")
def hume(tmp_path_factory: pytest.TempPathFactory) -> Hume:
    return hume_run(tmp_path_factory.mktemp("hume"), None)


@pytest.fixture(scope="module")
def hume_voice(tmp_path_factory: pytest.TempPathFactory) -> Hume:
    return hume_run(tmp_path_factory.mktemp("hume_voice"), VOICE_TEXT)


@pytest.fixture(scope="module")
def hume_zero(tmp_path_factory: pytest.TempPathFactory) -> Hume:
    return hume_run(tmp_path_factory.mktemp("hume_zero"), None, negative_condition_source="zero")


def oracle_durations(hume: Hume, speaker: Speaker, margins: list[float]):
    """The Gray decoding, except where a time bit lies within TOLERANCE of the rounding boundary: there the oracle's
    own latent decides (teacher forcing), so a float-level flip does not change every later step."""
    def durations(step: int, latent: torch.Tensor) -> tuple[int, int]:
        margin = speaker.acoustic.smallest_bit_margin(latent)
        margins.append(margin)
        source = torch.from_numpy(hume.oracle["ode_out"][step]) if margin < TOLERANCE else latent
        return speaker.acoustic.durations(source)

    return durations


def speak_like_hume(hume: Hume, voice: Path | None = None, negative: str = "step") -> tuple[object, list[float]]:
    rows = iter(hume.noise)
    margins: list[float] = []
    with Speaker(hume.backbone, options=SpeakOptions(negative=negative, f32_cache=True)) as speaker:
        speech = speaker.say(TEXT, load_voice(voice) if voice else None, noise=lambda n: next(rows),
                             durations=oracle_durations(hume, speaker, margins))
    return speech, margins


def relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def assert_like_hume(hume: Hume, speech, margins: list[float]) -> None:
    o = hume.oracle
    print(f"smallest Gray-bit margin: {min(margins):.2e} over {len(margins)} predicted durations")
    assert speech.input_ids == o["input_ids"].tolist()
    hidden = np.stack(speech.hidden)
    assert hidden.shape == o["hidden"].shape  # [steps, text + guidance sequence, hidden]
    assert relative(hidden, o["hidden"]) <= TOLERANCE
    assert relative(np.stack(speech.latents), o["ode_out"]) <= TOLERANCE
    assert speech.time_before.tolist() == o["time_before"].tolist()
    assert speech.frames.shape == o["decoder_in"].shape and relative(speech.frames, o["decoder_in"]) <= TOLERANCE
    assert speech.wav.shape == o["wav"].shape
    assert np.abs(speech.wav - o["wav"]).max() <= 1e-3
    assert o["wav"].std() > 0.01  # the random codec's output varies: the comparison has something to compare


def test_speech_matches_hume_step_by_step(hume: Hume) -> None:
    speech, margins = speak_like_hume(hume)
    assert_like_hume(hume, speech, margins)
    same = log_mel_distance(speech.wav, hume.oracle["wav"], 24000)
    rows = iter(clipped_noise(6))
    with Speaker(hume.backbone, options=SpeakOptions(f32_cache=True)) as speaker:
        reseeded = speaker.say(TEXT, noise=lambda n: next(rows))
    other = log_mel_distance(reseeded.wav, hume.oracle["wav"], 24000)
    print(f"log-mel distance to HumeAI: {same:.2e} (same noise), {other:.3f} (other noise)")
    assert same < 1e-3 * other


def test_voice_prompt_matches_hume(hume_voice: Hume) -> None:
    """The prompt's positions go through llama.cpp in one batch (HumeAI's prefill), its transcript padded out."""
    speech, margins = speak_like_hume(hume_voice, hume_voice.out / "voice.pt")
    assert_like_hume(hume_voice, speech, margins)


def test_zero_negative_condition_matches_hume(hume_zero: Hume) -> None:
    """HumeAI's "zero" negative condition: no guidance sequence in llama.cpp, zeros as the negative condition."""
    speech, margins = speak_like_hume(hume_zero, negative="zero")
    assert np.stack(speech.hidden).shape[1] == 1
    assert_like_hume(hume_zero, speech, margins)


NORMALIZED = ["Hello — “world”… it’s (really) fine; isn't it?", "A: b -- c - d ,, e  f .", "MIXED case. new Sentence! ok?",
              "«Bonjour» ‹x› ‐ ‑ ― –", "' quoted ' words", "  leading space", "über GROSS. ñandú"]


def test_text_is_normalised_as_hume_does() -> None:
    from mt.speak.text import normalize_text
    from tests.tada_oracle import hume_normalize

    assert [normalize_text(t) for t in NORMALIZED] == hume_normalize(NORMALIZED)


def test_voice_npz_is_the_encoder_output(hume_voice: Hume, tmp_path: Path) -> None:
    saved = torch.load(hume_voice.out / "voice.pt", weights_only=True)
    npz = tmp_path / "voice.npz"
    np.savez(npz, token_values=saved["token_values"][0].numpy(), token_positions=saved["token_positions"][0].numpy(),
             audio_len=float(saved["audio_len"][0]), sample_rate=24000, text=np.array(saved["text"][0]))
    from_pt, from_npz = load_voice(hume_voice.out / "voice.pt"), load_voice(npz)
    assert from_npz.text == from_pt.text == VOICE_TEXT and from_npz.frames == from_pt.frames
    assert np.array_equal(from_npz.values, from_pt.values) and np.array_equal(from_npz.positions, from_pt.positions)


def test_head_velocity_matches_hume(hume: Hume) -> None:
    """The head alone, on HumeAI's own inputs: the first Euler step's guided velocity of every token."""
    o, flow = hume.oracle, FlowOptions()
    with Speaker(hume.backbone, options=SpeakOptions(f32_cache=True)) as speaker:
        for step in range(len(o["ode_in"])):
            cond, neg = (torch.from_numpy(o["hidden"][step][i:i + 1]) for i in (0, 1))
            got = speaker.acoustic.velocity(torch.from_numpy(o["ode_in"][step:step + 1]), torch.tensor(0.0), cond, neg,
                                            scheduled_cfg(flow.acoustic_cfg, 0.0, flow.cfg_schedule), flow.duration_cfg)
            want = o["velocity"][step * flow.flow_steps]
            assert relative(got.numpy(), want) <= TOLERANCE, step


def test_a_speaker_says_one_thing_after_another(hume: Hume) -> None:
    """Each utterance starts from an empty KV cache: the second of two identical calls is the first again."""
    with Speaker(hume.backbone) as speaker:
        first, second = (speaker.say(TEXT, noise=lambda n, rows=iter(hume.noise): next(rows)) for _ in range(2))
        assert np.array_equal(first.wav, second.wav) and len(first.wav) > 0


def test_a_bf16_head_computes_what_the_f32_one_does(hume: Hume) -> None:
    """--head-dtype bf16: the same velocities to bf16's precision on HumeAI's inputs, and it speaks."""
    o, flow = hume.oracle, FlowOptions()
    heads = {}
    for dtype in ("f32", "bf16"):
        speaker = Speaker(hume.backbone, options=SpeakOptions(head_dtype=dtype))
        heads[dtype] = speaker
    try:
        for step in range(len(o["ode_in"])):
            args = (torch.from_numpy(o["ode_in"][step:step + 1]), torch.tensor(0.0),
                    torch.from_numpy(o["hidden"][step][0:1]), torch.from_numpy(o["hidden"][step][1:2]),
                    scheduled_cfg(flow.acoustic_cfg, 0.0, flow.cfg_schedule), flow.duration_cfg)
            want, got = (heads[d].acoustic.velocity(*args) for d in ("f32", "bf16"))
            assert got.dtype == torch.float32 and relative(got.numpy(), want.numpy()) <= 3e-2, step
        rows = iter(hume.noise)
        assert len(heads["bf16"].say(TEXT, noise=lambda n: next(rows)).wav) > 0
    finally:
        for speaker in heads.values():
            speaker.close()


def test_gray_code_reads_every_class() -> None:
    values = torch.arange(64)
    gray = values ^ (values >> 1)
    bits = torch.stack([(gray >> (5 - i)) & 1 for i in range(6)], dim=-1).float() * 2 - 1
    assert gray_to_time(bits, 64).tolist() == values.tolist()
    assert gray_to_time(bits * 3.0, 64).tolist() == values.tolist()  # beyond ±2: still the nearest bit
    assert gray_to_time(bits, 40).max() == 39  # classes past num_time_classes are clamped


@pytest.mark.parametrize("outtype", ["q8_0", "q4_k_m"])
def test_quantized_backbones_speak(hume: Hume, outtype: str, tmp_path: Path) -> None:
    """The same pipeline on a quantized backbone: its distance from the F32 speech is reported; Q8_0's must stay below
    what other noise gives."""
    convert([str(hume.out / "tada"), "-o", str(tmp_path / "tada.gguf"), "--outtype", outtype])
    shutil.copy(hume.backbone.with_name("tada-codec.gguf"), tmp_path / "tada-codec.gguf")
    results = {}
    for name, path, seed in (("f32", hume.backbone, 5), (outtype, tmp_path / "tada.gguf", 5), ("other", hume.backbone, 6)):
        rows = iter(clipped_noise(seed))
        with Speaker(path) as speaker:
            results[name] = speaker.say(TEXT, noise=lambda n: next(rows)).wav
    quantized = log_mel_distance(results[outtype], results["f32"], 24000)
    other = log_mel_distance(results["other"], results["f32"], 24000)
    print(f"log-mel distance to the F32 backbone's speech: {outtype} {quantized:.3f}, other noise {other:.3f}")
    assert len(results[outtype]) > 0 and np.isfinite(quantized)
    if outtype == "q8_0":
        assert quantized < other


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as f:
        assert f.getnchannels() == 1 and f.getsampwidth() == 2
        return np.frombuffer(f.readframes(f.getnframes()), "<i2"), f.getframerate()


def test_cli_writes_a_wav_and_a_seed_repeats_it(hume: Hume, tmp_path: Path) -> None:
    runner = CliRunner()
    outs = [tmp_path / "a.wav", tmp_path / "b.wav"]
    for out in outs:
        result = runner.invoke(main, ["speak", str(hume.backbone), "--text", TEXT, "-o", str(out), "--seed", "7",
                                      "--json"])
        assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    (a, rate), (b, _) = read_wav(outs[0]), read_wav(outs[1])
    assert rate == 24000 and abs(len(a) / 24000 - summary["seconds"]) < 1e-3 and np.array_equal(a, b)
    assert summary["tokens"] == 21


def one_line(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mt: error: "), result.output
    return lines[0]


def test_bad_inputs_are_one_line_and_leave_no_wav(hume: Hume, tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    speak = ["speak", "--text", TEXT, "-o", str(out)]
    folder = hume.backbone.parent
    line = one_line([*speak[:1], str(folder / "tada-acoustic.gguf"), *speak[1:]])
    assert "not a TADA backbone" in line  # wrong file given as the backbone (its own -acoustic beside it is missing)
    lone = tmp_path / "lone" / "tada.gguf"
    lone.parent.mkdir()
    shutil.copy(hume.backbone, lone)
    line = one_line(["speak", str(lone), *speak[1:]])
    assert "looked for tada-acoustic.gguf beside tada.gguf" in line and "--acoustic" in line
    shutil.copy(folder / "tada-acoustic.gguf", lone.parent)
    line = one_line(["speak", str(lone), *speak[1:]])
    assert "looked for tada-codec.gguf" in line and "--codec" in line
    assert "the text is empty" in one_line(["speak", str(hume.backbone), "--text", "  ", "-o", str(out)])
    wrong = tmp_path / "wide.npz"
    np.savez(wrong, token_values=np.zeros((3, 32), np.float32), token_positions=np.arange(3), audio_len=4800.0,
             sample_rate=24000, text=np.array("a b c"))
    line = one_line([*speak[:1], str(hume.backbone), *speak[1:], "--voice", str(wrong)])
    assert "[3, 32]" in line and "16 wide" in line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "mt-partial" in p.name]


def test_a_language_tada_does_not_cover_is_a_warning(hume: Hume, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["speak", str(hume.backbone), "--text", "Привет, мир", "-o",
                                       str(tmp_path / "ru.wav"), "--seed", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "mt: warning: the text is written in Cyrillic script" in result.output
    assert (tmp_path / "ru.wav").is_file()
