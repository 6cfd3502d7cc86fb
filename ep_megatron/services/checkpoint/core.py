"""Save and load layout-free checkpoints of a model's MoE layers (and its dense part, optimizer,
rebalancer and RNG), collectively over all ranks.

A checkpoint is a directory written with ``torch.distributed.checkpoint`` (DCP), each rank writing only
what it owns (the logical-expert layout of :mod:`.layout`), plus ``metadata.json`` and ``common.pt`` as
Megatron writes them (so ``megatron.core.dist_checkpointing.load`` reads the expert and router tensors),
``rng_rank{r}.pt``, ``state.pt`` (rebalancer tensors) and ``manifest.json`` (:mod:`.files`). Loading works
under any EP size, DP size, strategy and number of redundant slots, and is all-or-nothing: every check
runs and every tensor is read into fresh buffers before the first write into the model, the optimizer,
the rebalancer or the placement.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from ep_megatron.layer.moe_layers import MoELayers
from ep_megatron.parallel.comm import all_gather_object, broadcast_object, host_all_reduce, raise_if_any
from ep_megatron.parallel.groups import ParallelGroups
from ep_megatron.placement import ExpertPlacement
from ep_megatron.services.checkpoint.files import (
    FORMAT_VERSION,
    MEGATRON_METADATA,
    checkpoint_dirname,
    file_entries,
    make_tmp_dir,
    publish,
    read_manifest,
    read_tensor_file,
    resolve_checkpoint,
    verify_files,
    write_json,
    write_torch,
)
from ep_megatron.services.checkpoint.layout import (
    ModelView,
    check_compatible,
    config_dict,
    dcp_kwargs,
    gather_rows,
    global_rank,
    load_rows,
    model_shapes,
    model_view,
    quiet,
    save_rows,
    world_size,
)
from ep_megatron.services.checkpoint.optimizer import (
    OptimizerLike,
    optimizer_apply,
    optimizer_load_targets,
    optimizer_save,
)

# Rebalancer state entries holding per-rank token counts ([..., L, E] int tensors): saved as their sum over
# ranks and restored on rank 0 only (zeros elsewhere), so the rebalancer's all-reduce sees the same
# global load under any world size.
REBALANCER_COUNTERS = ("load_window", "since_rebalance")


# ---- JSON / tensor split of nested states ----------------------------------------------------------
def _split_tensors(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """Replace tensors of a nested dict/list by ``{"__tensor__": name}``, collecting them in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").clone()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise ValueError(f"state at '{path}' has non-string keys {list(obj)[:4]}")
        return {k: _split_tensors(v, tensors, f"{path}/{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ValueError(f"state at '{path}' has type {type(obj).__name__}; only tensors and JSON values")


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


# ---- RNG -------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, torch.Tensor]:
    """This rank's RNG states as tensors (torch CPU, CUDA when present, Python's ``random``)."""
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss = random.getstate()
    state["python"] = torch.tensor(internal, dtype=torch.int64)
    state["python_meta"] = torch.tensor([version, float("nan") if gauss is None else gauss],
                                        dtype=torch.float64)
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    version, gauss = state["python_meta"].tolist()
    random.setstate((int(version), tuple(state["python"].tolist()), None if gauss != gauss else gauss))


# ---- save ------------------------------------------------------------------------------------------
def _global_counters(state: dict[str, Any], groups: ParallelGroups) -> dict[str, Any]:
    """``state`` with its per-rank counters summed over all ranks (collective, over the host group)."""
    state = dict(state)
    for key in REBALANCER_COUNTERS:
        if key in state:
            total = torch.as_tensor(state[key]).detach().to("cpu").clone()
            state[key] = host_all_reduce(total, groups, f"rebalancer {key}")
    return state


def _model_save_state(view: ModelView) -> dict[str, Any]:
    state: dict[str, Any] = {name: t.detach().to("cpu") for name, t in view.dense.items()}
    for key, expert in view.experts.items():
        rows = save_rows(expert, expert.param)
        if rows is not None:
            state[key] = rows
    return state


def save_checkpoint(root: str | Path, step: int, moe: MoELayers, optimizer: OptimizerLike | None, *,
                    rebalancer: Any | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Save ``moe.model`` (and ``optimizer``, ``rebalancer``) as ``root/step_{step:08d}`` and point
    ``root/latest`` at it; collective over all ranks.

    Experts are stored by logical id (one copy, whatever the replicas). ``extra`` is JSON data
    returned by :func:`load_checkpoint`. Returns the checkpoint directory.
    """
    root = Path(root)
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    final = root / checkpoint_dirname(step)
    if final.exists():
        raise ValueError(f"{final} already exists; checkpoints are never overwritten")
    try:
        extra_json = json.loads(json.dumps(extra or {}))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"extra must be JSON data (dicts, lists, numbers, strings): {exc}") from exc
    view = model_view(moe)
    rebalancer_tensors: dict[str, torch.Tensor] = {}
    rebalancer_json = None
    if rebalancer is not None:
        rebalancer_json = _split_tensors(_global_counters(rebalancer.state_dict(), moe.groups),
                                         rebalancer_tensors)

    tmp = make_tmp_dir(root, step)
    state = _model_save_state(view)
    optimizer_json = None if optimizer is None else optimizer_save(optimizer, view, state)
    with quiet():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True), **dcp_kwargs())

    my_rank, num_ranks = global_rank(), world_size()
    error = None
    try:
        write_torch(tmp / f"rng_rank{my_rank}.pt", _rng_state())
        if my_rank == 0:
            write_torch(tmp / "common.pt", {"iteration": step, "checkpoint_version": 3.0})
            write_json(tmp / "metadata.json", MEGATRON_METADATA)
            write_torch(tmp / "state.pt", rebalancer_tensors)
    except OSError as exc:
        error = f"writing {tmp}: {exc}"
    raise_if_any(all_gather_object(error), "checkpoint write")
    names = sorted(p.name for p in tmp.iterdir())
    files = all_gather_object(file_entries(tmp, names[my_rank::num_ranks]))

    status = None
    if my_rank == 0:
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": num_ranks,
            "ep_size": moe.groups.ep_size,
            "config": config_dict(moe.config),
            "placement": moe.placement.to_dict(),
            "moe_layers": [{"prefix": p, "layer_idx": layer.layer_idx} for p, layer in zip(moe.names, moe)],
            "tensors_model": model_shapes(view),
            "optimizer": optimizer_json,
            "rebalancer": rebalancer_json,
            "rng": True,
            "extra": extra_json,
        }
        try:
            publish(tmp, final, manifest, {name: entry for part in files for name, entry in part.items()})
        except OSError as exc:
            status = f"publishing {final}: {exc}"
    raise_if_any([broadcast_object(status)], "checkpoint publish")
    return final


# ---- load ------------------------------------------------------------------------------------------
def _rebalancer_state(path: Path, manifest: dict[str, Any], rebalancer: Any) -> dict[str, Any] | None:
    """The saved rebalancer state as this rank restores it (counters on rank 0 only), checked."""
    if rebalancer is None or manifest["rebalancer"] is None:
        return None
    state = _join_tensors(manifest["rebalancer"], read_tensor_file(path / "state.pt"))
    if global_rank() != 0:
        state.update({key: torch.zeros_like(state[key]) for key in REBALANCER_COUNTERS if key in state})
    rebalancer.check_state_dict(state)
    return state


def _target_placement(manifest: dict[str, Any], moe: MoELayers, restore: bool) -> ExpertPlacement:
    """The saved placement when asked and it fits the current layout (EP size, slots), else the active."""
    saved, current = ExpertPlacement.from_dict(manifest["placement"]), moe.placement
    fits = (saved.num_layers, saved.ep_size, saved.num_slots) == (
        current.num_layers, current.ep_size, current.num_slots)
    return saved if restore and fits and saved != current else current


def load_checkpoint(path_or_root: str | Path, moe: MoELayers, optimizer: OptimizerLike | None, *,
                    rebalancer: Any | None = None, restore_placement: bool = True,
                    verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint into ``moe.model`` / ``optimizer`` / ``rebalancer`` under the current layout.

    Every local slot reads the row of the logical expert its placement maps it to. When
    ``restore_placement`` and the saved placement fits the current layout (same EP size and slots), the
    saved placement becomes active. RNG states are restored when the world size is unchanged.
    ``verify`` checks the size and CRC32 of every file (split over ranks). Collective over all ranks.
    All-or-nothing: a failed check leaves model, optimizer, rebalancer and placement untouched.
    Returns ``{"step", "extra", "path", "placement_restored", "rng_restored"}``; ``placement_restored``
    says whether the saved placement is the active one now.
    """
    path = resolve_checkpoint(path_or_root)
    manifest = read_manifest(path)
    check_compatible(manifest, model_view(moe), moe)
    if optimizer is not None and manifest["optimizer"] is None:
        raise ValueError(f"{path} holds no optimizer state; pass optimizer=None to load the model only")
    rebalancer_state = _rebalancer_state(path, manifest, rebalancer)
    if verify:
        names = sorted(manifest["files"])
        problems = verify_files(path, manifest, names[global_rank() :: world_size()])
        raise_if_any(all_gather_object("; ".join(problems) or None), f"verifying {path}")
    placement = _target_placement(manifest, moe, restore_placement)
    view = model_view(moe, placement)

    tensor_meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    dense = {name: torch.empty_like(t, device="cpu") for name, t in view.dense.items()}
    targets: dict[str, Any] = dict(dense)
    expert_rows = {}
    for key, expert in view.experts.items():
        targets[key], expert_rows[key] = load_rows(expert, expert.param.dtype)
    buffers = None
    if optimizer is not None:
        buffers = optimizer_load_targets(manifest["optimizer"], optimizer, view, tensor_meta, targets)
    with quiet():
        dcp.load(targets, storage_reader=dcp.FileSystemReader(path), **dcp_kwargs())

    # Every check passed and every tensor is read: from here on, write.
    if placement is not moe.placement:
        moe.set_placement(placement)
    with torch.no_grad():
        for name, tensor in view.dense.items():
            tensor.copy_(dense[name])
        for key, expert in view.experts.items():
            expert.param.copy_(gather_rows(expert, expert_rows[key]))
    if optimizer is not None and buffers is not None:
        optimizer_apply(manifest["optimizer"], optimizer, view, buffers)
    if rebalancer_state is not None:
        rebalancer.load_state_dict(rebalancer_state)
    rng_restored = manifest["rng"] and manifest["world_size"] == world_size()
    if rng_restored:
        _set_rng_state(read_tensor_file(path / f"rng_rank{global_rank()}.pt"))
    return {"step": manifest["step"], "extra": manifest["extra"], "path": path,
            "placement_restored": placement == ExpertPlacement.from_dict(manifest["placement"]),
            "rng_restored": rng_restored}
