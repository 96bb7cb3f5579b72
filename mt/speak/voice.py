"""Voice prompts: what TADA's encoder made of a short recording and its transcript, encoded once elsewhere.

Two forms are read:
- HumeAI's `EncoderOutput.save(path)` (a torch file of tensors, strings and numbers, loaded weights-only: no code
  runs from it);
- mt's `.npz`: `token_values` float32 [tokens, acoustic_dim] (the encoder's per-token acoustic vectors, normalised
  as TADA takes them), `token_positions` int [tokens] (the frame each transcript token ends at, 50 frames/s),
  `audio_len` (samples of the recording), `sample_rate`, `text` (the transcript).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mt.errors import MtError

FRAME_RATE = 50  # TADA's acoustic frames per second


class VoiceError(MtError):
    """A voice prompt cannot be read or does not fit the model."""


@dataclass(frozen=True)
class Voice:
    values: np.ndarray  # [tokens, acoustic_dim] float32
    positions: np.ndarray  # [tokens] int64
    audio_len: float
    sample_rate: int
    text: str

    @property
    def frames(self) -> int:
        """The recording's length in frames, as HumeAI's generate rounds it."""
        return math.ceil(self.audio_len / self.sample_rate * FRAME_RATE) if self.sample_rate else 0

    def check(self, acoustic_dim: int) -> "Voice":
        if self.values.ndim != 2 or self.values.shape[1] != acoustic_dim:
            raise VoiceError(f"the voice prompt's acoustic vectors have shape {list(self.values.shape)}, the model's are "
                             f"{acoustic_dim} wide", "encode the voice prompt with this model's codec")
        if self.positions.shape != (self.values.shape[0],):
            raise VoiceError(f"the voice prompt has {self.values.shape[0]} acoustic vectors but "
                             f"{self.positions.size} token positions", "encode the voice prompt again")
        return self


def empty_voice(acoustic_dim: int) -> Voice:
    """HumeAI's EncoderOutput.empty: no recording, no transcript."""
    return Voice(np.zeros((0, acoustic_dim), np.float32), np.zeros(0, np.int64), 0.0, 24000, "")


def load_voice(path: Path) -> Voice:
    path = Path(path)
    if not path.is_file():
        raise VoiceError(f"voice prompt {path} does not exist", "pass a .npz voice prompt or a saved EncoderOutput")
    try:
        return _from_npz(path) if path.suffix == ".npz" else _from_encoder_output(path)
    except VoiceError:
        raise
    except Exception as e:  # a file of another kind: numpy's, zipfile's or torch's own errors
        raise VoiceError(f"{path} is not a voice prompt ({type(e).__name__}: {e})",
                         "pass a .npz voice prompt or a saved EncoderOutput") from None


def _from_npz(path: Path) -> Voice:
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("token_values", "token_positions", "audio_len", "sample_rate", "text") if k not in data]
        if missing:
            raise VoiceError(f"voice prompt {path} lacks {', '.join(missing)}", "see docs/TADA.md for the .npz layout")
        return Voice(np.asarray(data["token_values"], np.float32), np.asarray(data["token_positions"], np.int64),
                     float(data["audio_len"]), int(data["sample_rate"]), str(data["text"]))


def _from_encoder_output(path: Path) -> Voice:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "token_values" not in state:
        raise VoiceError(f"{path} is not a saved EncoderOutput", "save it with EncoderOutput.save, or pass a .npz")
    text = state.get("text") or [""]
    return Voice(state["token_values"][0].float().numpy(), state["token_positions"][0].long().numpy(),
                 float(state["audio_len"].reshape(-1)[0]), int(state.get("sample_rate", 24000)), str(text[0]))
