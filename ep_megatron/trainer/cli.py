"""The ``ep-megatron`` command line: ``train``, ``report`` and ``ckpt``."""

from __future__ import annotations

import argparse
import sys

from ep_megatron.trainer.shipped import resolve_shipped, shipped_names
from ep_megatron.version import __version__


def _run_train(args: argparse.Namespace) -> int:
    if args.dry_run:
        return _dry_run(args)
    from ep_megatron.trainer.loop import train

    train(resolve_shipped(args.config, ".yaml"), args.set, args.run_dir)
    return 0


def _dry_run(args: argparse.Namespace) -> int:
    """Print the per-GPU memory estimate; a config that does not fit raises ``ValueError`` (exit 2)."""
    import os

    from ep_megatron.trainer.config import load_config
    from ep_megatron.trainer.memory import GB, dry_run

    config = load_config(args.config, args.set)
    world_size = (args.world_size or int(os.environ.get("WORLD_SIZE", 0)) or config.train.expert_parallel_size
                  or 1)
    gpu_bytes = int(args.gpu_memory_gb * GB) if args.gpu_memory_gb else _local_gpu_bytes()
    dry_run(config, world_size, gpu_bytes, args.vocab_size, args.expert_imbalance)
    return 0


def _local_gpu_bytes() -> int:
    """This machine's GPU memory, or an H200's 141 GB without a GPU."""
    import torch

    from ep_megatron.trainer.memory import GB

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return 141 * GB


def _run_report(args: argparse.Namespace) -> int:
    from ep_megatron.trainer.report import write_comparison, write_report

    if len(args.run_dirs) == 1:
        print(f"report written to {write_report(args.run_dirs[0])}")
    elif len(args.run_dirs) == 2:
        print(f"comparison written to {write_comparison(*args.run_dirs, out=args.out)}")
    else:
        raise ValueError(f"give one run directory, or two to compare; got {len(args.run_dirs)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ep_megatron.trainer.ckpt_cli import add_ckpt_subcommands

    parser = argparse.ArgumentParser(
        prog="ep-megatron",
        description="Expert-parallel MoE training with training-time expert load balancing.",
    )
    parser.add_argument("--version", action="version", version=f"ep-megatron {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser("train", help="pretrain an MoE GPT (launch with torchrun or deepspeed)")
    train.add_argument("config", help="YAML run config: a path, or the name of a shipped config ("
                       f"{', '.join(shipped_names('.yaml'))})")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value (repeatable), e.g. --set train.steps=50")
    train.add_argument("--run-dir", default=None, help="output folder (default runs/CONFIG_NAME)")
    train.add_argument("--dry-run", action="store_true",
                       help="print the per-GPU memory estimate (parameters, gradients, optimizer state, "
                            "activations) and exit; a config that does not fit is an error")
    train.add_argument("--world-size", type=int, default=0,
                       help="--dry-run: GPUs of the run (default $WORLD_SIZE, else the EP size)")
    train.add_argument("--gpu-memory-gb", type=float, default=0.0,
                       help="--dry-run: memory per GPU in GB (default: this GPU's, else 141: an H200)")
    train.add_argument("--vocab-size", type=int, default=None,
                       help="--dry-run: vocabulary size when the config's tokenizer file is not at hand")
    train.add_argument("--expert-imbalance", type=float, default=1.5,
                       help="--dry-run: expert rows of the busiest rank over the mean (default 1.5)")
    train.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    train.set_defaults(run=_run_train)
    report = sub.add_parser("report", help="regenerate RUN_DIR/report/ from a run's metrics; with two "
                            "runs, a side-by-side page (loss, tokens/s, max/mean)")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="one run, or two to compare (A B)")
    report.add_argument("--out", default=None,
                        help="folder of the comparison page (default: compare_A_vs_B beside run A)")
    report.set_defaults(run=_run_report)
    add_ckpt_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, ImportError) as exc:  # bad input or a missing extra: named
        print(f"ep-megatron {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
