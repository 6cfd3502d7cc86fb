"""Thin wrapper for launchers that need a script path (the ``deepspeed`` launcher):
``deepspeed --num_gpus N scripts/pretrain_moe.py CONFIG.yaml [--set k=v ...] [--run-dir DIR]``."""

import sys

from ep_megatron.trainer.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
