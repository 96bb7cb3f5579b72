"""TADA's acoustic modules from the companion GGUF (`<stem>-acoustic.gguf`): what the backbone's input embedding adds
to the token embedding, and the VibeVoice flow-matching head solved from noise to an acoustic vector and two
Gray-coded durations.

The algorithm follows HumeAI's TadaForCausalLM (`forward_one_step`, `_compute_velocity`, `_scheduled_cfg`,
`_build_time_schedule`, `_solve_flow_matching`) and VibeVoice's diffusion head; float32 torch on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.functional import linear, silu

from mt.speak.weights import GGUFWeights

ARCH = "tada"
HEAD = "prediction_head"


@dataclass(frozen=True)
class FlowOptions:
    """HumeAI's InferenceOptions that shape one acoustic step (its defaults)."""

    flow_steps: int = 10
    acoustic_cfg: float = 1.6
    duration_cfg: float = 1.0
    cfg_schedule: str = "cosine"  # constant | linear | cosine
    time_schedule: str = "logsnr"  # uniform | cosine | logsnr
    noise_temperature: float = 0.9


def time_schedule(steps: int, schedule: str) -> torch.Tensor:
    """The ODE's [steps + 1] flow times from 0 to 1."""
    if schedule == "cosine":
        return 0.5 * (1 - torch.cos(math.pi * torch.linspace(0, 1, steps + 1)))
    if schedule == "logsnr":  # uniform in log-SNR between +5 and -5, SNR(t) = (1 - t)^2 / t^2
        t = torch.sigmoid(-torch.linspace(5.0, -5.0, steps + 1) / 2)
        t[0], t[-1] = 0.0, 1.0
        return t
    return torch.linspace(0, 1, steps + 1)


def scheduled_cfg(scale: float, t: float, schedule: str) -> float:
    """The guidance scale at flow time t: `scale` at t = 0 decaying to 1 at t = 1 (linear or cosine)."""
    if schedule == "constant" or scale == 1.0:
        return scale
    if schedule == "linear":
        return 1.0 + (scale - 1.0) * (1.0 - t)
    if schedule == "cosine":
        return 1.0 + (scale - 1.0) * 0.5 * (1.0 + math.cos(math.pi * t))
    return scale


def gray_to_time(bits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Durations from Gray-code bits in {-1, 1} (most significant first). A bit is read as its nearest of 0 and 1
    (HumeAI's decoder reads a value past ±2 as 2 or -1 and indexes out of range); the result is clamped to the
    classes the embeddings have."""
    binary = ((bits + 1.0) / 2.0).round().clamp(0, 1).long()
    n = bits.shape[-1]
    gray = sum(binary[..., n - 1 - i] << i for i in range(n))
    value = gray
    shift = 1
    while shift < 32:
        value = value ^ (value >> shift)
        shift <<= 1
    return value.clamp(max=num_classes - 1)


def _rms_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """In float32 whatever x's dtype, as VibeVoice's RMSNorm."""
    x32 = x.float()
    out = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return out * weight if weight is not None else out


def _timestep_features(t: torch.Tensor, size: int, max_period: float = 10000.0) -> torch.Tensor:
    half = size // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


HEAD_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


class Acoustic:
    """The companion file's tensors and numbers. `head_dtype` (f32, bf16): what the flow head computes in; bf16 reads
    half the bytes per Euler step (the head is bound by reading its weights), and is faster still where the CPU has
    bf16 dot products (AVX512-BF16, AMX); the ODE's sum stays float32."""

    def __init__(self, path: Path, head_dtype: str = "f32") -> None:
        w = GGUFWeights(path).require_arch(ARCH, "a TADA acoustic file",
                                           "pass the <stem>-acoustic.gguf that mt convert wrote beside the TADA GGUF")
        self.path = Path(path)
        self.hidden = int(w.needed(f"{ARCH}.embedding_length"))
        self.acoustic_dim = int(w.needed(f"{ARCH}.acoustic_dim"))
        self.num_time_classes = int(w.needed(f"{ARCH}.num_time_classes"))
        self.num_time_bits = int(w.needed(f"{ARCH}.num_time_bits"))
        self.shift = int(w.needed(f"{ARCH}.shift_acoustic"))
        self.mean = float(w.needed(f"{ARCH}.acoustic_mean"))
        self.std = float(w.needed(f"{ARCH}.acoustic_std"))
        self.head_layers = int(w.needed(f"{ARCH}.head_layers"))
        self.head_eps = float(w.needed(f"{ARCH}.head_rms_norm_eps"))
        self.frequency_size = int(w.needed(f"{ARCH}.head_timestep_frequency_size"))
        self.prompt_prefix = str(w.needed(f"{ARCH}.prompt_prefix"))
        self.token_ids = {role: int(w.needed(f"{ARCH}.token.{role}_id")) for role in ("pad", "start_header", "end_header", "eot")}
        self.t = {name: w.tensor(name) for name in w.infos}
        self.dtype = HEAD_DTYPES[head_dtype]
        self.h = {name: t.to(self.dtype) for name, t in self.t.items() if name.startswith((f"{HEAD}.", "bottleneck_proj."))}

    @property
    def latent_size(self) -> int:
        return self.acoustic_dim + 2 * self.num_time_bits

    def input_extra(self, acoustic: torch.Tensor, mask: torch.Tensor, before: torch.Tensor,
                    after: torch.Tensor) -> list[torch.Tensor]:
        """The terms forward_one_step adds to the token embedding, in its order: acoustic_proj(acoustic),
        acoustic_mask_emb(mask), time_start_embed(before), time_end_embed(after)."""
        t = self.t
        return [linear(acoustic, t["acoustic_proj.weight"], t["acoustic_proj.bias"]), t["acoustic_mask_emb.weight"][mask],
                t["time_start_embed.weight"][before], t["time_end_embed.weight"][after]]

    def condition(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.dtype)
        if "bottleneck_proj.weight" not in self.h:
            return hidden
        return linear(hidden, self.h["bottleneck_proj.weight"], self.h.get("bottleneck_proj.bias"))

    def head(self, z: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The head's velocity (float32) for latents `z` [b, latent] at flow times `t` [b], given bottleneck outputs."""
        w = self.h
        x = linear(z.to(self.dtype), w[f"{HEAD}.noisy_images_proj.weight"])
        features = _timestep_features(t, self.frequency_size).to(self.dtype)
        t_emb = linear(silu(linear(features, w[f"{HEAD}.t_embedder.mlp.0.weight"])), w[f"{HEAD}.t_embedder.mlp.2.weight"])
        c = linear(condition, w[f"{HEAD}.cond_proj.weight"]) + t_emb
        for i in range(self.head_layers):
            p = f"{HEAD}.layers.{i}"
            shift, scale, gate = linear(silu(c), w[f"{p}.adaLN_modulation.1.weight"]).chunk(3, dim=-1)
            h = _rms_norm(x, self.head_eps, w[f"{p}.norm.weight"]) * (1 + scale) + shift
            x = x + gate * linear(silu(linear(h, w[f"{p}.ffn.gate_proj.weight"])) * linear(h, w[f"{p}.ffn.up_proj.weight"]),
                                  w[f"{p}.ffn.down_proj.weight"])
        shift, scale = linear(silu(c), w[f"{HEAD}.final_layer.adaLN_modulation.1.weight"]).chunk(2, dim=-1)
        return linear(_rms_norm(x, self.head_eps) * (1 + scale) + shift, w[f"{HEAD}.final_layer.linear.weight"]).float()

    def velocity(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, neg_cond: torch.Tensor,
                 acoustic_cfg: float, duration_cfg: float) -> torch.Tensor:
        """Classifier-free guidance applied separately to the acoustic dims and the duration dims."""
        if acoustic_cfg == 1.0:
            return self.head(z, t.repeat(z.shape[0]), self.condition(cond))
        both = self.head(torch.cat([z, z]), t.repeat(2 * z.shape[0]), self.condition(torch.cat([cond, neg_cond])))
        pos, neg = torch.chunk(both, 2, dim=0)
        a = self.acoustic_dim
        return torch.cat([(neg + acoustic_cfg * (pos - neg))[..., :a], (neg + duration_cfg * (pos - neg))[..., a:]], dim=-1)

    def solve(self, noise: torch.Tensor, cond: torch.Tensor, neg_cond: torch.Tensor, options: FlowOptions) -> torch.Tensor:
        """Euler steps of the flow from `noise` (already scaled by the temperature) to a latent."""
        t_span = time_schedule(options.flow_steps, options.time_schedule)
        z, t_now = noise, t_span[0]
        for i in range(1, len(t_span)):
            now = t_now.item()
            a_cfg = scheduled_cfg(options.acoustic_cfg, now, options.cfg_schedule)
            d_cfg = scheduled_cfg(options.duration_cfg, now, options.cfg_schedule)
            z = z + (t_span[i] - t_now) * self.velocity(z, t_now, cond, neg_cond, a_cfg, d_cfg)
            t_now = t_span[i]
        return z

    def durations(self, latent: torch.Tensor) -> tuple[int, int]:
        """(frames before, frames after) of the token, decoded from the latent's time bits."""
        bits = latent[..., self.acoustic_dim:]
        n = self.num_time_bits
        return int(gray_to_time(bits[..., :n], self.num_time_classes)), int(gray_to_time(bits[..., n:], self.num_time_classes))

    def smallest_bit_margin(self, latent: torch.Tensor) -> float:
        """How near the time bits came to a rounding boundary (|bit| near 0): a float-level difference there
        flips a duration."""
        return float(np.abs(latent[..., self.acoustic_dim:].numpy()).min())
