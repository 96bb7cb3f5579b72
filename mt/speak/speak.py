"""`mt speak`: text -> 24 kHz speech from mt's three TADA files, llama.cpp running the backbone.

One token per step, as HumeAI's TadaForCausalLM.generate/_generate do it: the backbone reads the token's embedding plus
the acoustic vector and durations of the token `shift_acoustic` steps back; its hidden state conditions the flow head,
which turns noise into the next acoustic vector and its Gray-coded durations; guidance runs a second sequence in
which every non-structural token is the pad token. The acoustic vectors, spread over frames by their durations, go
through the codec decoder.
"""

from __future__ import annotations

import time
import unicodedata
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mt.errors import MtError
from mt.io.atomic import atomic_path, check_output
from mt.speak.acoustic import Acoustic, FlowOptions
from mt.speak.backbone import Backbone, check_backbone
from mt.speak.codec import Codec
from mt.speak.text import normalize_text
from mt.speak.voice import FRAME_RATE, Voice, empty_voice, load_voice
from mt.speak.weights import GGUFWeights

TRANSITION_STEPS = 5  # generate's num_transition_steps: the voice prompt's last tokens are spoken again
NEGATIVE_CONDITIONS = ("step", "zero")  # HumeAI's "negative_step_output" and "zero"
# scripts of the languages tada-3b-ml was trained on (en, ja, de, fr, es, zh, ar, it, pl, pt)
COVERED_SCRIPTS = ("LATIN", "CJK", "HIRAGANA", "KATAKANA", "ARABIC", "IDEOGRAPHIC", "FULLWIDTH", "HALFWIDTH")

Noise = Callable[[int], np.ndarray]  # one draw of standard normal noise of the given size
Durations = Callable[[int, torch.Tensor], tuple[int, int]]  # (step, the flow's latent) -> frames before, after
State = tuple[np.ndarray, int, int, int]  # what a step adds to its token: acoustic vector, mask, frames before, after


class SpeakError(MtError):
    """The text, the files or the voice prompt cannot be spoken."""


@dataclass(frozen=True)
class SpeakOptions:
    flow: FlowOptions = FlowOptions()
    negative: str = "step"
    normalize: bool = True
    threads: int | None = None
    f32_cache: bool = False  # llama.cpp's KV cache in F32 (parity checks) instead of F16
    head_dtype: str = "f32"  # f32 | bf16: what the flow head computes in (mt.speak.acoustic.Acoustic)


@dataclass
class Speech:
    wav: np.ndarray  # float32 samples in [-1, 1]
    sample_rate: int
    input_ids: list[int]
    hidden: list[np.ndarray] = field(default_factory=list)  # per step: [sequences, hidden] final-norm states
    latents: list[np.ndarray] = field(default_factory=list)  # per step: the flow's output
    frames: np.ndarray | None = None  # what the codec decoded: [frames, acoustic_dim]
    time_before: np.ndarray | None = None
    smallest_margin: float = float("inf")  # the time bit nearest a rounding boundary

    @property
    def seconds(self) -> float:
        return len(self.wav) / self.sample_rate


@dataclass(frozen=True)
class Prompt:
    """What generate hands _generate: the ids and, per prompt position, acoustic vector, mask and durations."""

    input_ids: list[int]
    acoustic: np.ndarray  # [n, acoustic_dim]
    masks: np.ndarray  # [n]
    before: np.ndarray  # [n]
    after: np.ndarray  # [n]


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    start_header: int
    end_header: int
    eot: int
    pad: int

    @property
    def structural(self) -> tuple[int, int, int]:
        return self.start_header, self.end_header, self.eot


class Speaker:
    """The three files, opened once; `say` may run many times."""

    def __init__(self, backbone: Path, acoustic: Path | None = None, codec: Path | None = None,
                 options: SpeakOptions = SpeakOptions(), n_ctx: int = 2048) -> None:
        if not Path(backbone).is_file():
            raise SpeakError(f"{backbone} does not exist", "pass the TADA backbone GGUF that mt convert wrote")
        weights = check_backbone(GGUFWeights(Path(backbone)))
        acoustic, codec = companion_paths(Path(backbone), acoustic, codec)
        self.options = options
        self.acoustic = Acoustic(acoustic, options.head_dtype)
        self.codec = Codec(codec)
        if self.codec.embed_dim != self.acoustic.acoustic_dim:
            raise SpeakError(f"the codec {codec} decodes {self.codec.embed_dim}-wide frames, the model makes "
                             f"{self.acoustic.acoustic_dim}-wide ones", "pass the codec decoder of this model")
        n_seq = 2 if options.negative == "step" and options.flow.acoustic_cfg != 1.0 else 1
        self.backbone = Backbone(weights, n_ctx, n_seq, options.threads, options.f32_cache)
        if self.backbone.n_embd != self.acoustic.hidden:
            self.backbone.close()
            raise SpeakError(f"{acoustic} belongs to a model of hidden size {self.acoustic.hidden}, the backbone's is "
                             f"{self.backbone.n_embd}", "pass the acoustic file mt convert wrote with this backbone")
        self.n_ctx = n_ctx
        self.ids = self._special_ids()

    def close(self) -> None:
        self.backbone.close()

    def __enter__(self) -> "Speaker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _special_ids(self) -> SpecialIds:
        """The ids the companion names (the checkpoint's tokenizer numbered them), BOS and EOS from the backbone."""
        w = self.backbone.weights
        n_vocab = len(w.needed("tokenizer.ggml.tokens"))
        ids = SpecialIds(bos=int(w.needed("tokenizer.ggml.bos_token_id")), eos=int(w.needed("tokenizer.ggml.eos_token_id")),
                         **self.acoustic.token_ids)
        if max(vars(ids).values()) >= n_vocab:
            raise SpeakError(f"{self.acoustic.path} names token ids beyond the backbone's {n_vocab} tokens",
                             "pass the acoustic file mt convert wrote with this backbone")
        return ids

    def say(self, text: str, voice: Voice | None = None, noise: Noise | None = None, seed: int | None = None,
            durations: Durations | None = None) -> Speech:
        """`noise`: the flow's starting noise per step (default: seeded with `seed`); `durations`: how a latent's time
        bits become frames (default: the Gray code; a parity check may substitute a reference's where a bit sits on
        a rounding boundary)."""
        if not text.strip():
            raise SpeakError("the text is empty", "give the words to speak with --text")
        voice = (voice or empty_voice(self.acoustic.acoustic_dim)).check(self.acoustic.acoustic_dim)
        if noise is None:
            rng = np.random.default_rng(seed)
            noise = lambda n: rng.standard_normal(n).astype(np.float32)  # noqa: E731
        text = normalize_text(text) if self.options.normalize else text
        prompt = self._prompt(text, voice)
        if len(prompt.input_ids) > self.n_ctx:
            raise SpeakError(f"the text and voice prompt make {len(prompt.input_ids)} tokens, more than {self.n_ctx}",
                             "speak a shorter text")
        with torch.no_grad():
            return self._generate(prompt, noise, durations or (lambda step, latent: self.acoustic.durations(latent)))

    def _prompt(self, text: str, voice: Voice) -> Prompt:
        """generate's preparation: BOS, the system/assistant header, the voice's transcript and the text, `shift` EOTs;
        the voice's acoustic vectors and durations under its transcript tokens."""
        a, ids = self.acoustic, self.ids
        transcript = self.backbone.tokenize(voice.text, special=False) if voice.text else []
        n_voice = len(voice.positions)
        if voice.text and len(transcript) != n_voice:
            raise SpeakError(f"the voice prompt's transcript is {len(transcript)} tokens, but it holds {n_voice} acoustic "
                             "vectors", "encode the voice prompt again with its transcript")
        text_tokens = transcript + self.backbone.tokenize(text, special=False)
        positions = voice.positions.copy()
        if len(text_tokens) < n_voice:
            positions[len(text_tokens)] = voice.frames
        gaps = np.clip(positions - np.concatenate([[1], positions[:-1]]), 0, a.num_time_classes - 1) if n_voice else positions
        gaps = np.concatenate([[0], gaps]).astype(np.int64)
        prefix = self.backbone.tokenize(a.prompt_prefix)
        n = len(prefix)
        input_ids = [ids.bos, *prefix, *text_tokens, *[ids.eot] * a.shift]
        keep = len(voice.values) + n - TRANSITION_STEPS

        def prefixed(values: np.ndarray) -> np.ndarray:
            return np.concatenate([np.zeros((n, *values.shape[1:]), values.dtype), values])[:max(keep, 0)]

        masks = prefixed(np.ones(n_voice, np.int64))
        return Prompt(self._padded(input_ids, keep), prefixed(voice.values.astype(np.float32)),
                      np.concatenate([masks[1:], [1]]).astype(np.int64), prefixed(gaps[:-1]), prefixed(gaps[1:]))

    def _padded(self, input_ids: list[int], prompt_len: int) -> list[int]:
        """The voice's transcript replaced by the pad token (its headers, BOS, EOS and EOTs kept): the prompt speaks
        through its acoustics, not its words."""
        ids, out, in_header = self.ids, list(input_ids), False
        for t in range(min(max(prompt_len, 0), len(out))):
            token = out[t]
            if token == ids.start_header:
                in_header = True
            elif token == ids.end_header:
                in_header = False
            elif not in_header and token not in (ids.eot, ids.bos, ids.eos):
                out[t] = ids.pad
        return out

    def _embeddings(self, token_ids: list[int], acoustic: np.ndarray, masks: np.ndarray, before: np.ndarray,
                    after: np.ndarray) -> np.ndarray:
        rows = torch.from_numpy(self.backbone.token_rows(token_ids))
        terms = self.acoustic.input_extra(torch.from_numpy(np.asarray(acoustic, np.float32)),
                                          torch.from_numpy(np.asarray(masks, np.int64)),
                                          torch.from_numpy(np.asarray(before, np.int64)),
                                          torch.from_numpy(np.asarray(after, np.int64)))
        for term in terms:
            rows = rows + term
        return rows.numpy()

    def _negative_ids(self, token_ids: list[int]) -> list[int]:
        return [t if t in self.ids.structural else self.ids.pad for t in token_ids]

    def _generate(self, p: Prompt, noise: Noise, durations: Durations) -> Speech:
        a, opts = self.acoustic, self.options
        self.backbone.reset()
        speech = Speech(np.zeros(0, np.float32), self.codec.sample_rate, p.input_ids)
        state: State = (np.zeros(a.acoustic_dim, np.float32), 0, 0, 0)
        frames: list[np.ndarray] = []
        befores: list[int] = []
        start = self._prefill_length(p)
        neg_cond = torch.zeros(1, a.hidden)
        if start:
            state = self._prefill(p, start, frames, befores)
        for step in range(start, len(p.input_ids)):
            hidden = self._hidden(p.input_ids[step], state, step)
            speech.hidden.append(np.concatenate(hidden))
            cond = torch.from_numpy(hidden[0])
            if len(hidden) == 2:
                neg_cond = torch.from_numpy(hidden[1])
            z = torch.from_numpy(noise(a.latent_size)[None]) * opts.flow.noise_temperature
            latent = a.solve(z, cond, neg_cond, opts.flow)
            speech.latents.append(latent[0].numpy().copy())
            speech.smallest_margin = min(speech.smallest_margin, a.smallest_bit_margin(latent))
            if step >= a.shift:
                state = self._next_state(p, step, latent[0], durations)
                frames.append(state[0])
                befores.append(state[2])
        if befores:
            befores.append(befores[-1])
        return self._decode(speech, p, frames, befores)

    def _hidden(self, token: int, state: State, step: int) -> list[np.ndarray]:
        """The backbone's final-norm hidden state at `step` for the text and, with guidance, its negative sequence."""
        vec, mask, before, after = state
        ids = [token] + self._negative_ids([token])[: self.backbone.n_seq - 1]
        return self.backbone.forward([self._embeddings([i], vec[None], [mask], [before], [after]) for i in ids], step)

    def _next_state(self, p: Prompt, step: int, latent: torch.Tensor, durations: Durations) -> State:
        """What the token `shift` steps on reads: the prompt's vector and durations while the prompt lasts, then the
        flow's output and its decoded durations."""
        a, k = self.acoustic, step - self.acoustic.shift
        vec, mask = (p.acoustic[k], int(p.masks[k])) if k < len(p.acoustic) else (latent[:a.acoustic_dim].numpy(), 1)
        before, after = (int(p.before[k + 1]), int(p.after[k + 1])) if k < len(p.before) - 1 else durations(step, latent)
        return vec, mask, before, after

    def _prefill_length(self, p: Prompt) -> int:
        shift, length = self.acoustic.shift, len(p.input_ids)
        n_ac = min(length - shift - 1, len(p.acoustic) - 1)
        n_t = min(length - shift - 1, len(p.before) - 1)
        most = min(n_ac, n_t, max(0, len(p.before) - 2)) if n_ac > 0 and n_t > 0 else 0
        return min(length, shift + most + 1) if most > 0 else 0

    def _prefill(self, p: Prompt, n: int, frames: list[np.ndarray], befores: list[int]) -> State:
        """The voice prompt's positions in one batch (both sequences alike, as HumeAI's prefill); the state after it."""
        a, shift = self.acoustic, self.acoustic.shift
        acoustic = np.zeros((n, a.acoustic_dim), np.float32)
        masks, before, after = (np.zeros(n, np.int64) for _ in range(3))
        k = min(n - shift - 1, len(p.acoustic))
        acoustic[shift + 1:shift + 1 + k], masks[shift + 1:shift + 1 + k] = p.acoustic[:k], p.masks[:k]
        k = min(n - shift - 1, len(p.before) - 1)
        before[shift + 1:shift + 1 + k], after[shift + 1:shift + 1 + k] = p.before[1:1 + k], p.after[1:1 + k]
        embeds = self._embeddings(p.input_ids[:n], acoustic, masks, before, after)
        self.backbone.forward([embeds] * self.backbone.n_seq, 0)
        n_frames = n - shift
        frames.extend(p.acoustic[i] for i in range(n_frames))
        befores.extend(int(p.before[i + 1]) for i in range(n_frames))
        return p.acoustic[n_frames - 1], int(p.masks[n_frames - 1]), int(p.before[n_frames]), int(p.after[n_frames])

    def _decode(self, speech: Speech, p: Prompt, frames: list[np.ndarray], befores: list[int]) -> Speech:
        """generate's tail: the vectors denormalised, the prompt's dropped, each placed after its silent frames."""
        a = self.acoustic
        first = len(p.acoustic) + TRANSITION_STEPS - 1
        encoded = [f * a.std + a.mean for f in frames[first:]]
        before = np.asarray(befores[first:first + len(encoded) + 1], np.int64)
        speech.time_before = before
        if len(before) == 0:
            speech.frames = np.zeros((0, a.acoustic_dim), np.float32)
            return speech
        rows: list[np.ndarray] = []
        for vec, gap in zip(encoded, before):
            rows.extend([np.zeros(a.acoustic_dim, np.float32)] * max(int(gap) - 1, 0))
            rows.append(np.asarray(vec, np.float32))
        rows.extend([np.zeros(a.acoustic_dim, np.float32)] * int(before[-1]))
        speech.frames = np.stack(rows) if rows else np.zeros((0, a.acoustic_dim), np.float32)
        wav = self.codec.decode(torch.from_numpy(speech.frames)).numpy() if rows else np.zeros(0, np.float32)
        speech.wav = wav[int(self.codec.sample_rate * int(before[0]) / FRAME_RATE):]
        return speech


def companion_paths(backbone: Path, acoustic: Path | None, codec: Path | None) -> tuple[Path, Path]:
    """The acoustic and codec files: as given, else `<stem>-acoustic.gguf` and `<stem>-codec.gguf` beside the backbone."""
    found = []
    for given, suffix, what in ((acoustic, "-acoustic", "--acoustic"), (codec, "-codec", "--codec")):
        path = given or backbone.with_name(f"{backbone.stem}{suffix}.gguf")
        if not path.is_file():
            where = "" if given else f" (looked for {path.name} beside {backbone.name})"
            raise SpeakError(f"the TADA {suffix[1:]} file {path} is missing{where}", f"pass it with {what}")
        found.append(path)
    return found[0], found[1]


def uncovered_script(text: str) -> str | None:
    """The first script in `text` none of tada-3b-ml's languages is written in (Cyrillic, Greek, Hangul …), or None."""
    for char in text:
        if char.isalpha():
            name = unicodedata.name(char, "")
            if not name.startswith(COVERED_SCRIPTS):
                return name.split(" ")[0].title()
    return None


def write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM mono."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())


@dataclass
class SpeakResult:
    output: Path
    seconds: float
    sample_rate: int
    elapsed: float
    tokens: int

    @property
    def real_time_factor(self) -> float:
        return self.elapsed / self.seconds if self.seconds else float("inf")


def speak(backbone: Path, text: str, out: Path, *, acoustic: Path | None = None, codec: Path | None = None,
          voice: Path | None = None, options: SpeakOptions = SpeakOptions(), seed: int | None = None,
          force: bool = False) -> SpeakResult:
    """Synthesize `text` into the wav file `out` (written whole or not at all)."""
    check_output(Path(out), force)
    if not text.strip():
        raise SpeakError("the text is empty", "give the words to speak with --text")
    prompt = load_voice(voice) if voice is not None else None
    began = time.perf_counter()
    with Speaker(Path(backbone), acoustic, codec, options) as speaker:
        speech = speaker.say(text, prompt, seed=seed)
    with atomic_path(Path(out)) as tmp:
        write_wav(tmp, speech.wav, speech.sample_rate)
    return SpeakResult(Path(out), speech.seconds, speech.sample_rate, time.perf_counter() - began, len(speech.input_ids))
