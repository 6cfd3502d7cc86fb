"""The ``ep-megatron`` command line: ``train``, ``report`` and ``ckpt``."""

from __future__ import annotations

import argparse
import sys

from ep_megatron.version import __version__


def _run_train(args: argparse.Namespace) -> int:
    from ep_megatron.trainer.loop import train

    train(args.config, args.set, args.run_dir)
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from ep_megatron.trainer.report import write_report

    print(f"report written to {write_report(args.run_dir)}")
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
    train.add_argument("config", help="YAML run config, e.g. configs/tiny_cpu.yaml")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value (repeatable), e.g. --set train.steps=50")
    train.add_argument("--run-dir", default=None, help="output folder (default runs/CONFIG_NAME)")
    train.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    train.set_defaults(run=_run_train)
    report = sub.add_parser("report", help="regenerate RUN_DIR/report/ from a run's metrics")
    report.add_argument("run_dir")
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
    except (ValueError, FileNotFoundError) as exc:  # bad input: the message names it, no traceback
        print(f"ep-megatron {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
