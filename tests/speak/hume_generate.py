"""Runs inside the hume-tada virtual environment (tests/tada_oracle.py), never in mt's: HumeAI's own TadaForCausalLM
and Decoder, tiny and seeded, generate speech with injected noise; everything the parity test compares is saved.

    python hume_generate.py SPEC.json OUT_DIR

SPEC: {"tokenizer": dir, "config": TadaConfig kwargs, "decoder": DecoderConfig kwargs, "seed": int, "init_std": float,
       "conv_gain": the weight-normalised convolutions' norms (about 1 by default),
       "text": str, "noise": path of a float32 .npy [steps, acoustic_dim + 2 * time_bits], "options": InferenceOptions
       kwargs, "voice_text": optional transcript of a random voice prompt (saved as OUT_DIR/voice.pt),
       "threads": optional torch threads, "repeat": runs of generate, the last one recorded and timed (default 1)}
OUT_DIR gets tada/ (save_pretrained of the LM), decoder/ (save_pretrained of the codec decoder) and oracle.npz.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from tada.modules.decoder import Decoder, DecoderConfig
from tada.modules.encoder import EncoderOutput
from tada.modules.tada import InferenceOptions, TadaConfig, TadaForCausalLM


def reinitialise(module: torch.nn.Module, seed: int, std: float, gain: float = 1.0) -> None:
    """Every parameter drawn from one seeded generator: HumeAI zero-initialises adaLN, the head's final layer and the
    mask embedding, which would leave those paths untested. Norm weights and the norms g of weight-normalised
    convolutions (parametrizations.weight.original0) are drawn around 1 (the latter times `gain`)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            noise = torch.randn(param.shape, generator=gen) * std
            if name.endswith("original0"):
                param.copy_(gain * (1.0 + noise))
            elif name.endswith(("norm.weight", "alpha")) or ".norm." in name:
                param.copy_(1.0 + noise)
            else:
                param.copy_(noise)


class Recorder:
    """Patches torch.randn with the given noise and keeps what each step computed."""

    def __init__(self, model: TadaForCausalLM, noise: np.ndarray) -> None:
        self.noise = torch.from_numpy(noise)
        self.draws = 0
        self.hidden: list[np.ndarray] = []
        self.ode_in: list[np.ndarray] = []
        self.ode_out: list[np.ndarray] = []
        self.velocity: list[np.ndarray] = []
        self.decoder_in: list[np.ndarray] = []
        self._wrap(model)

    def reset(self) -> None:
        self.draws = 0
        for kept in (self.hidden, self.ode_in, self.ode_out, self.velocity, self.decoder_in):
            kept.clear()

    def randn(self, *shape: int) -> torch.Tensor:
        """Two draws per step: the acoustic part, then the time part, as _generate asks for them."""
        row, part = divmod(self.draws, 2)
        self.draws += 1
        acoustic_dim = shape[-1] if part == 0 else self.noise.shape[1] - shape[-1]
        values = self.noise[row, :acoustic_dim] if part == 0 else self.noise[row, acoustic_dim:]
        return values.reshape(shape).clone()

    def _wrap(self, model: TadaForCausalLM) -> None:
        step, solve, velocity, decode = (model.forward_one_step, model._solve_flow_matching, model._compute_velocity,
                                         model.decoder.generate)

        def forward_one_step(*args, **kwargs):
            out = step(*args, **kwargs)
            self.hidden.append(out.hidden_states[-1][:, -1].numpy().copy())
            return out

        def solve_flow_matching(*args, **kwargs):
            self.ode_in.append(kwargs["speech"].numpy().copy())
            out = solve(*args, **kwargs)
            self.ode_out.append(out.numpy().copy())
            return out

        def compute_velocity(*args, **kwargs):
            out = velocity(*args, **kwargs)
            self.velocity.append(out.numpy().copy())
            return out

        def decoder_generate(encoded, **kwargs):
            self.decoder_in.append(encoded[0].numpy().copy())
            return decode(encoded, **kwargs)

        model.forward_one_step = forward_one_step
        model._solve_flow_matching = solve_flow_matching
        model._compute_velocity = compute_velocity
        model.decoder.generate = decoder_generate


def random_voice(model: TadaForCausalLM, text: str, acoustic_dim: int, seed: int, path: Path) -> EncoderOutput:
    """What the encoder would give for a recording of `text`: a vector per transcript token, ending 2 to 6 frames
    after the one before; saved with EncoderOutput.save."""
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    gen = torch.Generator().manual_seed(seed)
    positions = torch.cumsum(torch.randint(2, 7, (len(ids),), generator=gen), 0)[None]
    audio_len = torch.tensor([float((int(positions[0, -1]) + 4) * 480)])
    prompt = EncoderOutput(audio=torch.zeros(1, int(audio_len[0])), audio_len=audio_len, text=[text],
                           token_positions=positions, token_values=0.5 * torch.randn(1, len(ids), acoustic_dim, generator=gen),
                           text_tokens=torch.tensor([ids]), text_tokens_len=torch.tensor([len(ids)]))
    prompt.save(str(path))
    return EncoderOutput.load(str(path))


def main(spec_path: str, out_dir: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(out_dir)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = TadaForCausalLM(TadaConfig(**spec["config"])).eval()
    reinitialise(model, spec["seed"], spec["init_std"])
    model.save_pretrained(out / "tada", safe_serialization=True)
    decoder = Decoder(DecoderConfig(**spec["decoder"])).eval()
    reinitialise(decoder, spec["seed"] + 1, spec["init_std"], spec.get("conv_gain", 1.0))
    decoder.save_pretrained(out / "decoder", safe_serialization=True)
    model._decoder = decoder
    model._tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])

    recorder = Recorder(model, np.load(spec["noise"]).astype(np.float32))
    acoustic_dim = spec["config"]["acoustic_dim"]
    prompt = random_voice(model, spec["voice_text"], acoustic_dim, spec["seed"] + 2, out / "voice.pt") \
        if spec.get("voice_text") else EncoderOutput.empty(torch.device("cpu"), token_dim=acoustic_dim)
    real_randn = torch.randn
    torch.randn = recorder.randn
    try:
        for _ in range(spec.get("repeat", 1)):
            recorder.reset()
            began = time.perf_counter()
            with torch.no_grad():
                result = model.generate(prompt=prompt, text=spec["text"],
                                        inference_options=InferenceOptions(**spec["options"]))
    finally:
        torch.randn = real_randn
    seconds = time.perf_counter() - began
    np.savez(out / "oracle.npz", input_ids=result.input_text_ids[0].numpy(), hidden=np.stack(recorder.hidden),
             ode_in=np.concatenate(recorder.ode_in), ode_out=np.concatenate(recorder.ode_out),
             velocity=np.stack(recorder.velocity), time_before=result.time_before[0].numpy(),
             acoustic=result.acoustic_features[0].numpy(), decoder_in=recorder.decoder_in[0],
             wav=result.audio[0].numpy(), seconds=seconds)


if __name__ == "__main__":
    main(*sys.argv[1:])
