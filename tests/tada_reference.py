"""Small, independent PyTorch references for Hume's TADA modules, written for the tests from HumeAI's tada
(tada/modules/tada.py, decoder.py, encoder.py) and Microsoft's VibeVoice diffusion head. Not imported from mt.

The module trees reproduce the checkpoints' state-dict names, so the synthetic checkpoints built from them carry
the real tensor names."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.functional import silu
from torch.nn.utils.parametrizations import weight_norm

# ---------------------------------------------------------------- TadaForCausalLM's acoustic modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return out * self.weight if self.weight is not None else out


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, hidden, bias=False), nn.SiLU(), nn.Linear(hidden, hidden, bias=False))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, ffn: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn, bias=False)
        self.up_proj = nn.Linear(dim, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))


class HeadLayer(nn.Module):
    def __init__(self, dim: int, ffn: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.ffn = SwiGLU(dim, ffn)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim, bias=False))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=-1)
        return x + gate * self.ffn(self.norm(x) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int, eps: float) -> None:
        super().__init__()
        self.norm_final = RMSNorm(dim, eps, affine=False)
        self.linear = nn.Linear(dim, out, bias=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=False))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class DiffusionHead(nn.Module):
    """VibeVoice's head: velocity for the noisy latent `z` at flow time `t`, conditioned on `cond`."""

    def __init__(self, hidden: int, latent: int, layers: int, ffn_ratio: float, eps: float = 1e-5) -> None:
        super().__init__()
        self.noisy_images_proj = nn.Linear(latent, hidden, bias=False)
        self.cond_proj = nn.Linear(hidden, hidden, bias=False)
        self.t_embedder = TimestepEmbedder(hidden)
        self.layers = nn.ModuleList(HeadLayer(hidden, int(hidden * ffn_ratio), eps) for _ in range(layers))
        self.final_layer = FinalLayer(hidden, latent, eps)

    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = self.noisy_images_proj(z)
        c = self.cond_proj(cond) + self.t_embedder(t)
        for layer in self.layers:
            x = layer(x, c)
        return self.final_layer(x, c)


class TadaAcoustic(nn.Module):
    """The modules TadaForCausalLM adds to LlamaForCausalLM, under their attribute names."""

    def __init__(self, hidden: int, acoustic_dim: int, num_time_classes: int, head_layers: int, head_ffn_ratio: float,
                 bottleneck_dim: int | None = None) -> None:
        super().__init__()
        time_bits = math.ceil(math.log2(num_time_classes))
        head_hidden = bottleneck_dim or hidden
        self.acoustic_proj = nn.Linear(acoustic_dim, hidden)
        self.time_start_embed = nn.Embedding(num_time_classes, hidden)
        self.time_end_embed = nn.Embedding(num_time_classes, hidden)
        self.acoustic_mask_emb = nn.Embedding(2, hidden)
        self.bottleneck_proj = nn.Linear(hidden, bottleneck_dim) if bottleneck_dim else nn.Identity()
        self.prediction_head = DiffusionHead(head_hidden, acoustic_dim + 2 * time_bits, head_layers, head_ffn_ratio)

    def input_embedding_extra(self, acoustic: torch.Tensor, mask: torch.Tensor, t_before: torch.Tensor,
                              t_after: torch.Tensor) -> torch.Tensor:
        """What forward_one_step adds to embed_tokens(ids)."""
        return (self.acoustic_proj(acoustic) + self.acoustic_mask_emb(mask) + self.time_start_embed(t_before)
                + self.time_end_embed(t_after))

    def velocity(self, z: torch.Tensor, t: torch.Tensor, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.prediction_head(z, t, self.bottleneck_proj(hidden_state))


# ---------------------------------------------------------------- the codec decoder (module tree only)


class Snake1d(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))


def wn_conv(cin: int, cout: int, kernel: int, **kw: int) -> nn.Module:
    return weight_norm(nn.Conv1d(cin, cout, kernel, **kw))


def wn_conv_transpose(cin: int, cout: int, stride: int) -> nn.Module:
    return weight_norm(nn.ConvTranspose1d(cin, cout, 2 * stride, stride=stride, padding=math.ceil(stride / 2)))


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int) -> None:
        super().__init__()
        self.block = nn.Sequential(Snake1d(dim), wn_conv(dim, dim, 7, dilation=dilation, padding=3 * dilation),
                                   Snake1d(dim), wn_conv(dim, dim, 1))


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.block = nn.Sequential(Snake1d(cin), wn_conv_transpose(cin, cout, stride),
                                   ResidualUnit(cout, 1), ResidualUnit(cout, 3), ResidualUnit(cout, 9))


class LocalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, max_seq_len: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.layer_norm = nn.LayerNorm(dim)
        head_dim = dim // heads
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        freqs = torch.outer(torch.arange(max_seq_len).float(), inv_freq)
        self.register_buffer("rope_freqs", torch.stack([freqs.cos(), freqs.sin()], dim=-1))
        self.register_buffer("_precomputed_mask", torch.ones(max_seq_len, max_seq_len, dtype=torch.bool))


class AttentionLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, max_seq_len: int) -> None:
        super().__init__()
        self.self_attn = LocalSelfAttention(dim, heads, max_seq_len)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Dropout(0.0), nn.Linear(ffn, dim), nn.Dropout(0.0))
        self.norm = nn.LayerNorm(dim)


class LocalAttentionStack(nn.Module):
    def __init__(self, dim: int, layers: int, heads: int, ffn: int, max_seq_len: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(AttentionLayer(dim, heads, ffn, max_seq_len) for _ in range(layers))
        self.final_norm = nn.LayerNorm(dim)


class DACDecoder(nn.Module):
    def __init__(self, cin: int, channels: int, strides: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = [wn_conv(cin, channels, 7, padding=3)]
        for i, stride in enumerate(strides):
            layers.append(DecoderBlock(channels // 2**i, channels // 2 ** (i + 1), stride))
        out = channels // 2 ** len(strides)
        layers += [Snake1d(out), wn_conv(out, 1, 7, padding=3), nn.Tanh()]
        self.model = nn.Sequential(*layers)


class CodecDecoder(nn.Module):
    def __init__(self, embed_dim: int, hidden_dim: int, layers: int, heads: int, ffn: int, channels: int,
                 strides: list[int], max_seq_len: int) -> None:
        super().__init__()
        self.decoder_proj = nn.Linear(embed_dim, hidden_dim)
        self.local_attention_decoder = LocalAttentionStack(hidden_dim, layers, heads, ffn, max_seq_len)
        self.wav_decoder = DACDecoder(hidden_dim, channels, strides)
