"""The model trained: the base (16/32-bit, or NF4 through bitsandbytes for QLoRA) wrapped by PEFT LoRA.

meta_base and lora_skeleton build the same modules with no storage (meta tensors): the --fsdp ranks other than 0,
which receive their shards of rank 0's weights (mt/finetune/distributed.py)."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from mt.errors import AdapterError, CheckpointError, MtError, TrainingError
from mt.finetune.families import LoraTargets, resolve_targets

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


@dataclass(frozen=True)
class LoraOptions:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target: str = "all-linear"
    qlora: bool = False


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype auto: bf16 on a GPU that has it, else f32 (CPU bf16 matmuls are slow on most CPUs)."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def bnb_config(dtype: torch.dtype) -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MtError("--qlora needs bitsandbytes", "pip install bitsandbytes (the CPU build works too)") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def load_base(base: Path, *, qlora: bool, dtype: torch.dtype, device: torch.device) -> Any:
    """The base model in `dtype` on `device`; with qlora its decoder linears are NF4 (double quant, blocks of 64)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # mt finetune shows its own progress
    extra = {"quantization_config": bnb_config(dtype), "device_map": {"": str(device)}} if qlora else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, trust_remote_code=False, **extra)
            if not qlora:
                model.to(device)
    except torch.OutOfMemoryError:
        raise TrainingError(f"out of memory loading {base} on {device} in {str(dtype).removeprefix('torch.')}",
                            "add --qlora, or pick a smaller --dtype") from None
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # SafetensorError: a truncated file
        raise CheckpointError(f"transformers cannot load {base} ({str(e).splitlines()[0]})",
                              "check that the folder holds a complete checkpoint") from None
    model.config.use_cache = False
    return model


def meta_base(base: Path, *, dtype: torch.dtype) -> Any:
    """The modules load_base builds, from config.json alone, every weight and buffer a meta tensor (no storage)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base, trust_remote_code=False)
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"transformers cannot build {base} from its config.json ({str(e).splitlines()[0]})",
                              "check that the folder holds a complete checkpoint") from None
    model.config.use_cache = False
    return model


def add_lora(model: Any, options: LoraOptions, family: LoraTargets, grad_checkpointing: bool) -> Any:
    """A trainable PEFT LoRA around `model` (frozen base; LoRA weights in float32, peft's autocast_adapter_dtype)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=resolve_targets(options.target, family), bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft 0.21 calls a transformers 5 API deprecated for v6
        _prepare(model, options.qlora, grad_checkpointing)
        return get_peft_model(model, config)


def load_lora(model: Any, adapter: Path, qlora: bool, grad_checkpointing: bool) -> Any:
    """--resume: the saved adapter, trainable again, with its own LoRA settings."""
    from peft import PeftModel

    _check_adapter(adapter)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            _prepare(model, qlora, grad_checkpointing)
            return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise AdapterError(f"the adapter in {adapter} does not fit this base ({str(e).splitlines()[0]})",
                           "resume on the base it was trained on") from None


def lora_skeleton(model: Any, adapter: Path, grad_checkpointing: bool) -> Any:
    """--resume on a meta base: the modules load_lora makes from adapter_config.json, without reading the weights."""
    from peft import LoraConfig, get_peft_model

    _check_adapter(adapter)
    config = LoraConfig.from_pretrained(adapter)
    config.inference_mode = False  # trainable, as load_lora's is_trainable=True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        _prepare(model, False, grad_checkpointing)
        return get_peft_model(model, config)


def _check_adapter(adapter: Path) -> None:
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"{adapter} holds no adapter_config.json", "pass a folder mt finetune wrote to --resume")
    if json.loads(config_file.read_text()).get("peft_type") != "LORA":
        raise AdapterError(f"{adapter} is not a LoRA adapter", "pass a folder mt finetune wrote to --resume")


def _prepare(model: Any, qlora: bool, grad_checkpointing: bool) -> None:
    if qlora:
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_checkpointing,
                                        gradient_checkpointing_kwargs={"use_reentrant": False})
    elif grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def trainable_parameters(model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]
