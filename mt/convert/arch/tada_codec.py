"""The decoder of Hume's TADA codec (HumeAI/tada-codec, subfolder `decoder`): acoustic vectors -> 24 kHz audio.

HumeAI's tada/modules/decoder.py: `decoder_proj` (Linear embed_dim -> hidden_dim), `local_attention_decoder`
(post-norm transformer layers: self_attn.qkv / out_proj / layer_norm with a stored RoPE table `rope_freqs`,
ffn.0 / ffn.3 with GELU, norm; then final_norm) and `wav_decoder` (DAC: WNConv1d, one block per stride of
Snake1d + WNConvTranspose1d(kernel 2*stride) + 3 residual units, Snake1d, WNConv1d to 1 channel, tanh).

The convolutions are stored weight-normalised (`<prefix>.parametrizations.weight.original0` = g,
`.original1` = v); the GGUF holds the plain weight g * v / ||v||, the norm over every dim but 0, computed in
float32. The all-True `_precomputed_mask` buffers (8192 x 8192 booleans per layer, unused: the decoder always
passes its own block mask) are left out. Tensors keep their HF names; hyperparameters go under `tada_codec.*`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from mt.io.gguf_out import GGUFContents
from mt.convert.arch.family import Family
from mt.convert.arch.base import Architecture, KeptNames
from mt.io.checkpoint import LazyTensor, SideFiles
from mt.io.dtypes import to_f32
from mt.convert.vocab import VocabSummary
from mt.errors import CheckpointError, MissingTensor

GGUF_ARCH = "tada_codec"
SAMPLE_RATE = 24000  # HumeAI's codec works at 24 kHz (EncoderOutput.sample_rate); 50 frames/s x prod(strides)
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which LocalAttentionEncoder uses
DEFAULT_HEADS = 8  # DecoderConfig.num_attn_heads
DEFAULT_BLOCK_ATTENTION = "v2"  # DecoderConfig.block_attention

_LAYER = r"local_attention_decoder\.layers\.\d+"
KEPT = (
    r"decoder_proj\.(weight|bias)",
    rf"{_LAYER}\.self_attn\.(qkv|out_proj|layer_norm)\.(weight|bias)",
    rf"{_LAYER}\.self_attn\.rope_freqs",
    rf"{_LAYER}\.ffn\.[03]\.(weight|bias)",
    rf"{_LAYER}\.norm\.(weight|bias)",
    r"local_attention_decoder\.(final_norm|input_proj)\.(weight|bias)",
    r"wav_decoder\.model\.\d+(\.block\.\d+){0,2}\.(weight|bias|alpha)",
)
DROPPED = ("local_attention_decoder.layers.{bid}.self_attn._precomputed_mask",)

WEIGHT_NORM = re.compile(r"(?P<prefix>.+)\.parametrizations\.weight\.original(?P<part>[01])")


@dataclass(frozen=True)
class FoldedWeight:
    """g * v / ||v|| (norm over every dim but 0) in float32, read lazily by rows: each row has its own norm."""

    name: str
    g: LazyTensor
    v: LazyTensor

    dtype = "F32"

    @property
    def shape(self) -> tuple[int, ...]:
        return self.v.shape

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * 4

    def read_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        g = to_f32(self.g.read_rows(start, stop), self.g.dtype)
        v = to_f32(self.v.read_rows(start, stop), self.v.dtype)
        return fold_weight_norm(g, v)

    def read(self) -> np.ndarray:
        return self.read_rows()


def fold_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """torch's _weight_norm(v, g, dim=0): v * (g / ||v||); the sum of squares in float64, the rest in float32."""
    axes = tuple(range(1, v.ndim))
    norm = np.sqrt(np.sum(np.square(v, dtype=np.float64), axis=axes, keepdims=True)).astype(np.float32)
    return v * (g.reshape(norm.shape) / norm)


def fold_weight_norms(tensors: Mapping[str, LazyTensor]) -> dict[str, LazyTensor]:
    """The tensors with each original0/original1 pair replaced, in place, by its folded `<prefix>.weight`."""
    out: dict[str, LazyTensor] = {}
    for name, ref in tensors.items():
        m = WEIGHT_NORM.fullmatch(name)
        if m is None:
            out[name] = ref
            continue
        prefix = m["prefix"]
        if f"{prefix}.weight" in out:
            continue
        g_name, v_name = (f"{prefix}.parametrizations.weight.original{i}" for i in (0, 1))
        for needed in (g_name, v_name):
            if needed not in tensors:
                raise MissingTensor(f"tensor {needed!r} is missing: the weight-normalised {prefix!r} needs both "
                                    "original0 (g) and original1 (v)", "the checkpoint is incomplete; download it again")
        g, v = tensors[g_name], tensors[v_name]
        if v.shape[:1] != g.shape[:1] or int(np.prod(g.shape)) != g.shape[0]:
            raise CheckpointError(f"{g_name!r} has shape {list(g.shape)}, which does not fit {v_name!r} {list(v.shape)}",
                                  "g must hold one norm per row of v (weight_norm with dim=0)")
        out[f"{prefix}.weight"] = FoldedWeight(f"{prefix}.weight", g, v)
    return out


def decoder_dims(tensors: Mapping[str, LazyTensor]) -> dict[str, Any]:
    """The DecoderConfig sizes, read from the tensor shapes (config.json may leave DecoderConfig's class
    defaults out)."""
    def shape(name: str) -> tuple[int, ...]:
        if name not in tensors:
            raise MissingTensor(f"tensor {name!r} is missing", "this is not a complete TADA codec decoder; download it again")
        return tensors[name].shape

    layers = sorted({int(m[1]) for n in tensors if (m := re.match(r"local_attention_decoder\.layers\.(\d+)\.", n))})
    blocks = sorted({int(m[1]) for n in tensors if (m := re.fullmatch(r"wav_decoder\.model\.(\d+)\.block\.1\.weight", n))})
    dims = {
        "embed_dim": shape("decoder_proj.weight")[1],
        "hidden_dim": shape("decoder_proj.weight")[0],
        "num_attn_layers": len(layers),
        "attn_dim_feedforward": shape("local_attention_decoder.layers.0.ffn.0.weight")[0],
        "wav_decoder_channels": shape("wav_decoder.model.0.weight")[0],
        "strides": [shape(f"wav_decoder.model.{b}.block.1.weight")[2] // 2 for b in blocks],
    }
    rope = "local_attention_decoder.layers.0.self_attn.rope_freqs"
    if rope in tensors:
        dims["attn_max_seq_len"] = shape(rope)[0]
    return dims


class TadaCodecDecoder(Architecture):
    gguf_arch = GGUF_ARCH
    names = KeptNames(KEPT, DROPPED)
    outtypes = ("f32", "f16")
    auto_outtype = "f16"
    decoder_config = False

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.dims: dict[str, Any] = {}

    def block_count(self) -> int:
        return int(self.dims.get("num_attn_layers", self.config.get("num_attn_layers", 6)))

    def source_tensors(self, tensors: Mapping[str, LazyTensor]) -> Mapping[str, LazyTensor]:
        folded = fold_weight_norms(tensors)
        self.dims = decoder_dims(folded)
        for key, value in self.dims.items():
            stated = self.config.get(key)
            if stated is not None and list(np.atleast_1d(stated)) != list(np.atleast_1d(value)):
                raise CheckpointError(f"config.json says {key} = {stated}, the tensors say {value}",
                                      "fix config.json or re-download the decoder")
        return folded

    def write_hparams(self, w: GGUFContents, file_type: int) -> None:
        ns = GGUF_ARCH
        w.add_file_type(file_type)
        for key, value in self.dims.items():
            if isinstance(value, list):
                w.add_array(f"{ns}.{key}", [int(v) for v in value])
            else:
                w.add_uint32(f"{ns}.{key}", int(value))
        w.add_uint32(f"{ns}.num_attn_heads", int(self.config.get("num_attn_heads") or DEFAULT_HEADS))
        w.add_string(f"{ns}.block_attention", str(self.config.get("block_attention") or DEFAULT_BLOCK_ATTENTION))
        w.add_float32(f"{ns}.layer_norm_eps", LAYER_NORM_EPS)
        w.add_uint32(f"{ns}.sample_rate", SAMPLE_RATE)

    def write_vocab(self, files: SideFiles, w: GGUFContents) -> VocabSummary | None:
        return None  # the codec has no tokenizer


FAMILY = Family()
ARCH = TadaCodecDecoder
