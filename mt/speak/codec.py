"""TADA's codec decoder from its GGUF (`tada_codec`): acoustic frames -> a 24 kHz waveform.

HumeAI's tada/modules/decoder.py: decoder_proj, post-norm local-attention layers (RoPE from the stored table, the
"v2" block mask: a frame sees its own block and the one before, a block ending at each token frame), then a
DAC-style wave decoder (convolution, one upsampling block per stride of Snake + transposed convolution + three
residual units, Snake, convolution, tanh). Float32 torch on the CPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.nn.functional import conv1d, conv_transpose1d, gelu, layer_norm, linear

from mt.errors import GGUFError, MtError
from mt.speak.weights import GGUFWeights

ARCH = "tada_codec"
ATTN = "local_attention_decoder"
WAV = "wav_decoder.model"
RESIDUAL_DILATIONS = (1, 3, 9)


def block_mask(token_mask: torch.Tensor) -> torch.Tensor:
    """[T, T] True where frame i may not attend to frame j: blocks end at the token frames (mask 1), and a frame
    sees its own block and the previous one."""
    block = torch.cumsum(token_mask, dim=0) - token_mask
    same = block[None, :] == block[:, None]
    previous = block[None, :] == block[:, None] - 1
    return ~(same | previous)


def snake(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return x + (alpha + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)


class Codec:
    def __init__(self, path: Path) -> None:
        w = GGUFWeights(path).require_arch(ARCH, "a TADA codec decoder",
                                           "pass the GGUF that mt convert wrote from HumeAI/tada-codec's decoder folder")
        self.path = Path(path)
        self.embed_dim = int(w.needed(f"{ARCH}.embed_dim"))
        self.layers = int(w.needed(f"{ARCH}.num_attn_layers"))
        self.heads = int(w.needed(f"{ARCH}.num_attn_heads"))
        self.strides = [int(s) for s in w.needed(f"{ARCH}.strides")]
        self.eps = float(w.needed(f"{ARCH}.layer_norm_eps"))
        self.sample_rate = int(w.needed(f"{ARCH}.sample_rate"))
        block_attention = w.value(f"{ARCH}.block_attention", "v2")
        if block_attention != "v2":
            raise GGUFError(f"{path}: block attention {block_attention!r} is not the 'v2' HumeAI's decoder uses",
                            "convert HumeAI/tada-codec's decoder again")
        self.t = {name: w.tensor(name) for name in w.infos}

    @property
    def hop(self) -> int:
        """Samples per frame."""
        return math.prod(self.strides)

    @property
    def max_frames(self) -> int:
        return int(self.t[f"{ATTN}.layers.0.self_attn.rope_freqs"].shape[0])

    def decode(self, frames: torch.Tensor) -> torch.Tensor:
        """[T, embed_dim] frames (zero where no token sits) -> [T * hop] samples."""
        if frames.shape[0] > self.max_frames:
            raise MtError(f"the speech is {frames.shape[0]} frames long, more than the codec's {self.max_frames}",
                          "speak a shorter text, one sentence at a time")
        token_mask = (torch.linalg.vector_norm(frames, dim=-1) != 0).long()
        x = linear(frames, self.t["decoder_proj.weight"], self.t["decoder_proj.bias"])
        masked = block_mask(token_mask)
        for i in range(self.layers):
            x = self._layer(x, masked, f"{ATTN}.layers.{i}")
        x = self._norm(x, f"{ATTN}.final_norm")
        return self._wave(x.T[None])[0, 0]

    def _norm(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        return layer_norm(x, x.shape[-1:], self.t[f"{prefix}.weight"], self.t[f"{prefix}.bias"], self.eps)

    def _layer(self, x: torch.Tensor, masked: torch.Tensor, p: str) -> torch.Tensor:
        n, d = x.shape
        hd = d // self.heads
        qkv = linear(x, self.t[f"{p}.self_attn.qkv.weight"], self.t[f"{p}.self_attn.qkv.bias"])
        q, k, v = qkv.reshape(n, 3, self.heads, hd).permute(1, 2, 0, 3)
        rope = self.t[f"{p}.self_attn.rope_freqs"][:n]
        q, k = _rotate(q, rope), _rotate(k, rope)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(hd)
        weights = torch.softmax(scores.masked_fill(masked[None], float("-inf")), dim=-1)
        attended = torch.matmul(weights, v).transpose(0, 1).reshape(n, d)
        out = linear(attended, self.t[f"{p}.self_attn.out_proj.weight"], self.t[f"{p}.self_attn.out_proj.bias"])
        x = self._norm(x + out, f"{p}.self_attn.layer_norm")
        ffn = linear(gelu(linear(x, self.t[f"{p}.ffn.0.weight"], self.t[f"{p}.ffn.0.bias"])),
                     self.t[f"{p}.ffn.3.weight"], self.t[f"{p}.ffn.3.bias"])
        return self._norm(x + ffn, f"{p}.norm")

    def _conv(self, x: torch.Tensor, prefix: str, dilation: int = 1) -> torch.Tensor:
        weight = self.t[f"{prefix}.weight"]
        pad = (weight.shape[-1] - 1) * dilation // 2
        return conv1d(x, weight, self.t[f"{prefix}.bias"], padding=pad, dilation=dilation)

    def _wave(self, x: torch.Tensor) -> torch.Tensor:
        x = self._conv(x, f"{WAV}.0")
        for b, stride in enumerate(self.strides, start=1):
            p = f"{WAV}.{b}.block"
            x = snake(x, self.t[f"{p}.0.alpha"])
            x = conv_transpose1d(x, self.t[f"{p}.1.weight"], self.t[f"{p}.1.bias"], stride=stride,
                                 padding=math.ceil(stride / 2))
            for r, dilation in enumerate(RESIDUAL_DILATIONS, start=2):
                x = self._residual(x, f"{p}.{r}.block", dilation)
        last = len(self.strides) + 1
        x = snake(x, self.t[f"{WAV}.{last}.alpha"])
        return torch.tanh(self._conv(x, f"{WAV}.{last + 1}"))

    def _residual(self, x: torch.Tensor, p: str, dilation: int) -> torch.Tensor:
        y = self._conv(snake(x, self.t[f"{p}.0.alpha"]), f"{p}.1", dilation)
        y = self._conv(snake(y, self.t[f"{p}.2.alpha"]), f"{p}.3")
        trim = (x.shape[-1] - y.shape[-1]) // 2
        return (x[..., trim:-trim] if trim > 0 else x) + y


def _rotate(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs (x0, x1) with the stored [positions, pairs, (cos, sin)] table."""
    h, n, hd = x.shape
    pairs = x.reshape(h, n, hd // 2, 2)
    cos, sin = rope[..., 0], rope[..., 1]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).reshape(h, n, hd)
