"""Data-parallel training under torchrun: `torchrun --nproc-per-node N -m mt finetune ...`.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; each process then joins one process group (nccl on CUDA, gloo on the
CPU), holds the whole model (LoRA in DistributedDataParallel, which averages the LoRA gradients), and trains its own
share of each step's packed rows. The frozen base is not broadcast: every rank loads the same checkpoint and seeds
the LoRA init alike, so only the trained weights need DDP. Only rank 0 writes the adapter, checkpoints and logs.

--fsdp instead shards every parameter (base and LoRA) over the processes with FSDP2 (`fully_shard` on each decoder
layer, then on the whole model). Rank 0 alone reads the weights (on the CPU); the other ranks build the same modules
on the meta device, every rank shards, and rank 0's full state dict, its buffers (non-persistent ones such as the
rotary inv_freq too) and its RNG state are broadcast into the shards (shard_from_rank0), so no rank but 0 ever holds
the whole base. Checkpoints hold the full adapter and a full optimizer state dict in optimizer.state_dict()'s form
(parameter indices, not names), gathered to rank 0: the same files one process writes, so a run resumes under any
of one process, DDP and FSDP.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch

from mt.errors import MtError, TrainingError

T = TypeVar("T")


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


def all_succeed(world: World, work: Callable[[], T]) -> T:
    """`work` on every rank (loading, which only rank 0 does for real under --fsdp); when it fails on any rank,
    every rank raises instead of one rank waiting forever in the next collective. The failing rank re-raises its
    own error; the others raise the first failure's line, marked for rank 0 alone to print."""
    if not world.distributed:
        return work()
    result: T | None = None
    own: Exception | None = None
    try:
        result = work()
    except Exception as e:
        own = e
    failures: list[tuple[str, str] | None] = [None] * world.size
    torch.distributed.all_gather_object(failures, _as_line(own) if own is not None else None)
    first = next((f for f in failures if f is not None), None)
    if first is None:
        return result  # type: ignore[return-value]
    if own is not None:
        raise same_on_every_rank(own) if isinstance(own, MtError) else own
    raise same_on_every_rank(MtError(*first))


def _as_line(error: Exception) -> tuple[str, str]:
    return (error.problem, error.remedy) if isinstance(error, MtError) else (f"{type(error).__name__}: {error}", "")


def shard_from_rank0(model: torch.nn.Module, world: World, device: torch.device) -> None:
    """--fsdp: `model` holds the weights on rank 0 and meta tensors elsewhere. Every rank shards it (wrap_fsdp),
    then rank 0's full state dict is broadcast into the shards and its buffers replace every rank's."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = model.state_dict() if world.is_main else {}  # taken before sharding: rank 0's whole tensors
    wrap_fsdp(model)
    if not world.is_main:  # storage for the shards alone (set_model_state_dict would assign new, untied parameters)
        model.to_empty(device=device)
    # one tensor at a time, each cut to this rank's shard
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    broadcast_buffers(model, world, device)


def broadcast_buffers(model: torch.nn.Module, world: World, device: torch.device) -> None:
    """Rank 0's buffers onto every rank, the ones missing from the state dict too (rotary inv_freq is not
    persistent, and to_empty left it uninitialised). Buffers are not sharded: each is whole on every rank."""
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if world.is_main:
                buffer = buffer.to(device)
            elif buffer.is_meta or buffer.device != device:
                buffer = torch.empty_like(buffer, device=device)
            torch.distributed.broadcast(buffer, src=0)
            setattr(module, name, buffer)


def broadcast_rng(state: torch.Tensor) -> None:
    """Rank 0's torch RNG state on every rank (the meta ranks' LoRA init drew other numbers, or none)."""
    box: list[Any] = [state]
    torch.distributed.broadcast_object_list(box, src=0)
    torch.set_rng_state(box[0])


def gather_adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """--fsdp: the trainable (LoRA) tensors whole, on rank 0's CPU ({} elsewhere); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def gather_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, names: list[str]) -> dict[str, Any]:
    """--fsdp: the optimizer's state whole on rank 0's CPU, keyed as optimizer.state_dict() keys it (the index of
    each parameter in `names`, the optimizer's order), so one process and DDP read it too; {} on other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    return _renamed(by_name, {n: i for i, n in enumerate(names)}) if by_name else {}


def scatter_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any] | None,
                      names: list[str]) -> None:
    """--fsdp --resume: rank 0's `saved` optimizer.state_dict() (None on the other ranks) into every rank's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    by_name = _renamed(saved, dict(enumerate(names))) if saved is not None else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optimizer_state_dict(model, optimizer, by_name, options=options)


def _renamed(state: dict[str, Any], rename: dict[Any, Any]) -> dict[str, Any]:
    """An optimizer state dict with its parameter keys mapped through `rename` (names <-> indices)."""
    return {"state": {rename[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [rename[p] for p in g["params"]]} for g in state["param_groups"]]}


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
