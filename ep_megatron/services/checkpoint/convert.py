"""Conversions of layout-free checkpoints, in one process without collectives: full tensors out
(consolidated safetensors / torch files, DeepSpeed MoE expert files) and in (DeepSpeed MoE files,
or any full tensors with Megatron names written as a checkpoint)."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from ep_megatron.placement import ExpertPlacement
from ep_megatron.services.checkpoint.files import (
    FORMAT_VERSION,
    LATEST_FILE,
    MEGATRON_METADATA,
    checkpoint_dirname,
    file_entries,
    publish,
    read_manifest,
    read_tensor_file,
    resolve_checkpoint,
    write_json,
    write_torch,
)
from ep_megatron.services.checkpoint.layout import EXPERT_PARAM_NAMES, join, quiet
from ep_megatron.services.checkpoint.optimizer import OPTIMIZER_PREFIX


def read_tensors(path: str | Path, prefix_filter: str | None = None) -> dict[str, torch.Tensor]:
    """Full tensors of a checkpoint (experts as ``[E, *row]``), read in this process without collectives.

    ``prefix_filter`` keeps keys that start with it; by default the optimizer state is left out.
    """
    path = resolve_checkpoint(path)
    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    targets = {}
    for key, m in meta.items():
        if not hasattr(m, "size"):
            continue
        wanted = key.startswith(prefix_filter) if prefix_filter is not None else not key.startswith(
            OPTIMIZER_PREFIX)
        if wanted:
            targets[key] = torch.empty(m.size, dtype=m.properties.dtype)
    with quiet():
        dcp.load(targets, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    return targets


def save_tensors_checkpoint(root: str | Path, step: int, tensors: dict[str, torch.Tensor], *,
                            config: dict[str, Any], moe_prefixes: list[str]) -> Path:
    """Write full tensors (Megatron names, experts ``[E, *row]``) as a checkpoint, in this process.

    The result loads like any other checkpoint (model only; the recorded placement is the ``model``
    strategy on one rank). Used by the converters.
    """
    root = Path(root)
    final = root / checkpoint_dirname(step)
    if final.exists():
        raise ValueError(f"{final} already exists; checkpoints are never overwritten")
    fc1_keys = [join(p, f"experts.{EXPERT_PARAM_NAMES['fc1_weight']}") for p in moe_prefixes]
    missing = [k for k in fc1_keys if k not in tensors]
    if not moe_prefixes or missing:
        raise ValueError(f"moe_prefixes={moe_prefixes}: expert tensors {missing} not in the tensors")
    num_experts = int(tensors[fc1_keys[0]].shape[0])
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{checkpoint_dirname(step)}-", dir=root))
    with quiet():
        dcp.save({k: t.contiguous() for k, t in tensors.items()}, storage_writer=dcp.FileSystemWriter(tmp),
                 no_dist=True)
    write_torch(tmp / "common.pt", {"iteration": step, "checkpoint_version": 3.0})
    write_json(tmp / "metadata.json", MEGATRON_METADATA)
    write_torch(tmp / "state.pt", {})
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "world_size": 1,
        "ep_size": 1,
        "config": config,
        "placement": ExpertPlacement.model(len(moe_prefixes), num_experts, 1).to_dict(),
        "moe_layers": [{"prefix": p, "layer_idx": i} for i, p in enumerate(moe_prefixes)],
        "tensors_model": {k: list(t.shape) for k, t in tensors.items()},
        "optimizer": None,
        "rebalancer": None,
        "rng": False,
        "extra": {},
    }
    publish(tmp, final, manifest, file_entries(tmp, sorted(p.name for p in tmp.iterdir())))
    return final


# ---- DeepSpeed MoE expert files ----------------------------------------------------------------------
DS_EXPERTS = "deepspeed_moe.experts.deepspeed_experts"  # DeepSpeed MoE's expert module path
DS_GATE = "deepspeed_moe.gate.wg.weight"  # DeepSpeed's router weight [E, hidden]
DS_MODEL_FILE = "mp_rank_00_model_states.pt"
_DS_EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt")


def deepspeed_expert_file(directory: str | Path, moe_layer: int, expert: int) -> Path:
    """DeepSpeed's ``DeepSpeedEngine._get_expert_ckpt_name`` (model-parallel rank 0)."""
    return Path(directory) / f"layer_{moe_layer}_expert_{expert}_mp_rank_00_model_states.pt"


def export_deepspeed(path: str | Path, out_dir: str | Path, tag: str | None = None) -> Path:
    """Write a checkpoint's weights as DeepSpeed MoE files: ``out_dir/{tag}/`` plus ``out_dir/latest``.

    Expert ``e`` of MoE layer ``i`` (module ``prefix``) goes to ``layer_{i}_expert_{e}_mp_rank_00_model_
    states.pt`` with keys ``{prefix}.deepspeed_moe.experts.deepspeed_experts.{e}.linear_fc{1,2}.weight``;
    the router becomes ``{prefix}.deepspeed_moe.gate.wg.weight`` and every other tensor keeps its name in
    ``mp_rank_00_model_states.pt["module"]``.
    """
    path = resolve_checkpoint(path)
    manifest = read_manifest(path)
    tensors = read_tensors(path)
    tag = tag or f"global_step{manifest['step']}"
    target = Path(out_dir) / tag
    target.mkdir(parents=True, exist_ok=False)
    for moe_layer, entry in enumerate(manifest["moe_layers"]):
        prefix = entry["prefix"]
        stacked = {name: tensors.pop(join(prefix, f"experts.{name}"))
                   for name in EXPERT_PARAM_NAMES.values()}
        num_experts = next(iter(stacked.values())).shape[0]
        for expert in range(num_experts):
            weights = {join(prefix, f"{DS_EXPERTS}.{expert}.{name}"): t[expert].clone()
                       for name, t in stacked.items()}
            torch.save(weights, deepspeed_expert_file(target, moe_layer, expert))
        tensors[join(prefix, DS_GATE)] = tensors.pop(join(prefix, "router.weight"))
    torch.save({"module": tensors, "global_steps": manifest["step"], "dp_world_size": 1, "mp_world_size": 1},
               target / DS_MODEL_FILE)
    (Path(out_dir) / LATEST_FILE).write_text(tag)
    return target


def import_deepspeed(ds_dir: str | Path, tag: str | None = None,
                     ) -> tuple[dict[str, torch.Tensor], list[str], int]:
    """Read DeepSpeed MoE files: full tensors with our (Megatron) names, MoE prefixes, and the step.

    Expert weights ``{prefix}.deepspeed_moe.experts.deepspeed_experts.{e}.{name}`` are stacked over
    ``e`` into ``{prefix}.experts.{name} [E, ...]``; the gate becomes ``{prefix}.router.weight``. Files
    are read with ``weights_only=True``: a file holding arbitrary objects is refused.
    """
    ds_dir = Path(ds_dir)
    if tag is None:
        latest = ds_dir / LATEST_FILE
        if not latest.is_file():
            raise FileNotFoundError(f"{ds_dir}: no tag given and no '{LATEST_FILE}' file")
        tag = latest.read_text().strip()
    directory = ds_dir / tag
    model_file = directory / DS_MODEL_FILE
    model_state = read_tensor_file(model_file) if model_file.is_file() else {"module": {}}
    tensors = dict(model_state["module"])
    experts: dict[str, dict[int, torch.Tensor]] = {}
    prefixes: dict[int, str] = {}
    for file in sorted(directory.iterdir()):
        match = _DS_EXPERT_FILE.fullmatch(file.name)
        if match is None:
            continue
        moe_layer, expert = int(match.group(1)), int(match.group(2))
        for key, value in read_tensor_file(file).items():
            prefix, sep, name = key.partition(f"{DS_EXPERTS}.{expert}.")
            if not sep:
                raise ValueError(f"{file.name}: key {key!r} is not expert {expert}'s")
            prefix = prefix.rstrip(".")
            prefixes.setdefault(moe_layer, prefix)
            experts.setdefault(join(prefix, f"experts.{name}"), {})[expert] = value
    if not experts:
        raise FileNotFoundError(f"{directory}: no layer_*_expert_*_mp_rank_00_model_states.pt files")
    for key, by_expert in experts.items():
        if sorted(by_expert) != list(range(len(by_expert))):
            raise ValueError(f"{key}: expert ids {sorted(by_expert)} are not 0..{len(by_expert) - 1}")
        tensors[key] = torch.stack([by_expert[e] for e in range(len(by_expert))])
    moe_prefixes = [prefixes[i] for i in sorted(prefixes)]
    for prefix in moe_prefixes:
        gate = join(prefix, DS_GATE)
        if gate in tensors:
            tensors[join(prefix, "router.weight")] = tensors.pop(gate)
    return tensors, moe_prefixes, int(model_state.get("global_steps", 0))


# ---- consolidated export ---------------------------------------------------------------------------
def export_consolidated(path: str | Path, out_file: str | Path) -> Path:
    """One-file model ``state_dict`` for inference (experts ``[E, *row]``, Megatron names).

    ``.safetensors`` writes safetensors (needs the ``safetensors`` package); any other suffix a
    ``torch.save`` file.
    """
    path = resolve_checkpoint(path)
    manifest = read_manifest(path)
    tensors = {k: t.contiguous() for k, t in read_tensors(path).items()}
    out_file = Path(out_file)
    if out_file.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(out_file), metadata={"step": str(manifest["step"]),
                                                    "config": json.dumps(manifest["config"])})
    else:
        torch.save(tensors, out_file)
    return out_file
