"""QLoRA bases: the base weights as bitsandbytes' 4-bit quantization (NF4/FP4) gives them back.

A QLoRA adapter is trained against a 4-bit copy of the base, made when transformers loads the base with
`BitsAndBytesConfig(load_in_4bit=True, ...)`. mt merges into the 16-bit base weights by default; with
`--dequantized-base` it merges onto `dequantize_4bit(quantize_4bit(W))` instead, computed by bitsandbytes itself:
`dequantized_base` wraps a 16-bit base, `dequantized_checkpoint` reads a base saved already quantized.

What transformers 5.23 quantizes (`replace_with_bnb_linear`, `Bnb4BitHfQuantizer`): every module whose type is
exactly `nn.Linear`, except the modules to skip: `llm_int8_skip_modules` when given, else the defaults of
`get_keys_to_not_convert` (the output embedding, both ends of tied weights, the module of the last parameter),
plus `_keep_in_fp32_modules` (none for the families below). A given skip list *replaces* the defaults, so
`llm_int8_skip_modules=["down_proj"]` quantizes lm_head too. The weight is cast to the model's dtype first
(`dtype="auto"`: config.json's dtype/torch_dtype, else the first float tensor's), then handed to
`quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type, quant_storage)`; the compute dtype
(`bnb_4bit_compute_dtype`) does not touch the stored weights.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from mt.convert.arch import families
from mt.convert.arch.family import Family
from mt.io.checkpoint import Checkpoint, LazyTensor, torch_to_storage
from mt.errors import AdapterError, CheckpointError, DeviceUnavailable
from mt.io.dtypes import FLOAT_DTYPES, STORAGE_DTYPES
from mt.merge.merged import BaseWrapper

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # quantize_4bit's accepted sizes
QUANT_STORAGES = ("uint8", "int8", "float16", "bfloat16", "float32", "float64")  # BitsAndBytesConfig's list
TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
DTYPE_NAMES = {"f32": "F32", "f16": "F16", "bf16": "BF16", **{torch: mt for mt, torch in TORCH_DTYPES.items()}}
PIP = "pip install bitsandbytes==0.50.2"


@dataclass(frozen=True)
class LinearLayout:
    """One family's modules of exact type nn.Linear (`{bid}`: the block number), and the modules transformers'
    get_keys_to_not_convert skips by default. Of those defaults only the output embedding is a Linear: the tied
    embedding and the last parameter's module (lm_head or model.norm) are not."""

    linears: tuple[str, ...]
    default_skips: tuple[str, ...]


def linear_layout(record: Family) -> LinearLayout:
    return LinearLayout(tuple(f"model.layers.{{bid}}.{m}" for m in record.linear) + ("lm_head",), ("lm_head",))


LAYOUTS: dict[str, LinearLayout] = {hf_arch: linear_layout(f) for hf_arch, f in families().items() if f.qlora}
QUANT_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")  # beside a saved 4-bit weight
STATE_KEY = re.compile(r"^(?P<weight>.+)\.quant_state\.bitsandbytes__(?P<type>nf4|fp4)$")


@dataclass(frozen=True)
class Bnb4bitOptions:
    """What BitsAndBytesConfig(load_in_4bit=True, ...) and from_pretrained(dtype=...) set for the weights."""

    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    quant_storage: str = "uint8"
    dtype: str | None = None  # F32/F16/BF16 the base is loaded in; None: transformers' dtype="auto"
    skip_modules: tuple[str, ...] | None = None  # llm_int8_skip_modules
    device: str = "cpu"  # where bitsandbytes quantizes: "cuda" runs the kernels QLoRA training ran

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise AdapterError(f"bitsandbytes 4-bit quant type {self.quant_type!r} does not exist", "use nf4 or fp4")
        if self.blocksize not in BLOCKSIZES:
            raise AdapterError(f"bitsandbytes has no 4-bit block size {self.blocksize}",
                               f"use one of {', '.join(map(str, BLOCKSIZES))} (transformers uses 64)")
        if self.quant_storage not in QUANT_STORAGES:
            raise AdapterError(f"bitsandbytes cannot store 4-bit weights as {self.quant_storage!r}",
                               f"use one of {', '.join(QUANT_STORAGES)}")
        if self.dtype is not None and self.dtype not in TORCH_DTYPES:
            raise AdapterError(f"bitsandbytes quantizes f32, f16 or bf16 weights, not {self.dtype!r}", "pass f32, f16 or bf16")
        for pattern in self.skip_modules or ():
            try:
                re.compile(pattern)
            except re.error as e:
                raise AdapterError(f"skip module {pattern!r} is not a valid pattern ({e})",
                                   "pass module names or regular expressions, as llm_int8_skip_modules takes them") from None


def dequantized_base(ckpt: Checkpoint, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64,
                     quant_storage: str = "uint8", dtype: str | None = None,
                     skip_modules: Sequence[str] | None = None, device: str = "cpu") -> BaseWrapper:
    """A merge_checkpoint `wrap_base` that hands out each weight bitsandbytes would quantize as
    dequantize_4bit(quantize_4bit(W)), computed when its rows are read; other tensors pass through."""
    options = Bnb4bitOptions(quant_type, double_quant, blocksize, quant_storage, _dtype_name(dtype),
                             None if skip_modules is None else tuple(skip_modules), device)
    names = quantized_weights(ckpt, options.skip_modules)
    weight_dtype = options.dtype or _auto_dtype(ckpt)
    _check_device(options.device)
    cache = _LastPacked()

    def wrap(name: str, tensor: LazyTensor) -> LazyTensor:
        if name not in names:
            return tensor
        return Dequantized4bit(name, weight_dtype, tuple(tensor.shape), lambda: _quantize(tensor, weight_dtype, options), cache)

    return wrap


def quantized_weights(ckpt: Checkpoint, skip_modules: Sequence[str] | None = None) -> set[str]:
    """Names of the tensors transformers hands to bitsandbytes when it loads `ckpt` in 4 bits."""
    layout = LAYOUTS.get(ckpt.architecture)
    if layout is None:
        raise AdapterError(
            f"mt does not know which layers of a {ckpt.architecture} bitsandbytes quantizes",
            f"merge into the 16-bit base (without --dequantized-base); mt knows {', '.join(sorted(LAYOUTS))}",
        )
    linear = re.compile("|".join(re.escape(m).replace(re.escape("{bid}"), r"\d+") for m in layout.linears))
    skips = list(layout.default_skips if skip_modules is None else skip_modules)
    names = set()
    for name, tensor in ckpt.tensors.items():
        module = name.removesuffix(".weight")
        if module != name and linear.fullmatch(module) and not _skipped(module, skips):
            if tensor.dtype not in FLOAT_DTYPES:
                raise AdapterError(f"{name} is {tensor.dtype}, not a float weight bitsandbytes can quantize",
                                   "pass the 16-bit base checkpoint")
            names.add(name)
    return names


def _skipped(module: str, patterns: Sequence[str]) -> bool:
    """transformers' should_convert_module, negated: a pattern matches from the start up to a module boundary
    (as a regular expression), or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{key}){boundary}", module) or module.endswith(key) for key in patterns)


def _dtype_name(dtype: str | None) -> str | None:
    return None if dtype is None else DTYPE_NAMES.get(dtype, dtype)


def _check_device(device: str) -> None:
    torch, _ = _bnb()
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise AdapterError(f"{device!r} is not a torch device", "quantize on cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(f"bitsandbytes cannot quantize on {device}: torch sees no CUDA GPU", "quantize on cpu")


def _auto_dtype(ckpt: Checkpoint) -> str:
    """from_pretrained's dtype="auto": config.json's dtype (torch_dtype in older files), else the first float tensor's."""
    named = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype")
    if named is not None:
        if not isinstance(named, str) or named not in DTYPE_NAMES:
            raise AdapterError(f"config.json says dtype {named!r}, which bitsandbytes cannot quantize",
                               "pass the dtype the base was loaded in for training (f32, f16 or bf16)")
        return DTYPE_NAMES[named]
    first = next((t.dtype for t in ckpt.tensors.values() if t.dtype in FLOAT_DTYPES), None)
    if first is None:
        raise AdapterError(f"{ckpt.folder} holds no float tensors", "pass the 16-bit base checkpoint")
    return first


# ---------------------------------------------------------------- 4-bit weights, dequantized by rows


@dataclass
class Packed4bit:
    """One weight in bitsandbytes' 4-bit form, absmax already decoded (double quant undone) as dequantize_4bit does."""

    codes: Any  # torch uint8 [ceil(numel / 2)]: two codes a byte, the first element in the high nibble
    absmax: Any  # torch float32 [ceil(numel / blocksize)]
    numel: int
    blocksize: int
    quant_type: str
    dtype: str  # what dequantize_4bit returns: the dtype of the weight that was quantized


class _LastPacked:
    """The 4-bit form of the tensor being read: writers read one tensor at a time, in row slabs, so the latest
    one is kept (quantized once) and the one before it dropped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._name: str | None = None
        self._packed: Packed4bit | None = None

    def get(self, name: str, load: Callable[[], Packed4bit]) -> Packed4bit:
        with self._lock:
            if self._name != name or self._packed is None:
                self._name, self._packed = None, None
                self._packed, self._name = load(), name
            return self._packed


@dataclass(frozen=True)
class Dequantized4bit:
    """A lazy tensor whose rows are bitsandbytes' dequantization of a 4-bit weight, in `dtype` storage."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    load: Callable[[], Packed4bit]
    cache: _LastPacked

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * STORAGE_DTYPES[self.dtype].itemsize

    def read_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.shape[0] if stop is None else stop
        if not 0 <= start <= stop <= self.shape[0]:
            raise IndexError(f"rows [{start}, {stop}) of {self.name}, which has {self.shape[0]}")
        row = math.prod(self.shape[1:])
        values = _dequantize_range(self.cache.get(self.name, self.load), start * row, stop * row)
        return torch_to_storage(values).reshape((stop - start,) + self.shape[1:])

    def read(self) -> np.ndarray:
        return self.read_rows()


def _dequantize_range(packed: Packed4bit, first: int, last: int) -> Any:
    """Elements [first, last) of the flattened weight. bitsandbytes' blocks run across rows; they are handed to
    dequantize_4bit as rows of one block each: its CPU kernel starts a block at every row (wrong for rows that are
    not a multiple of the block size) while quantize_4bit, and the CUDA kernels, block the flat tensor."""
    torch, functional = _bnb()
    size = packed.blocksize
    first_block, end_block = first // size, -(-last // size)
    full_end = min(end_block, packed.numel // size)  # blocks of `size` elements; a shorter one may end the weight
    parts = [torch.empty(0, dtype=getattr(torch, TORCH_DTYPES[packed.dtype]))]
    if full_end > first_block:
        parts.append(_dequantize_blocks(functional, packed, first_block, (full_end - first_block, size)))
    if end_block > full_end:
        parts.append(_dequantize_blocks(functional, packed, full_end, (1, packed.numel - full_end * size)))
    flat = torch.cat([part.reshape(-1) for part in parts])
    return flat[first - first_block * size:last - first_block * size]


def _dequantize_blocks(functional: Any, packed: Packed4bit, first_block: int, shape: tuple[int, int]) -> Any:
    import torch

    start = first_block * packed.blocksize // 2
    codes = packed.codes[start:start + (shape[0] * shape[1] + 1) // 2]
    state = functional.QuantState(absmax=packed.absmax[first_block:first_block + shape[0]], shape=torch.Size(shape),
                                  blocksize=packed.blocksize, quant_type=packed.quant_type,
                                  dtype=getattr(torch, TORCH_DTYPES[packed.dtype]))
    return functional.dequantize_4bit(codes, quant_state=state)


def _quantize(source: LazyTensor, dtype: str, options: Bnb4bitOptions) -> Packed4bit:
    """quantize_4bit of the weight cast to `dtype`, as Params4bit._quantize does when transformers loads it."""
    torch, functional = _bnb()
    weight = _to_torch(source.read(), source.dtype).to(getattr(torch, TORCH_DTYPES[dtype]))
    try:
        codes, state = functional.quantize_4bit(
            weight.contiguous().to(options.device), blocksize=options.blocksize,
            compress_statistics=options.double_quant, quant_type=options.quant_type,
            quant_storage=getattr(torch, options.quant_storage),
        )
    except (RuntimeError, ValueError) as e:
        raise AdapterError(f"bitsandbytes cannot quantize {source.name} on {options.device} ({e})",
                           "check the device and the 4-bit options") from None
    return _packed(codes, state, dtype, math.prod(source.shape))


def _packed(codes: Any, state: Any, dtype: str, numel: int) -> Packed4bit:
    torch, functional = _bnb()
    absmax = state.absmax
    if state.nested:  # as dequantize_4bit undoes double quantization
        absmax = functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return Packed4bit(codes.contiguous().view(torch.uint8).reshape(-1).cpu(), absmax.float().cpu(), numel,
                      state.blocksize, state.quant_type, dtype)


def _to_torch(raw: np.ndarray, dtype: str) -> Any:
    import torch

    raw = np.ascontiguousarray(raw)
    if dtype == "BF16":
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(raw)


def _bnb() -> tuple[Any, Any]:
    """torch and bitsandbytes.functional, imported on first use."""
    # bitsandbytes warns on import about optional CPU matmul kernels that dequantizing never uses
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import torch
        import bitsandbytes.functional as functional
    except ImportError as e:
        raise AdapterError(f"a QLoRA base needs bitsandbytes and torch, and importing them failed ({e})", PIP) from None
    return torch, functional


# ---------------------------------------------------------------- bases saved in 4 bits


def quantization_method(ckpt: Checkpoint) -> str | None:
    """None for a plain checkpoint; else how config.json's quantization_config says its weights are stored."""
    config = ckpt.config.get("quantization_config")
    if not isinstance(config, dict):
        return None
    method = str(config.get("quant_method", "unknown"))
    if method == "bitsandbytes":
        if config.get("load_in_4bit") or config.get("_load_in_4bit"):
            return "bitsandbytes 4-bit"
        return "bitsandbytes 8-bit"
    return method


def merge_base(ckpt: Checkpoint, dequantized: bool, **options: Any) -> tuple[Checkpoint, BaseWrapper | None]:
    """The base to merge into and merge_checkpoint's `wrap_base`, with or without --dequantized-base. A base saved
    in 4 bits is read dequantized (its own stored quantization; `options` do not apply), and only so."""
    method = quantization_method(ckpt)
    if method is None:
        return ckpt, dequantized_base(ckpt, **options) if dequantized else None
    if method != "bitsandbytes 4-bit":
        raise AdapterError(f"{ckpt.folder} holds {method}-quantized weights, not 16-bit ones, and mt cannot merge into them",
                           "pass the unquantized base model the adapter was trained on")
    if not dequantized:
        raise AdapterError(
            f"{ckpt.folder} is a bitsandbytes 4-bit checkpoint: it holds no 16-bit weights to merge into",
            "pass the 16-bit base model the adapter was trained on (better), or --dequantized-base to merge onto these 4-bit weights dequantized",
        )
    return dequantized_checkpoint(ckpt), None


def dequantized_checkpoint(ckpt: Checkpoint) -> Checkpoint:
    """A checkpoint saved by transformers from a 4-bit model (packed U8 weights beside `.absmax`, `.quant_map`,
    `.nested_absmax`, `.nested_quant_map`, `.quant_state.bitsandbytes__nf4|fp4`) as one whose 4-bit weights read as
    bitsandbytes dequantizes them; the config loses its quantization_config."""
    if quantization_method(ckpt) != "bitsandbytes 4-bit":
        raise CheckpointError(f"{ckpt.folder} is not a bitsandbytes 4-bit checkpoint", "pass a base saved from a 4-bit model")
    _bnb()
    states = {m["weight"]: (name, m["type"]) for name in ckpt.tensors if (m := STATE_KEY.match(name))}
    parts = {f"{weight}.{part}" for weight in states for part in QUANT_PARTS} | {state for state, _ in states.values()}
    orphans = [state for weight, (state, _) in states.items() if weight not in ckpt.tensors]
    if orphans:
        raise CheckpointError(f"{ckpt.folder}: {orphans[0]} has no 4-bit weight beside it",
                              "the checkpoint is damaged; save the 4-bit model again")
    cache = _LastPacked()
    tensors: dict[str, LazyTensor] = {}
    for name, tensor in ckpt.tensors.items():
        if name in states:
            tensors[name] = _stored_weight(ckpt, name, *states[name], cache)
        elif name not in parts:
            if _looks_quantized(name):
                raise CheckpointError(f"{ckpt.folder}: {name} has no 4-bit weight beside it",
                                      "the checkpoint is damaged; save the 4-bit model again")
            tensors[name] = tensor
    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    return Checkpoint(ckpt.folder, config, tensors, ckpt.files)


def _looks_quantized(name: str) -> bool:
    return ".quant_state." in name or name.rsplit(".", 1)[-1] in QUANT_PARTS


def _stored_weight(ckpt: Checkpoint, name: str, state_name: str, quant_type: str, cache: _LastPacked) -> Dequantized4bit:
    state = _read_state_json(ckpt, state_name)
    shape, dtype = state.get("shape"), DTYPE_NAMES.get(str(state.get("dtype")))
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)) or dtype is None:
        raise CheckpointError(f"{ckpt.folder}: {state_name} gives shape {shape!r} and dtype {state.get('dtype')!r}",
                              "the checkpoint is damaged; save the 4-bit model again")
    parts = ["absmax", "quant_map"] + (["nested_absmax", "nested_quant_map"] if "nested_offset" in state else [])
    missing = [p for p in parts if f"{name}.{p}" not in ckpt.tensors]
    weight = ckpt.tensors[name]
    if missing or weight.nbytes * 2 < math.prod(shape):
        what = f"lacks {', '.join(missing)}" if missing else f"holds {weight.nbytes} bytes for {math.prod(shape)} weights"
        raise CheckpointError(f"{ckpt.folder}: the 4-bit weight {name} {what}", "the checkpoint is damaged; save the 4-bit model again")

    def load() -> Packed4bit:
        torch, functional = _bnb()
        stored = {part: _read_torch(ckpt.tensors[f"{name}.{part}"]) for part in parts}
        stored[f"quant_state.bitsandbytes__{quant_type}"] = _read_torch(ckpt.tensors[state_name])
        try:
            quant_state = functional.QuantState.from_dict(stored, device=torch.device("cpu"))
        except (ValueError, KeyError, AssertionError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{ckpt.folder}: bitsandbytes cannot read the quantization state of {name} ({e})",
                                  "the checkpoint is damaged; save the 4-bit model again") from None
        return _packed(_read_torch(weight), quant_state, dtype, math.prod(shape))

    return Dequantized4bit(name, dtype, tuple(shape), load, cache)


def _read_torch(tensor: LazyTensor) -> Any:
    return _to_torch(tensor.read(), tensor.dtype)


def _read_state_json(ckpt: Checkpoint, state_name: str) -> dict[str, Any]:
    raw = ckpt.tensors[state_name].read()
    try:
        state = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        state = None
    if not isinstance(state, dict):
        raise CheckpointError(f"{ckpt.folder}: {state_name} is not bitsandbytes' JSON quantization state",
                              "the checkpoint is damaged; save the 4-bit model again")
    return state
