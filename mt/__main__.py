"""`python -m mt ...`, the form torchrun launches: torchrun --nproc-per-node N -m mt finetune ..."""

from mt.cli import main

main(prog_name="mt")
