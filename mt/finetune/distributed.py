"""Data-parallel training under torchrun: `torchrun --nproc-per-node N -m mt finetune ...`.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; each process then joins one process group (nccl on CUDA, gloo on the
CPU), holds the whole model (LoRA in DistributedDataParallel, which averages the LoRA gradients), and trains its own
share of each step's packed rows. The frozen base is not broadcast: every rank loads the same checkpoint and seeds
the LoRA init alike, so only the trained weights need DDP. Only rank 0 writes the adapter, checkpoints and logs.

--fsdp instead shards every parameter (base and LoRA) over the processes with FSDP2 (`fully_shard` on each decoder
layer, then on the whole model): each process loads the whole base on the CPU/GPU first, then keeps 1/N of it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from mt.errors import MtError, TrainingError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK; one process when they are absent."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise TrainingError("RANK / WORLD_SIZE / LOCAL_RANK are not integers",
                            "launch with torchrun --nproc-per-node N -m mt finetune ...") from None
    if size < 1 or not 0 <= rank < size:
        raise TrainingError(f"RANK {rank} does not fit WORLD_SIZE {size}",
                            "launch with torchrun --nproc-per-node N -m mt finetune ...")
    return World(rank, size, local_rank)


def rank_device(device: torch.device, world: World) -> torch.device:
    """On CUDA each process takes the GPU of its LOCAL_RANK."""
    if device.type != "cuda" or not world.distributed:
        return device
    if world.local_rank >= torch.cuda.device_count():
        raise TrainingError(f"LOCAL_RANK {world.local_rank} but torch sees {torch.cuda.device_count()} GPUs",
                            "start at most one process per GPU (--nproc-per-node)")
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


def init_process_group(world: World, device: torch.device) -> None:
    if not world.distributed or torch.distributed.is_initialized():
        return
    if not torch.distributed.is_available():
        raise TrainingError("this torch build has no torch.distributed", "install a torch build with distributed support")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    torch.distributed.init_process_group(backend, rank=world.rank, world_size=world.size, **kwargs)


def destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """The model the training step calls: DDP around it (frozen weights and buffers left out of DDP's broadcasts
    and reduction) when there are several processes, the model itself otherwise."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def wrap_fsdp(model: torch.nn.Module) -> torch.nn.Module:
    """--fsdp: FSDP2 shards of each decoder layer (the classes transformers lists in `_no_split_modules`) and of
    the rest; the model is changed in place and is also what the training step calls."""
    from torch.distributed.fsdp import fully_shard

    layer_classes = set(getattr(model.get_base_model(), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise TrainingError(f"--fsdp: no decoder layer of {type(model.get_base_model()).__name__} found to shard",
                            "train without --fsdp")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """--fsdp: the whole (unsharded) state dict on the CPU; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextmanager
def no_sync(model: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Gradient accumulation: DDP / FSDP reduce the gradients only on the last micro-batch of a step."""
    if sync:
        yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    else:
        yield


def all_reduce_sum(values: list[float], world: World) -> list[float]:
    if not world.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        tensor = tensor.cuda()
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def barrier(world: World) -> None:
    if world.distributed and torch.distributed.is_initialized():
        torch.distributed.barrier()


def same_on_every_rank(error: MtError) -> MtError:
    """Marks an error every rank raises alike (checks of options and data before training): the CLI lets rank 0
    alone print it, so a bad setup is one line, not one per process."""
    error.same_on_every_rank = True  # type: ignore[attr-defined]
    return error
