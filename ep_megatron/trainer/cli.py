"""The ``ep-megatron`` command line: ``train``, ``report`` and ``ckpt``."""

from __future__ import annotations

import argparse
import sys

from ep_megatron.trainer.shipped import resolve_shipped, shipped_names
from ep_megatron.version import __version__


def _run_train(args: argparse.Namespace) -> int:
    from ep_megatron.trainer.loop import train

    train(resolve_shipped(args.config, ".yaml"), args.set, args.run_dir)
    return 0


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
