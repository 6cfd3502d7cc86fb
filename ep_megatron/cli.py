"""The ``ep-megatron`` command line."""

from __future__ import annotations

import argparse
import sys

from ep_megatron.version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ep-megatron",
        description="Expert-parallel MoE training with training-time expert load balancing.",
    )
    parser.add_argument("--version", action="version", version=f"ep-megatron {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
