"""``ep-megatron ckpt``: inspect and convert layout-free checkpoints (single process, no GPU).

torch and the checkpoint code are imported by the commands that run, not by registering them, so that
``ep-megatron report`` and ``--help`` start without torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ep_megatron.placement import ExpertPlacement

CONVERT_TARGETS = ("deepspeed", "safetensors", "torch", "hf", "ep-megatron")
IMPORT_SOURCES = ("deepspeed", "hf")


def add_ckpt_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``ckpt inspect`` and ``ckpt convert`` on the top-level ``ep-megatron`` parser."""
    parser = subparsers.add_parser("ckpt", help="inspect and convert checkpoints")
    parser.set_defaults(run=lambda args: _help(parser))
    commands = parser.add_subparsers(dest="ckpt_command", metavar="ACTION")

    inspect = commands.add_parser("inspect", help="config, step, placement and per-layer load balance")
    inspect.add_argument("path", help="a checkpoint directory, or a root whose 'latest' names one")
    inspect.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    inspect.add_argument("--no-verify", action="store_true", help="skip the file checksum verification")
    inspect.set_defaults(run=run_inspect)

    convert = commands.add_parser(
        "convert",
        help="to DeepSpeed MoE expert files, a consolidated safetensors / torch file or a Hugging Face "
             "directory; from DeepSpeed or Hugging Face",
    )
    convert.add_argument("src", help="our checkpoint (or root); a DeepSpeed / HF dir for --to ep-megatron")
    convert.add_argument("dst", help="output dir (deepspeed, hf, ep-megatron) or file (safetensors, torch)")
    convert.add_argument("--to", required=True, choices=CONVERT_TARGETS, help="output format")
    convert.add_argument("--from", dest="source", default="deepspeed", choices=IMPORT_SOURCES,
                         help="what src is with --to ep-megatron (default: deepspeed)")
    convert.add_argument("--tag", default=None, help="DeepSpeed tag (default: global_step{N} / 'latest')")
    convert.add_argument("--config", default=None,
                         help="JSON file with the MoE config fields to record (--to ep-megatron --from "
                              "deepspeed; with --from hf: extra fields such as sharding_strategy)")
    convert.add_argument("--hf-config", default=None,
                         help="--to hf: the HF config.json (or its dir) when the checkpoint records none")
    convert.add_argument("--model-config", default=None,
                         help="--to hf for a MoEGPT checkpoint of `ep-megatron train`: its run YAML")
    convert.add_argument("--max-shard-mb", type=int, default=5000, help="--to hf: largest safetensors shard")
    convert.set_defaults(run=run_convert)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


# ---- inspect ---------------------------------------------------------------------------------------
def summarize(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Summary of a checkpoint: step, layout, config, placement, per-layer load balance (max / mean tokens
    per rank of the saved load window under the saved placement, 1.0 is perfect), integrity."""
    from ep_megatron.placement import ExpertPlacement
    from ep_megatron.services import checkpoint as ckpt

    path = ckpt.resolve_checkpoint(path)
    manifest = ckpt.read_manifest(path)
    placement = ExpertPlacement.from_dict(manifest["placement"])
    replicas = placement.replica_count  # [L, E]
    summary: dict[str, Any] = {
        "path": str(path),
        "step": manifest["step"],
        "world_size": manifest["world_size"],
        "ep_size": manifest["ep_size"],
        "config": manifest["config"],
        "placement": {
            "strategy": placement.strategy,
            "ep_size": placement.ep_size,
            "num_slots": placement.num_slots,
            "slots_per_rank": placement.slots_per_rank,
            "num_logical_experts": placement.num_logical_experts,
            "max_replicas_per_layer": replicas.max(1).values.tolist(),
            "replicated_experts_per_layer": (replicas > 1).sum(1).tolist(),
        },
        "moe_layers": [entry["prefix"] for entry in manifest["moe_layers"]],
        "has_optimizer": manifest["optimizer"] is not None,
        "num_tensors": len(manifest["tensors"]),
        "bytes": sum(entry["bytes"] for entry in manifest["files"].values()),
    }
    loads = window_loads(path, manifest, placement)
    if loads is not None:
        ratio = max_over_mean(placement, loads)
        summary["max_over_mean_per_layer"] = [round(r, 4) for r in ratio.tolist()]
        summary["max_over_mean_worst_layer"] = round(float(ratio.max()), 4)
        summary["tokens_per_layer"] = loads.sum(1).tolist()
    if verify:
        summary["problems"] = ckpt.verify_files(path, manifest)
    return summary


def max_over_mean(placement: ExpertPlacement, loads: torch.Tensor) -> torch.Tensor:
    """``[L]`` float64 max / mean tokens per rank of each layer under ``placement`` for logical-expert
    ``loads [L, E]`` (each expert's tokens split evenly over its replicas); 1.0 for a layer without load."""
    import torch

    from ep_megatron.placement.eplb import rank_loads

    per_rank = rank_loads(placement.physical_to_logical, loads, placement.ep_size)  # [L, ranks]
    mean = per_rank.mean(1)
    return torch.where(mean > 0, per_rank.max(1).values / mean.clamp(min=1e-300), 1.0)


def window_loads(path: Path, manifest: dict[str, Any], placement: ExpertPlacement) -> torch.Tensor | None:
    """``[L, E]`` global loads of the rebalancer's saved window (summed over it), or None without one."""
    from ep_megatron.services import checkpoint as ckpt

    if not manifest["rebalancer"] or "load_window" not in manifest["rebalancer"]:
        return None
    window = ckpt.read_tensor_file(path / "state.pt")[manifest["rebalancer"]["load_window"]["__tensor__"]]
    return window.reshape(-1, placement.num_layers, placement.num_logical_experts).sum(0)


def run_inspect(args: argparse.Namespace) -> int:
    summary = summarize(args.path, verify=not args.no_verify)
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary))
    return 1 if summary.get("problems") else 0


def format_summary(summary: dict[str, Any]) -> str:
    placement = summary["placement"]
    lines = [
        f"checkpoint   {summary['path']}",
        f"step         {summary['step']}",
        f"saved on     {summary['world_size']} ranks, ep_size {summary['ep_size']}",
        f"size         {summary['bytes'] / 2**20:.1f} MiB in {summary['num_tensors']} tensors"
        f"{' (with optimizer state)' if summary['has_optimizer'] else ''}",
        "config       " + ", ".join(f"{k}={v}" for k, v in sorted(summary["config"].items())),
        f"placement    {placement['strategy']}: {placement['num_logical_experts']} logical experts on "
        f"{placement['num_slots']} slots ({placement['slots_per_rank']} per rank x {placement['ep_size']})",
    ]
    ratio = summary.get("max_over_mean_per_layer")
    for i, prefix in enumerate(summary["moe_layers"]):
        text = f"  layer {i:3d} {prefix}: replicated experts {placement['replicated_experts_per_layer'][i]}"
        if ratio is not None:
            text += f", max/mean {ratio[i]:.3f} over {summary['tokens_per_layer'][i]} token-expert pairs"
        lines.append(text)
    if ratio is not None:
        worst = summary["max_over_mean_worst_layer"]
        lines.append(f"worst layer max/mean {worst:.3f} (max / mean tokens per rank, 1.0 is perfect)")
    problems = summary.get("problems")
    if problems is not None:
        status = "OK" if not problems else "FAILED:\n  " + "\n  ".join(problems)
        lines.append(f"integrity    {status}")
    return "\n".join(lines)


# ---- convert ---------------------------------------------------------------------------------------
def run_convert(args: argparse.Namespace) -> int:
    from ep_megatron.services import checkpoint as ckpt

    if args.to == "deepspeed":
        out = ckpt.export_deepspeed(args.src, args.dst, tag=args.tag)
    elif args.to in ("safetensors", "torch"):
        suffix = ".safetensors" if args.to == "safetensors" else ".pt"
        dst = Path(args.dst)
        if dst.suffix != suffix:
            raise ValueError(f"--to {args.to} writes a '{suffix}' file, got dst={args.dst}")
        out = ckpt.export_consolidated(args.src, dst)
    elif args.to == "hf":
        out = _convert_to_hf(args)
    elif args.source == "hf":
        from ep_megatron.integrations import hf

        options = json.loads(Path(args.config).read_text()) if args.config else {}
        out = hf.import_hf(args.src, args.dst, **options)
    else:
        if args.config is None:
            raise ValueError("--to ep-megatron needs --config CONFIG.json (the model's MoE config fields)")
        config = json.loads(Path(args.config).read_text())
        tensors, prefixes, step = ckpt.import_deepspeed(args.src, tag=args.tag)
        out = ckpt.save_tensors_checkpoint(args.dst, step, tensors, config=config, moe_prefixes=prefixes)
    print(out)
    return 0


def _convert_to_hf(args: argparse.Namespace) -> Path:
    """A swapped HF model's checkpoint -> its family's layout; a MoEGPT's (--model-config) -> Mixtral."""
    from ep_megatron.integrations import hf

    max_shard_bytes = args.max_shard_mb * 2**20
    if args.model_config is None:
        return hf.export_hf(args.src, args.dst, hf_config=args.hf_config, max_shard_bytes=max_shard_bytes)
    from ep_megatron.services import checkpoint as ckpt
    from ep_megatron.trainer.config import gpt_config, load_config

    path = ckpt.resolve_checkpoint(args.src)
    shapes = ckpt.read_manifest(path)["tensors_model"]
    if "embed.weight" not in shapes:
        raise ValueError(f"{path} is not a MoEGPT checkpoint (no embed.weight); drop --model-config")
    model = gpt_config(load_config(args.model_config), shapes["embed.weight"][0])
    from ep_megatron.trainer.hf_export import export_moegpt_mixtral

    return export_moegpt_mixtral(path, args.dst, model, max_shard_bytes=max_shard_bytes)
