"""Reference logits of a checkpoint in float32, holding one decoder layer's weights at a time.

transformers builds the model from its config with every parameter on the meta device (buffers such as rotary
frequencies and embedding scales stay real) and runs its own forward once, so masks, sliding windows, rope variants,
embedding scales and logit softcapping are transformers' own. Each decoder layer's weights are read from the lazy
checkpoint in float32 just before the layer runs and dropped right after; the input embeddings are computed from the
rows of the distinct ids only, and the logits from slabs of the lm_head rows.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from mt.convert.arch import load_architecture
from mt.io.checkpoint import Checkpoint, LazyTensor
from mt.io.dtypes import to_f32
from mt.io.stream import row_ranges
from mt.errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from torch import nn

SLAB_BYTES = 64 << 20
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")


def truncated_config(config: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """`config` (config.json as a dict) of the model cut to its first `n_layers` decoder layers."""
    total = int(config["num_hidden_layers"])
    if not 1 <= n_layers <= total:
        raise ValueError(f"n_layers must be in 1..{total}, not {n_layers}")
    out = dict(config, num_hidden_layers=n_layers)
    for key in PER_LAYER_KEYS:
        if isinstance(out.get(key), list) and len(out[key]) == total:
            out[key] = out[key][:n_layers]
    return out


def reference_logits(ckpt: Checkpoint, ids: list[int], n_layers: int | None = None) -> np.ndarray:
    """[len(ids), vocab] float32 logits of `ckpt` in transformers, in float32 (of its first `n_layers` decoder
    layers when given)."""
    import torch

    if not ids:
        raise ValueError("reference_logits needs at least one token id")
    ckpt = as_transformers_names(ckpt)
    config = ckpt.config if n_layers is None else truncated_config(ckpt.config, n_layers)
    model = _skeleton(config)
    names = {id(m): name for name, m in model.named_modules()}
    layers = _decoder_layers(model)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    embed_name = f"{names[id(embed)]}.weight"
    skip = {embed_name, f"{names[id(head)]}.weight"}
    for layer in layers:
        _stream(layer, names[id(layer)], ckpt)
    _load_rest(model, {names[id(layer)] for layer in layers}, skip, ckpt)
    head.forward = _slab_forward(_head_source(ckpt, model, names), head.bias)
    with torch.no_grad():
        embeds = _input_embeddings(embed, _tensor(ckpt, embed_name), ids)
        logits = model(inputs_embeds=embeds, use_cache=False).logits[0]
    return logits.float().numpy()


def decoder_model(ckpt: Checkpoint, dtype: torch.dtype, device: str) -> tuple[nn.Module, str]:
    """transformers' decoder of `ckpt` without its lm_head (the CausalLM's base model) and its name there, every
    parameter read from the lazy checkpoint one at a time in `dtype` on `device`; buffers (rotary frequencies …)
    stay float32."""
    ckpt = as_transformers_names(ckpt)
    model = _skeleton(ckpt.config)
    base = getattr(model, model.base_model_prefix, None)
    if base is None:
        raise RuntimeError(f"{type(model).__name__} has no base model at {model.base_model_prefix}")
    prefix = model.base_model_prefix
    for owner, attr, name in _own_parameters(base, prefix):
        _set(owner, attr, name, ckpt, lambda value: value.to(device=device, dtype=dtype))
    return base.to(device), prefix


def as_transformers_names(ckpt: Checkpoint) -> Checkpoint:
    """`ckpt` with its tensors under transformers' parameter names (a mixture of experts' experts stacked)."""
    arch = load_architecture(ckpt.architecture, ckpt.config)
    return replace(ckpt, tensors=dict(arch.transformers_tensors(ckpt.tensors)))


def _skeleton(config: dict[str, Any]) -> nn.Module:
    """The CausalLM of `config` in float32, parameters on meta, buffers real, in eval mode."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"config.json has model_type {model_type!r}, which transformers does not know",
                              "use a checkpoint of a model family transformers supports")
    hf_config = CONFIG_MAPPING[model_type].from_dict(config)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, trust_remote_code=False)
    if meta := [name for name, b in model.named_buffers() if b.is_meta]:
        raise RuntimeError(f"buffers {meta} were created on meta; this model cannot be built layer by layer")
    return model.eval()


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device and keep their buffers; `torch.empty` (the
    storage nn.Linear and nn.Embedding fill) is made on meta so no parameter is ever allocated."""
    import torch
    from torch.overrides import TorchFunctionMode

    register = torch.nn.Module.register_parameter

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    class EmptyOnMeta(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            kwargs = dict(kwargs or {})
            if func is torch.empty and kwargs.get("device") is None:
                kwargs["device"] = "meta"
            return func(*args, **kwargs)

    torch.nn.Module.register_parameter = to_meta
    try:
        with EmptyOnMeta():
            yield
    finally:
        torch.nn.Module.register_parameter = register


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise RuntimeError(f"{type(model).__name__} has no decoder layer list at {model.base_model_prefix}.layers")
    return list(layers)


def _stream(layer: nn.Module, prefix: str, ckpt: Checkpoint) -> None:
    """Hooks that load `layer`'s weights right before it runs and put them back on meta after."""
    layer.register_forward_pre_hook(lambda module, args: _load(module, prefix, ckpt))
    layer.register_forward_hook(lambda module, args, out: _unload(module))


def _own_parameters(module: nn.Module, prefix: str) -> Iterator[tuple[nn.Module, str, str]]:
    """(owner, attribute, checkpoint name) of each parameter under `module`."""
    for sub_name, sub in module.named_modules(prefix=prefix):
        for attr, param in sub._parameters.items():
            if param is not None:
                yield sub, attr, f"{sub_name}.{attr}" if sub_name else attr


def _load(module: nn.Module, prefix: str, ckpt: Checkpoint) -> None:
    for owner, attr, name in _own_parameters(module, prefix):
        _set(owner, attr, name, ckpt)


def _unload(module: nn.Module) -> None:
    import torch

    for owner, attr, _ in _own_parameters(module, ""):
        param = owner._parameters[attr]
        owner._parameters[attr] = torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)


def _load_rest(model: nn.Module, layer_prefixes: set[str], skip: set[str], ckpt: Checkpoint) -> None:
    """Every parameter outside the decoder layers (final norm …) but the embedding and lm_head weights."""
    inside = tuple(f"{prefix}." for prefix in layer_prefixes)
    for owner, attr, name in _own_parameters(model, ""):
        if name not in skip and not name.startswith(inside):
            _set(owner, attr, name, ckpt)


def _set(owner: nn.Module, attr: str, name: str, ckpt: Checkpoint,
         place: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    import torch

    value, shape = _read(ckpt, name), tuple(owner._parameters[attr].shape)
    if tuple(value.shape) != shape:
        raise CheckpointError(f"tensor {name!r} has shape {tuple(value.shape)}, config.json implies {shape}",
                              "the weights do not match config.json")
    owner._parameters[attr] = torch.nn.Parameter(place(value) if place else value, requires_grad=False)


def _tensor(ckpt: Checkpoint, name: str) -> LazyTensor:
    tensor = ckpt.tensors.get(name)
    if tensor is None:
        raise CheckpointError(f"the checkpoint has no tensor {name!r}", "the weights do not match config.json")
    return tensor


def _read(ckpt: Checkpoint, name: str) -> torch.Tensor:
    tensor = _tensor(ckpt, name)
    return _f32(tensor.read(), tensor.dtype)


def _f32(raw: np.ndarray, dtype: str) -> torch.Tensor:
    import torch

    if dtype in ("BF16", "F16"):  # torch widens on every core, numpy on one
        bits = np.ascontiguousarray(raw).view(np.int16 if dtype == "BF16" else np.float16)
        with warnings.catch_warnings():  # a read-only slab is only read: .float() makes the copy
            warnings.simplefilter("ignore", UserWarning)
            narrow = torch.from_numpy(bits)
        return (narrow.view(torch.bfloat16) if dtype == "BF16" else narrow).float()
    values = to_f32(raw, dtype)
    if not values.flags.writeable or not values.flags.c_contiguous:
        values = np.array(values, dtype=np.float32)
    return torch.from_numpy(values)


def _head_source(ckpt: Checkpoint, model: nn.Module, names: dict[int, str]) -> LazyTensor:
    """The lm_head weight as stored, or the embedding where transformers ties them or lm_head.weight is absent."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    head_name = f"{names[id(head)]}.weight"
    if head.weight is embed.weight or head_name not in ckpt.tensors:
        return _tensor(ckpt, f"{names[id(embed)]}.weight")
    return ckpt.tensors[head_name]


def _slab_forward(source: LazyTensor, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """lm_head's forward computing the logits from SLAB_BYTES of float32 weight rows at a time."""
    import torch.nn.functional as F

    n_rows, width = source.shape

    def slab(hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        weight = _f32(source.read_rows(start, stop), source.dtype)
        return F.linear(hidden, weight, None if bias is None else bias[start:stop])

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        out = hidden.new_empty(*hidden.shape[:-1], n_rows)
        for start, stop in row_ranges(n_rows, 4 * width, SLAB_BYTES):
            out[..., start:stop] = slab(hidden, start, stop)
        return out

    return forward


def _input_embeddings(embed: nn.Module, source: LazyTensor, ids: list[int]) -> torch.Tensor:
    """[1, len(ids), hidden]: the model's embedding module run on only the rows of the distinct ids."""
    import torch

    rows, inverse = np.unique(np.asarray(ids, dtype=np.int64), return_inverse=True)
    if rows[0] < 0 or rows[-1] >= source.shape[0]:
        raise ValueError(f"token ids must lie in 0..{source.shape[0] - 1}")
    full, padding_idx = embed._parameters["weight"], getattr(embed, "padding_idx", None)
    embed._parameters["weight"] = torch.nn.Parameter(_gather(source, rows), requires_grad=False)
    if padding_idx is not None:  # F.embedding wants it among the rows; it only affects gradients
        embed.padding_idx = _position(rows, padding_idx)
    try:
        return embed(torch.from_numpy(inverse.reshape(1, -1)))
    finally:
        embed._parameters["weight"] = full
        if padding_idx is not None:
            embed.padding_idx = padding_idx


def _position(rows: np.ndarray, row: int) -> int | None:
    at = int(np.searchsorted(rows, row))
    return at if at < rows.size and rows[at] == row else None


def _gather(source: LazyTensor, rows: np.ndarray) -> torch.Tensor:
    """float32 rows `rows` (sorted, distinct) of `source`, read a run of consecutive rows at a time."""
    import torch

    runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)
    return torch.cat([_f32(source.read_rows(int(run[0]), int(run[-1]) + 1), source.dtype) for run in runs])
