"""`mt finetune`: LoRA/QLoRA training on plain PyTorch + PEFT.

data.py      JSONL rows (text / prompt+completion / messages) -> token ids + labels
packing.py   padding-free packing (position ids restart per sample) or padded batches
families.py  the bases it trains (static map by config.architectures[0]) and their linear layers
lora.py      the base (16/32-bit, or bitsandbytes NF4) wrapped by a PEFT LoRA
trainer.py   the loop: AdamW, warmup + decay, gradient accumulation, progress, JSON log, save, resume
distributed.py  torchrun: process group, DDP or FSDP2 (--fsdp), rank-0-only output
"""
