"""`mt finetune`: LoRA/QLoRA on a causal LM, plain PyTorch + PEFT, one packed row of tokens per step.

AdamW on the LoRA weights, linear warmup then cosine/linear decay (or constant), gradient clipping, a seed for
the data order and the LoRA init. The output folder is what peft's save_pretrained writes (adapter_config.json,
adapter_model.safetensors: PeftModel.from_pretrained, mt merge and mt convert --adapter read it) plus
trainer_state.json and optimizer.pt (AdamW's moments and the RNG state) for --resume; written atomically.
--save-every N writes the same to OUT.checkpoints/step-N (the latest kept, removed when the run completes).

One optimizer step trains `--grad-accum` packed rows (of <= --batch-tokens each) on each process: under torchrun
(mt/finetune/distributed.py) the global batch is WORLD_SIZE x --grad-accum rows, consecutive rows of the same
shuffled epoch, so `torchrun --nproc-per-node 2 ... --grad-accum 1` trains what one process does with
--grad-accum 2. The loss of a step is the mean cross-entropy over every trained token of its rows, whatever process
holds them: each row's mean loss is weighted by its share of the step's trained tokens (times the world size, as
DDP and FSDP average the gradients over processes). --fsdp shards the model instead of replicating it: rank 0
alone reads the base (and a --resume folder), the others build it on the meta device and receive their shards
(build_fsdp); checkpoints are gathered to rank 0 in the files one process writes, so --resume and --save-every work
across one process, DDP and FSDP alike.

--kernels (auto: on a CUDA device) patches mt/kernels into the model after the LoRA wrap (mt/finetune/patch.py:
RMSNorm, RoPE, SwiGLU or GeGLU, the LoRA linears) and, in a single process, computes the loss with the chunked
cross-entropy that never builds the full logits (under DDP inside the wrapped module, ChunkedLossModel, whose
forward DDP runs; under FSDP as a method FSDP runs as a forward, register_fsdp_chunked_loss).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

import torch

from mt.errors import DeviceUnavailable, MtError, TrainingError
from mt.finetune.data import DataStats, Sample, load_samples
from mt.finetune.distributed import (World, all_reduce_sum, all_succeed, barrier, broadcast_rng, destroy_process_group,
                                     gather_adapter, gather_optimizer, init_process_group, no_sync, rank_device,
                                     same_on_every_rank, scatter_optimizer, shard_from_rank0, wrap_ddp, world_from_env)
from mt.finetune.families import FAMILIES, base_architecture
from mt.finetune.lora import (LoraOptions, add_lora, compute_dtype, load_base, load_lora, lora_skeleton, meta_base,
                              trainable_parameters)
from mt.finetune.packing import Batch, epoch_groups, make_batch
from mt.io.atomic import atomic_dir, check_output, remove_path

STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULES = ("cosine", "linear", "constant")
KERNEL_MODES = ("auto", "triton", "torch", "off")  # torch: the kernels' PyTorch references (for checking)
WARMUP_FRACTION = 0.03


@dataclass(frozen=True)
class TrainOptions:
    base: Path
    data: Path
    output: Path
    lora: LoraOptions = LoraOptions()
    max_steps: int | None = None
    epochs: int | None = None  # default 1 when neither is given
    lr: float = 2e-4
    schedule: str = "cosine"
    warmup_steps: int | None = None  # default: 3% of the steps
    batch_tokens: int = 4096
    grad_accum: int = 1  # packed rows per process per optimizer step
    max_seq_len: int = 2048
    packing: bool = True
    grad_checkpointing: bool = False
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None  # torch CPU threads (default: torch's choice)
    json_log: Path | None = None
    save_every: int | None = None  # steps between checkpoints in OUT.checkpoints/
    resume: Path | None = None
    force: bool = False
    fsdp: bool = False  # under torchrun: shard the model (FSDP2) instead of replicating it (DDP)
    kernels: str = "auto"  # KERNEL_MODES: auto = Triton on a CUDA device, plain PyTorch + PEFT elsewhere


@dataclass(frozen=True)
class StepLog:
    step: int  # 1-based, counted over the resumed run too
    total: int
    loss: float
    lr: float
    tokens_per_s: float  # over all processes

    def json_line(self) -> str:
        return json.dumps({"step": self.step, "loss": round(self.loss, 6), "lr": self.lr,
                           "tokens_per_s": round(self.tokens_per_s, 1)})


@dataclass
class FinetuneResult:
    output: Path
    arch: str
    steps: int  # taken in this run
    total_steps: int
    losses: list[float]
    tokens: int  # over all processes
    seconds: float  # the training steps (and --save-every checkpoints), not loading
    trainable: int
    data: DataStats
    model: Any = field(repr=False, default=None)


LossFn = Callable[[Any, Batch, torch.device], torch.Tensor]


def causal_lm_loss(model: Any, batch: Batch, device: torch.device) -> torch.Tensor:
    """Mean cross-entropy over the trained tokens. use_cache=False: with a cache transformers skips the packed
    sequence detection and samples would attend to each other."""
    return model(**batch.model_inputs(device), use_cache=False).loss


def lr_at(step: int, total: int, warmup: int, peak: float, schedule: str) -> float:
    """Learning rate of the 0-based `step`: linear warmup to `peak` over `warmup` steps, then the schedule."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return peak * (1.0 - progress)
    return peak


class StepPlan:
    """Which packed rows (lists of sample indices) each global step trains on, epoch after epoch (repacked and
    reshuffled each epoch): `rows_per_step` consecutive rows of the epoch, fewer in an epoch's last step."""

    def __init__(self, lengths: list[int], options: TrainOptions, rows_per_step: int = 1) -> None:
        self.lengths, self.options, self.rows_per_step = lengths, options, rows_per_step
        self._epochs: list[list[list[int]]] = []

    def epoch(self, e: int) -> list[list[int]]:
        while len(self._epochs) <= e:
            o = self.options
            self._epochs.append(epoch_groups(self.lengths, o.batch_tokens, o.packing, o.seed, len(self._epochs)))
        return self._epochs[e]

    def total_steps(self) -> int:
        o = self.options
        if o.max_steps is not None:
            return o.max_steps
        return sum(self.steps_in_epoch(e) for e in range(o.epochs or 1))

    def steps_in_epoch(self, e: int) -> int:
        return -(-len(self.epoch(e)) // self.rows_per_step)

    def rows(self, step: int) -> list[list[int]]:
        e = 0
        while step >= self.steps_in_epoch(e):
            step -= self.steps_in_epoch(e)
            e += 1
        return self.epoch(e)[step * self.rows_per_step:(step + 1) * self.rows_per_step]


def check_options(o: TrainOptions) -> None:
    positive = {"--lora-r": o.lora.r, "--batch-tokens": o.batch_tokens, "--grad-accum": o.grad_accum,
                "--max-seq-len": o.max_seq_len,
                "--max-steps": o.max_steps, "--epochs": o.epochs, "--save-every": o.save_every}
    for name, value in positive.items():
        if value is not None and value < 1:
            raise TrainingError(f"{name} must be at least 1 (got {value})", f"pass a positive {name}")
    if o.max_steps is not None and o.epochs is not None:
        raise TrainingError("--max-steps and --epochs both given", "pass one of them")
    if o.packing and o.max_seq_len > o.batch_tokens:
        raise TrainingError(f"--max-seq-len {o.max_seq_len} is longer than a packed row (--batch-tokens {o.batch_tokens})",
                            "raise --batch-tokens or lower --max-seq-len")
    if o.schedule not in SCHEDULES:
        raise TrainingError(f"unknown schedule {o.schedule!r}", f"use one of {', '.join(SCHEDULES)}")
    if not o.lr > 0:
        raise TrainingError(f"--lr must be positive (got {o.lr})", "pass e.g. --lr 2e-4")
    if o.fsdp and o.lora.qlora:
        raise TrainingError("--fsdp does not support --qlora: FSDP2 does not shard bitsandbytes' NF4 weights",
                            "drop --qlora or --fsdp (DDP keeps --qlora)")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("--device cuda: torch sees no CUDA GPU", "use --device cpu or auto")
    return torch.device(name)


def load_tokenizer(base: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a folder it cannot read
        raise MtError(f"cannot load the tokenizer of {base} ({str(e).splitlines()[0]})",
                      "the base folder needs its tokenizer files (tokenizer.json / tokenizer_config.json)") from None


def kernel_mode(o: TrainOptions, device: torch.device) -> str:
    """--kernels resolved: auto takes the Triton kernels on a CUDA device and stays on plain PyTorch elsewhere."""
    if o.kernels == "auto":
        return "triton" if device.type == "cuda" else "off"
    return o.kernels


def apply_kernel_patches(model: Any, mode: str) -> list[str]:
    """mt/kernels swapped into the model in place (mt/finetune/patch.py); what was patched, as log lines."""
    if mode == "off":
        return []
    from mt.finetune.patch import patch_model

    return patch_model(model, kernels=mode).lines()


def chunked_loss(mode: str) -> LossFn:
    """The loss through chunked_cross_entropy: lm_head's logits are never made for the whole batch at once."""
    from mt.finetune import patch

    def loss(model: Any, batch: Batch, device: torch.device) -> torch.Tensor:
        return patch.causal_lm_loss(model, **batch.model_inputs(device), kernels=mode)

    return loss


class ChunkedLossModel(torch.nn.Module):
    """The model whose forward is the chunked loss, for DDP to wrap: DDP's forward prepares its gradient
    reduction, so the loss must be computed inside the module it wraps."""

    def __init__(self, model: torch.nn.Module, mode: str) -> None:
        super().__init__()
        self.model, self.mode = model, mode

    def forward(self, **inputs: torch.Tensor | None) -> torch.Tensor:
        from mt.finetune import patch

        return patch.causal_lm_loss(self.model, **inputs, kernels=self.mode)


def forward_loss(forward: Any, batch: Batch, device: torch.device) -> torch.Tensor:
    """The loss a ChunkedLossModel (inside DDP) returns."""
    return forward(**batch.model_inputs(device))


FSDP_LOSS_METHOD = "mt_chunked_loss"


def register_fsdp_chunked_loss(model: Any, mode: str) -> None:
    """--fsdp: the chunked loss as a method of the sharded root that FSDP treats as a forward, so the root's
    parameters (embeddings, final norm, lm_head) are gathered while it runs and their gradients reduce-scattered."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    from mt.finetune import patch

    def loss(self: Any, **inputs: torch.Tensor | None) -> torch.Tensor:
        return patch.causal_lm_loss(self, **inputs, kernels=mode)

    setattr(model, FSDP_LOSS_METHOD, types.MethodType(loss, model))
    register_fsdp_forward_method(model, FSDP_LOSS_METHOD)


def fsdp_method_loss(model: Any, batch: Batch, device: torch.device) -> torch.Tensor:
    return getattr(model, FSDP_LOSS_METHOD)(**batch.model_inputs(device))


def pick_loss(loss_fn: LossFn, t: "Trainable", fsdp: bool) -> LossFn:
    """The chunked loss replaces the model's own when kernels are on: called on the model in one process, as the
    forward of DDP's ChunkedLossModel, or as FSDP's registered forward method under torchrun."""
    if loss_fn is not causal_lm_loss or t.kernels == "off":
        return loss_fn
    if fsdp:
        return fsdp_method_loss
    return forward_loss if t.world.distributed else chunked_loss(t.kernels)


def describe_loss(loss_fn: LossFn, model: Any) -> str:
    from mt.finetune.patch import base_model, chunked_loss_unsupported

    why_not = chunked_loss_unsupported(base_model(model)) if loss_fn is not causal_lm_loss else "kernels off"
    if why_not:
        return f"loss: the model's own ([tokens, vocab] logits are made: {why_not})"
    return "loss: chunked cross-entropy (no [tokens, vocab] logits)"


@dataclass
class Prepared:
    """Everything decided before any weight is loaded: the base's family, the samples, the step plan."""

    arch: str
    tokenizer: Any
    samples: list[Sample]
    stats: DataStats
    plan: StepPlan
    total: int  # the run's last step
    start: int  # steps already taken (--resume)


@dataclass
class Trainable:
    model: Any  # the PEFT model (what is saved)
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    device: torch.device
    world: World = World()
    forward: Any = None  # what the loss is computed through: DDP around `model` under torchrun, else `model`
    kernels: str = "off"  # the resolved --kernels mode
    patched: list[str] = field(default_factory=list)  # apply_kernel_patches' report

    def __post_init__(self) -> None:
        if self.forward is None:
            self.forward = self.model


def finetune(options: TrainOptions, on_step: Callable[[StepLog], None] | None = None,
             warn: Callable[[str], None] | None = None, info: Callable[[str], None] | None = None,
             loss_fn: LossFn = causal_lm_loss) -> FinetuneResult:
    """Train, save the adapter to options.output. Before training, `warn` hears about truncated/skipped rows and
    `info` gets one line describing the data and the plan. Under torchrun only rank 0 calls the callbacks and
    writes files; `loss_fn` gets the DDP-wrapped model there (with --fsdp, the sharded model itself)."""
    world = world_from_env()
    if not world.is_main:
        on_step = warn = info = None
    try:
        prepared = prepare(options, warn, world)
    except MtError as e:
        raise same_on_every_rank(e) from None
    if info is not None:
        info(describe(prepared, options, world))
    try:
        trainable = build(options, prepared.arch, world)
        began = time.perf_counter()
        loss_fn = pick_loss(loss_fn, trainable, options.fsdp)
        if info is not None and trainable.patched:
            info("; ".join([*trainable.patched, describe_loss(loss_fn, trainable.model)]))
        losses, tokens = train(options, prepared, trainable, on_step, loss_fn)
        seconds = time.perf_counter() - began
        state = training_state(trainable, options.fsdp)  # under --fsdp a collective: every rank
        if world.is_main:
            save(trainable, options, prepared.total, options.output, state)
            remove_path(checkpoints_dir(options.output))
        barrier(world)
    finally:
        destroy_process_group()
    return FinetuneResult(options.output, prepared.arch, prepared.total - prepared.start, prepared.total, losses,
                          tokens, seconds, sum(p.numel() for p in trainable.params),
                          prepared.stats, trainable.model)


def describe(p: Prepared, o: TrainOptions, world: World = World()) -> str:
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(p.stats.kinds.items()))
    resumed = f", resuming after step {p.start}" if p.start else ""
    rows = world.size * o.grad_accum
    per_step = (f"{rows} rows of <= {o.batch_tokens} tokens ({world.size} processes x {o.grad_accum})"
                if rows > 1 else f"<= {o.batch_tokens} tokens")
    return (f"data: {p.stats.rows} rows ({kinds}), {p.stats.tokens:,} tokens of which {p.stats.trained_tokens:,} "
            f"trained; {p.total} steps of {per_step} ({'packed' if o.packing else 'padded'}){resumed}")


def prepare(o: TrainOptions, warn: Callable[[str], None] | None, world: World = World()) -> Prepared:
    """Options, output paths, base architecture, resume state and data: every check that needs no weights."""
    check_options(o)
    check_output(o.output, o.force, folder=True)
    if o.json_log is not None and str(o.json_log) != "-":
        check_output(o.json_log, o.force)
    arch = base_architecture(o.base)
    start = read_state(o.resume)["step"] if o.resume is not None else 0
    tokenizer = load_tokenizer(o.base)
    samples, stats = load_samples(o.data, tokenizer, o.max_seq_len)
    for message in stats.warnings(o.max_seq_len) if warn else ():
        warn(message)
    if o.fsdp and not world.distributed:
        raise TrainingError("--fsdp shards the model over torchrun's processes, and this is one process",
                            "launch with torchrun --nproc-per-node N -m mt finetune ... (N >= 2), or drop --fsdp")
    plan = StepPlan([len(s.input_ids) for s in samples], o, world.size * o.grad_accum)
    if len(plan.epoch(0)) < world.size:
        raise TrainingError(f"the data makes {len(plan.epoch(0))} packed rows of <= {o.batch_tokens} tokens, fewer "
                            f"than the {world.size} processes", "lower --batch-tokens, add data or start fewer processes")
    total = plan.total_steps()
    if start >= total:
        raise TrainingError(f"the run in {o.resume} already took {start} steps, --max-steps/--epochs ask for {total}",
                            "raise --max-steps or --epochs to train further")
    return Prepared(arch, tokenizer, samples, stats, plan, total, start)


def build(o: TrainOptions, arch: str, world: World = World()) -> Trainable:
    """The base with LoRA (new, or the --resume adapter), kernels patched in where there are any, AdamW, and DDP
    around it all under torchrun (every rank seeds alike, so the LoRA inits agree); --fsdp: build_fsdp."""
    if o.threads:
        torch.set_num_threads(o.threads)
    random.seed(o.seed)
    torch.manual_seed(o.seed)
    device = rank_device(pick_device(o.device), world)
    init_process_group(world, device)
    if o.fsdp:
        return build_fsdp(o, arch, world, device)
    model = load_base(o.base, qlora=o.lora.qlora, dtype=compute_dtype(o.dtype, device), device=device)
    family = FAMILIES[arch]
    model = (load_lora(model, o.resume, o.lora.qlora, o.grad_checkpointing) if o.resume is not None
             else add_lora(model, o.lora, family, o.grad_checkpointing))
    kernels = kernel_mode(o, device)
    patched = apply_kernel_patches(model, kernels)
    in_ddp = ChunkedLossModel(model, kernels) if world.distributed and kernels != "off" else model
    forward = wrap_ddp(in_ddp, world, device)
    params = [p for _, p in trainable_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.resume is not None:
        restore_optimizer(optimizer, read_optimizer(o.resume), o.resume)
    return Trainable(model, optimizer, params, device, world, forward, kernels, patched)


def build_fsdp(o: TrainOptions, arch: str, world: World, device: torch.device) -> Trainable:
    """--fsdp: rank 0 alone reads the base on the CPU (and the --resume adapter and optimizer state); the other ranks
    build the same modules on the meta device. Every rank shards its model, then rank 0's weights, buffers,
    optimizer state and RNG state are broadcast into the shards (mt/finetune/distributed.py)."""
    kernels = kernel_mode(o, device)
    model, saved = all_succeed(world, lambda: _fsdp_model(o, arch, world, compute_dtype(o.dtype, device)))
    patched = all_succeed(world, lambda: apply_kernel_patches(model, kernels))
    shard_from_rank0(model, world, device)
    if kernels != "off":
        register_fsdp_chunked_loss(model, kernels)
    named = trainable_parameters(model)
    names, params = [n for n, _ in named], [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.resume is not None:
        scatter_optimizer(model, optimizer, saved["optimizer"] if saved else None, names)
    broadcast_rng(saved["torch_rng"] if saved else torch.get_rng_state())
    return Trainable(model, optimizer, params, device, world, model, kernels, patched)


def _fsdp_model(o: TrainOptions, arch: str, world: World, dtype: torch.dtype) -> tuple[Any, dict[str, Any] | None]:
    """This rank's model before sharding (weights on rank 0, meta tensors elsewhere) and, on rank 0 under --resume,
    the saved optimizer and RNG state (checked against the model)."""
    if not world.is_main:
        model = meta_base(o.base, dtype=dtype)
        return (lora_skeleton(model, o.resume, o.grad_checkpointing) if o.resume is not None
                else add_lora(model, o.lora, FAMILIES[arch], o.grad_checkpointing)), None
    model = load_base(o.base, qlora=False, dtype=dtype, device=torch.device("cpu"))
    if o.resume is None:
        return add_lora(model, o.lora, FAMILIES[arch], o.grad_checkpointing), None
    model = load_lora(model, o.resume, False, o.grad_checkpointing)
    saved = read_optimizer(o.resume)
    restore_optimizer(torch.optim.AdamW([p for _, p in trainable_parameters(model)]), saved, o.resume)  # a check
    return model, saved


def train(o: TrainOptions, prepared: Prepared, t: Trainable, on_step: Callable[[StepLog], None] | None,
          loss_fn: LossFn) -> tuple[list[float], int]:
    """Steps prepared.start .. prepared.total - 1; returns each step's loss and the tokens seen."""
    tokenizer, total = prepared.tokenizer, prepared.total
    warmup = o.warmup_steps if o.warmup_steps is not None else math.ceil(WARMUP_FRACTION * total)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    losses: list[float] = []
    tokens = 0
    t.model.train()
    with open_json_log(o.json_log if t.world.is_main else None) as log:
        for step in range(prepared.start, total):
            micro = micro_batches(prepared, prepared.plan.rows(step), t.world, o.packing, pad_id)
            lr = lr_at(step, total, warmup, o.lr, o.schedule)
            began = time.perf_counter()
            loss, step_tokens = train_step(t, micro, lr, o, step, loss_fn)
            entry = StepLog(step + 1, total, loss, lr, step_tokens / max(time.perf_counter() - began, 1e-9))
            losses.append(loss)
            tokens += step_tokens
            if log is not None:
                print(entry.json_line(), file=log, flush=True)
            if on_step is not None:
                on_step(entry)
            if o.save_every and (step + 1) % o.save_every == 0 and step + 1 < total:
                state = training_state(t, o.fsdp)  # under --fsdp a collective: every rank
                if t.world.is_main:
                    save_checkpoint(t, o, step + 1, state)
                barrier(t.world)
    t.model.eval()
    return losses, tokens


@dataclass(frozen=True)
class MicroBatch:
    batch: Batch
    weight: float  # the row's share of the step's trained tokens x world size; 0 for a rank's stand-in row


def micro_batches(p: Prepared, rows: list[list[int]], world: World, packing: bool, pad_id: int) -> list[MicroBatch]:
    """This process's rows of a step (every world.size-th, from its rank on). A rank left without one in an
    epoch's short last step trains the step's first row with weight 0, so that DDP's all-reduce still meets."""
    trained = [sum(p.samples[i].trained for i in row) for row in rows]
    total = sum(trained)
    mine = list(range(world.rank, len(rows), world.size))
    if not mine:
        return [MicroBatch(make_batch(p.samples, rows[0], packing, pad_id), 0.0)]
    return [MicroBatch(make_batch(p.samples, rows[i], packing, pad_id), trained[i] / total * world.size) for i in mine]


def train_step(t: Trainable, micro: list[MicroBatch], lr: float, o: TrainOptions, step: int,
               loss_fn: LossFn) -> tuple[float, int]:
    """One optimizer step over this process's micro-batches; returns the step's loss (mean over every trained token
    of the global batch) and its tokens, both summed over processes."""
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    loss_sum, tokens = 0.0, 0
    for i, m in enumerate(micro):
        try:
            with no_sync(t.forward, sync=i == len(micro) - 1):
                loss = loss_fn(t.forward, m.batch, t.device) * m.weight
                loss.backward()
        except RuntimeError as e:  # torch.OutOfMemoryError (CUDA) is one; the CPU allocator raises a plain RuntimeError
            if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e) or "can't allocate memory" in str(e):
                raise _out_of_memory(o, t.device, step, m.batch) from None
            raise
        loss_sum += loss.item() / t.world.size
        tokens += m.batch.tokens if m.weight else 0
    value, global_tokens = all_reduce_sum([loss_sum, float(tokens)], t.world)
    if not math.isfinite(value):
        raise same_on_every_rank(TrainingError(f"the loss is {value} at step {step + 1}",
                                               "lower --lr, or train in f32 (--dtype f32)"))
    if o.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(t.params, o.max_grad_norm)
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    return value, int(global_tokens)


def _out_of_memory(o: TrainOptions, device: torch.device, step: int, batch: Batch) -> TrainingError:
    return TrainingError(
        f"out of memory on {device} at step {step + 1} with a batch of {batch.tokens} tokens "
        f"(--batch-tokens {o.batch_tokens}, --max-seq-len {o.max_seq_len})",
        "lower --batch-tokens or --max-seq-len, or add --grad-checkpointing or --qlora")


@contextmanager
def open_json_log(path: Path | None) -> Iterator[TextIO | None]:
    """--json-log FILE (or '-' for stdout): one JSON object per step."""
    if path is None:
        yield None
    elif str(path) == "-":
        yield sys.stdout
    else:
        with path.open("w", encoding="utf-8") as handle:
            yield handle


@dataclass
class TrainingState:
    """What a checkpoint holds beyond the step count."""

    adapter: dict[str, torch.Tensor] | None  # the LoRA tensors; None: save_pretrained reads them off the model
    optimizer: dict[str, Any]  # in optimizer.state_dict()'s form (parameter indices)
    rng: torch.Tensor


def training_state(t: Trainable, fsdp: bool) -> TrainingState:
    """The model's own in one process and DDP; under --fsdp gathered whole from the shards to rank 0 (a collective:
    every rank calls it; the other ranks get empty dicts)."""
    if not fsdp:
        return TrainingState(None, t.optimizer.state_dict(), torch.get_rng_state())
    names = [n for n, _ in trainable_parameters(t.model)]
    return TrainingState(gather_adapter(t.model), gather_optimizer(t.model, t.optimizer, names), torch.get_rng_state())


def save(t: Trainable, o: TrainOptions, step: int, folder: Path, state: TrainingState) -> None:
    """The adapter (peft's save_pretrained), the step count and the optimizer state, atomically into `folder`:
    the same files whether the run was one process, DDP or FSDP."""
    meta = {"step": step, "seed": o.seed, "data": str(o.data), "packing": o.packing, "batch_tokens": o.batch_tokens,
            "grad_accum": o.grad_accum, "world_size": t.world.size, "max_seq_len": o.max_seq_len, "lr": o.lr,
            "schedule": o.schedule, "qlora": o.lora.qlora, "fsdp": o.fsdp}
    with atomic_dir(folder) as tmp:
        t.model.save_pretrained(tmp, state_dict=state.adapter)
        (tmp / STATE_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        torch.save({"optimizer": state.optimizer, "torch_rng": state.rng}, tmp / OPTIMIZER_NAME)


def checkpoints_dir(output: Path) -> Path:
    return output.with_name(output.name + ".checkpoints")


def save_checkpoint(t: Trainable, o: TrainOptions, step: int, state: TrainingState) -> None:
    """--save-every: OUT.checkpoints/step-NNNNNN, a folder --resume takes; only the latest is kept."""
    folder = checkpoints_dir(o.output)
    folder.mkdir(exist_ok=True)
    save(t, o, step, folder / f"step-{step:06d}", state)
    for old in folder.glob("step-*"):
        if old.name != f"step-{step:06d}":
            remove_path(old)


def read_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_NAME
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainingError(f"{folder} has no {STATE_NAME}", "--resume takes a folder mt finetune wrote") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise TrainingError(f"{path} is damaged", "resume from another folder") from None
    if not isinstance(state.get("step"), int) or not (folder / OPTIMIZER_NAME).is_file():
        raise TrainingError(f"{folder} lacks the step count or {OPTIMIZER_NAME}", "--resume takes a folder mt finetune wrote")
    return state


def read_optimizer(folder: Path) -> dict[str, Any]:
    """optimizer.pt: {"optimizer": optimizer.state_dict(), "torch_rng": ...}."""
    return torch.load(folder / OPTIMIZER_NAME, weights_only=True)  # tensors and numbers only: no pickle code runs


def restore_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any], folder: Path) -> None:
    try:
        optimizer.load_state_dict(saved["optimizer"])
    except (ValueError, KeyError) as e:
        raise TrainingError(f"the optimizer state in {folder} does not fit this model ({e})",
                            "resume with the base and LoRA settings of that run") from None
    torch.set_rng_state(saved["torch_rng"])
