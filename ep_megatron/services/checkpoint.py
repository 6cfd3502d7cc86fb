"""Layout-free checkpoints: experts stored by logical id, in Megatron-Core's ``torch_dist`` layout.

A checkpoint is a directory written with ``torch.distributed.checkpoint`` (DCP), each rank writing
only what it owns:

- expert tensors carry a leading **logical**-expert axis, ``{prefix}.experts.linear_fc1.weight
  [E, fc1_out, hidden]`` and ``{prefix}.experts.linear_fc2.weight [E, hidden, ffn]``; row ``e`` is
  written once, by the owner slot of logical expert ``e`` on expert-data-parallel rank 0, whatever
  replicas exist. Their optimizer state is stored the same way under Megatron's optimizer keys,
  ``optimizer.state.{exp_avg|exp_avg_sq|...}.{param_key}``;
- dense tensors (router, expert bias, attention, ...) under their module names, identical on every
  rank and written once (DCP spreads them over ranks);
- ``metadata.json`` and ``common.pt`` as Megatron writes them, so that
  ``megatron.core.dist_checkpointing.load`` reads the expert and router tensors;
- ``rng_rank{r}.pt`` (per-rank RNG states), ``state.pt`` (rebalancer tensors) and ``manifest.json``
  (format version, step, config, placement, tensor shapes and dtypes, size and CRC32 of every file),
  written last.

Loading works under any EP size, DP size, strategy and number of redundant slots: every local slot
reads the row of the logical expert it maps to. Saves are atomic: files go to ``root/.tmp-*``, the
manifest is written last, the directory is renamed to ``root/step_{N:08d}`` and only then does
``root/latest`` (replaced atomically) name it. A checkpoint is untrusted input: tensor files are read
with ``torch.load(weights_only=True)`` and metadata is plain JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from ep_megatron.layer import MoELayer
from ep_megatron.parallel import ParallelGroups
from ep_megatron.parallel.grad_sync import named_moe_layers
from ep_megatron.placement import ExpertPlacement

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
MEGATRON_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
EXPERT_PARAM_NAMES = {"fc1_weight": "linear_fc1.weight", "fc2_weight": "linear_fc2.weight"}
OPTIMIZER_PREFIX = "optimizer.state"
_CHUNK_BYTES = 1 << 22
# Rebalancer state entries holding per-rank token counts ([..., L, E] int tensors): saved as their sum over
# ranks and restored on rank 0 only (zeros elsewhere), so the rebalancer's all-reduce sees the same
# global load under any world size.
REBALANCER_COUNTERS = ("load_window", "since_rebalance")


# ---- model walk ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ExpertTensor:
    """One stacked expert parameter of one MoE layer, as this rank holds it."""

    key: str  # Megatron key, e.g. ``decoder.layers.0.mlp.experts.linear_fc1.weight``
    param: nn.Parameter  # [local_slots, *row_shape]
    logical_ids: tuple[int, ...]  # [local_slots] logical expert of each local slot
    writer_ids: tuple[int, ...]  # logical experts whose row this rank writes (owner slot, edp rank 0)
    num_experts: int  # E, the global (logical) expert axis

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape[1:])


@dataclasses.dataclass(frozen=True)
class ModelView:
    """The model seen by the checkpoint: dense entries, expert tensors, parameter keys."""

    dense: dict[str, torch.Tensor]  # state-dict key -> tensor (parameters and persistent buffers)
    experts: dict[str, ExpertTensor]  # Megatron key -> expert tensor
    param_keys: dict[int, str]  # id(parameter) -> checkpoint key
    moe_layers: list[tuple[str, MoELayer]]  # (module prefix, layer) in model order


def model_view(model: nn.Module, groups: ParallelGroups) -> ModelView:
    """Split ``model``'s state into dense entries and expert tensors keyed by Megatron names."""
    layers = named_moe_layers(model)
    expert_names: dict[str, ExpertTensor] = {}
    for prefix, layer in layers:
        placement: ExpertPlacement = layer.placement
        logical_ids = placement.local_logical_ids(groups.ep_rank)[layer.layer_idx]
        is_owner = placement.is_owner(groups.ep_rank)[layer.layer_idx]
        writes = is_owner & (groups.edp_rank == 0)
        for attr, megatron_name in EXPERT_PARAM_NAMES.items():
            param = getattr(layer.experts, attr)
            module_key = _join(prefix, f"experts.{attr}")
            expert_names[module_key] = ExpertTensor(
                key=_join(prefix, f"experts.{megatron_name}"),
                param=param,
                logical_ids=tuple(logical_ids.tolist()),
                writer_ids=tuple(logical_ids[writes].tolist()),
                num_experts=placement.num_logical_experts,
            )
    dense: dict[str, torch.Tensor] = {}
    experts: dict[str, ExpertTensor] = {}
    expert_modules = tuple(_join(prefix, "experts.") for prefix, _ in layers)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in expert_names:
            experts[expert_names[name].key] = expert_names[name]
        elif name.startswith(expert_modules):
            raise ValueError(f"{name}: expert state other than {sorted(EXPERT_PARAM_NAMES)} is per slot and "
                             f"has no logical-id layout in the checkpoint")
        else:
            dense[name] = tensor
    param_keys: dict[int, str] = {}
    for name, param in model.named_parameters():
        param_keys[id(param)] = expert_names[name].key if name in expert_names else name
    return ModelView(dense=dense, experts=experts, param_keys=param_keys, moe_layers=layers)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ---- sharded expert tensors ------------------------------------------------------------------------
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def expert_rows_tensor(rows: dict[int, torch.Tensor], num_experts: int, row_shape: tuple[int, ...],
                       dtype: torch.dtype) -> ShardedTensor:
    """A DCP ``ShardedTensor [E, *row_shape]`` whose local shards are ``rows`` (logical id -> [1, *row]).

    The global metadata names one ``[1, *row_shape]`` chunk per logical expert (Megatron's regular
    grid); chunks this rank does not hold are attributed to another rank and never read or written.
    """
    rank, world = _rank(), _world()
    chunk = [1, *row_shape]
    local_shards, shards_metadata = [], []
    for logical_id in range(num_experts):
        offsets = [logical_id] + [0] * len(row_shape)
        owner = rank if logical_id in rows else (rank + 1) % world
        meta = ShardMetadata(offsets, chunk, f"rank:{owner}/cpu")
        shards_metadata.append(meta)
        if logical_id in rows:
            local_shards.append(Shard(rows[logical_id], meta))
    properties = TensorProperties(dtype=dtype, layout=torch.strided, requires_grad=False,
                                  memory_format=torch.contiguous_format, pin_memory=False)
    metadata = ShardedTensorMetadata(shards_metadata, torch.Size([num_experts, *row_shape]), properties)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ShardedTensor._init_from_local_shards_and_global_metadata(local_shards, metadata)


def _save_rows(expert: ExpertTensor, values: torch.Tensor) -> ShardedTensor | torch.Tensor | None:
    """Rows of ``values [local_slots, *row]`` this rank writes (None if it writes none).

    A ShardedTensor under torch.distributed; a plain ``[E, *row]`` tensor in a single process.
    """
    if not expert.writer_ids:
        return None
    rows = {}
    for local_slot, logical_id in enumerate(expert.logical_ids):
        if logical_id in expert.writer_ids and logical_id not in rows:
            rows[logical_id] = values[local_slot : local_slot + 1].detach().to("cpu").contiguous()
    if not dist.is_initialized():
        return torch.cat([rows[e] for e in range(expert.num_experts)])
    return expert_rows_tensor(rows, expert.num_experts, expert.row_shape, values.dtype)


def _load_rows(expert: ExpertTensor, dtype: torch.dtype,
               ) -> tuple[ShardedTensor | torch.Tensor, dict[int, torch.Tensor]]:
    """Buffers ``[1, *row]`` of the logical experts this rank needs, and the DCP target that fills them.

    A ShardedTensor under torch.distributed; a plain ``[E, *row]`` tensor in a single process.
    """
    if not dist.is_initialized():
        full = torch.empty(expert.num_experts, *expert.row_shape, dtype=dtype)
        return full, {e: full[e : e + 1] for e in range(expert.num_experts)}
    rows = {e: torch.empty(1, *expert.row_shape, dtype=dtype) for e in sorted(set(expert.logical_ids))}
    return expert_rows_tensor(rows, expert.num_experts, expert.row_shape, dtype), rows


def _gather_rows(expert: ExpertTensor, rows: dict[int, torch.Tensor]) -> torch.Tensor:
    """``[local_slots, *row]``: every local slot gets the row of its logical expert."""
    return torch.cat([rows[e] for e in expert.logical_ids])


# ---- files -----------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))
    _fsync_file(path)


def _write_torch(path: Path, obj: Any) -> None:
    torch.save(obj, path)
    _fsync_file(path)


def read_tensor_file(path: Path) -> Any:
    """``torch.load(weights_only=True)`` on CPU; any failure is a RuntimeError naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an untrusted/corrupt file
        raise RuntimeError(f"{path}: not a loadable tensor file ({exc})") from exc


def file_crc32(path: Path) -> int:
    """CRC32 of a file's bytes, read in 4 MiB chunks."""
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
    return crc


def _file_entries(directory: Path, names: list[str]) -> dict[str, dict[str, int]]:
    return {name: {"bytes": (directory / name).stat().st_size, "crc32": file_crc32(directory / name)}
            for name in names}


def checkpoint_dirname(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint ``root/latest`` names, or None when there is none (or it is incomplete)."""
    latest = Path(root) / LATEST_FILE
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    if not name or "/" in name or name.startswith("."):
        raise RuntimeError(f"{latest}: malformed content {name!r}")
    path = Path(root) / name
    return path if (path / MANIFEST_FILE).is_file() else None


def resolve_checkpoint(path_or_root: str | Path) -> Path:
    """A checkpoint directory itself, or the one ``latest`` names in a root directory."""
    path = Path(path_or_root)
    if (path / MANIFEST_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path}: neither a complete checkpoint (no {MANIFEST_FILE}) nor a root "
                                f"whose '{LATEST_FILE}' names one")
    return latest


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint directory."""
    manifest_path = Path(path) / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{manifest_path}: unreadable manifest ({exc})") from exc
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise RuntimeError(f"{manifest_path}: format_version={version}, this code reads {FORMAT_VERSION}")
    return manifest


def verify_files(path: str | Path, manifest: dict[str, Any], names: list[str] | None = None) -> list[str]:
    """Problems (missing, truncated, corrupted files) among ``names`` (default: all); empty when intact."""
    path = Path(path)
    problems = []
    for name in names if names is not None else sorted(manifest["files"]):
        expected = manifest["files"][name]
        file = path / name
        if not file.is_file():
            problems.append(f"{name}: missing")
        elif file.stat().st_size != expected["bytes"]:
            problems.append(f"{name}: {file.stat().st_size} bytes, manifest says {expected['bytes']}")
        elif file_crc32(file) != expected["crc32"]:
            problems.append(f"{name}: CRC32 mismatch (corrupted)")
    return problems


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


def _json_value(value: Any, where: str) -> Any:
    """``value`` as JSON data; tensors are refused (optimizer hyperparameters must be plain numbers)."""
    try:
        return json.loads(json.dumps(value))
    except TypeError as exc:
        raise ValueError(f"optimizer entry '{where}' is not JSON data ({exc})") from exc


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


# ---- collectives -----------------------------------------------------------------------------------
def _broadcast(obj: Any) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _raise_if_any(errors: list[str | None], what: str) -> None:
    failed = [f"rank {r}: {err}" for r, err in enumerate(errors) if err]
    if failed:
        raise RuntimeError(f"{what} failed on {len(failed)} rank(s):\n" + "\n".join(failed))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence DCP's ShardedTensor deprecation warnings (Megatron's torch_dist uses the same tensors)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ShardedTensor.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*", category=UserWarning)
        yield


def _dcp_kwargs() -> dict[str, Any]:
    return {} if dist.is_initialized() else {"no_dist": True}


# ---- config check ----------------------------------------------------------------------------------
def config_dict(config: Any) -> dict[str, Any]:
    """JSON form of a dataclass config (tuples become lists)."""
    if not dataclasses.is_dataclass(config):
        raise ValueError(f"moe_config must be a dataclass, got {type(config).__name__}")
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def config_differences(saved: dict[str, Any], current: dict[str, Any], fields: frozenset[str]) -> list[str]:
    """``field: checkpoint ... != model ...`` for every differing field among ``fields``."""
    diffs = []
    for name in sorted((set(saved) | set(current)) & fields):
        if saved.get(name, "<absent>") != current.get(name, "<absent>"):
            diffs.append(f"{name}: checkpoint {saved.get(name, '<absent>')!r} != model "
                         f"{current.get(name, '<absent>')!r}")
    return diffs


# MoEConfig fields that define the model (shapes and routing); the others (layout, balancing, loss
# coefficients, seeds) may change between a save and a load.
MODEL_FIELDS = frozenset({
    "hidden_size", "ffn_hidden_size", "num_experts", "top_k", "activation", "score_function", "pre_softmax",
    "num_groups", "group_topk", "enable_expert_bias", "shared_expert_ffn_size",
})


def _model_shapes(view: ModelView) -> dict[str, list[int]]:
    shapes = {name: list(t.shape) for name, t in view.dense.items()}
    shapes.update({key: [e.num_experts, *e.row_shape] for key, e in view.experts.items()})
    return shapes


def check_compatible(manifest: dict[str, Any], view: ModelView, moe_config: Any) -> None:
    """Raise one ``ValueError`` listing every model difference between a checkpoint and the model."""
    diffs = config_differences(manifest["config"], config_dict(moe_config), MODEL_FIELDS)
    saved_layers, current_layers = len(manifest["moe_layers"]), len(view.moe_layers)
    if saved_layers != current_layers:
        diffs.append(f"num_moe_layers: checkpoint {saved_layers} != model {current_layers}")
    saved, current = manifest["tensors_model"], _model_shapes(view)
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    if missing:
        diffs.append(f"tensors missing from checkpoint: {_abbrev(missing)}")
    if unexpected:
        diffs.append(f"tensors absent from model: {_abbrev(unexpected)}")
    for key in sorted(set(saved) & set(current)):
        if saved[key] != current[key]:
            diffs.append(f"{key}: checkpoint shape {saved[key]} != model {current[key]}")
    if diffs:
        raise ValueError("checkpoint does not match the model:\n  " + "\n  ".join(diffs))


def _abbrev(names: list[str], limit: int = 6) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---- optimizer -------------------------------------------------------------------------------------
class OptimizerLike(Protocol):
    """What a checkpoint needs of an optimizer: ``torch.optim.Optimizer``'s ``param_groups`` (holding the
    model's parameters), ``state_dict()`` and ``load_state_dict()``, with per-parameter state tensors shaped
    like the parameter (e.g. :class:`ep_megatron.integrations.deepspeed.ZeroOptimizerState`)."""

    param_groups: list[dict[str, Any]]

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


def _optimizer_key(state_name: str, param_key: str) -> str:
    return f"{OPTIMIZER_PREFIX}.{state_name}.{param_key}"


def _optimizer_params(optimizer: OptimizerLike, view: ModelView) -> list[list[str]]:
    """Checkpoint key of every optimizer parameter, per param group."""
    groups = []
    for index, group in enumerate(optimizer.param_groups):
        keys = []
        for param in group["params"]:
            if id(param) not in view.param_keys:
                raise ValueError(f"optimizer param group {index} holds a parameter that is not in the model")
            keys.append(view.param_keys[id(param)])
        groups.append(keys)
    return groups


def _optimizer_save(optimizer: OptimizerLike, view: ModelView, state: dict[str, Any]) -> dict[str, Any]:
    """Add optimizer tensors to ``state``; return the JSON description (groups, per-param state kinds)."""
    experts_by_key = view.experts
    params = [p for group in optimizer.param_groups for p in group["params"]]
    keys = [key for group_keys in _optimizer_params(optimizer, view) for key in group_keys]
    saved = optimizer.state_dict()  # collective for optimizers whose state is sharded
    groups_json = []
    for group in saved["param_groups"]:
        hyper = {k: v for k, v in group.items() if k != "params"}
        groups_json.append({"hyper": _json_value(hyper, "param_groups"),
                            "params": [keys[index] for index in group["params"]]})
    state_json = {}
    for index, param_state in sorted(saved["state"].items()):
        param, key = params[index], keys[index]
        kinds = {}
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor) and key in experts_by_key and value.shape == param.shape:
                rows = _save_rows(experts_by_key[key], value)
                if rows is not None:
                    state[_optimizer_key(name, key)] = rows
                kinds[name] = "expert"
            elif isinstance(value, torch.Tensor):
                state[_optimizer_key(name, key)] = value.detach().to("cpu")
                kinds[name] = "tensor"
            else:
                kinds[name] = {"value": _json_value(value, f"{key}.{name}")}
        state_json[key] = kinds
    return {"param_groups": groups_json, "state": state_json}


def _optimizer_load_targets(desc: dict[str, Any], optimizer: OptimizerLike, view: ModelView,
                            tensor_meta: dict[str, Any], targets: dict[str, Any],
                            ) -> dict[str, dict[str, Any]]:
    """Add load targets for the optimizer state to ``targets``; return per-key state buffers."""
    current = _optimizer_params(optimizer, view)
    saved = [group["params"] for group in desc["param_groups"]]
    if current != saved:
        raise ValueError(f"optimizer param groups differ: checkpoint has {[len(g) for g in saved]} params "
                         f"per group, optimizer {[len(g) for g in current]}, or the parameter keys differ")
    buffers: dict[str, dict[str, Any]] = {}
    for key, kinds in desc["state"].items():
        buffers[key] = {}
        for name, kind in kinds.items():
            dcp_key = _optimizer_key(name, key)
            if kind == "expert":
                sharded, rows = _load_rows(view.experts[key], tensor_meta[dcp_key].properties.dtype)
                targets[dcp_key] = sharded
                buffers[key][name] = ("expert", rows)
            elif kind == "tensor":
                meta = tensor_meta[dcp_key]
                targets[dcp_key] = torch.empty(meta.size, dtype=meta.properties.dtype)
                buffers[key][name] = ("tensor", targets[dcp_key])
            else:
                buffers[key][name] = ("value", kind["value"])
    return buffers


def _optimizer_apply(desc: dict[str, Any], optimizer: OptimizerLike, view: ModelView,
                     buffers: dict[str, dict[str, Any]]) -> None:
    """Rebuild the optimizer's ``state_dict`` (slots read their logical expert's rows) and load it."""
    index_of = {key: i for i, key in enumerate(k for group in desc["param_groups"] for k in group["params"])}
    state = {}
    for key, entries in buffers.items():
        param_state = {}
        for name, (kind, value) in entries.items():
            param_state[name] = _gather_rows(view.experts[key], value) if kind == "expert" else value
        state[index_of[key]] = param_state
    groups, start = [], 0
    for group in desc["param_groups"]:
        params = list(range(start, start + len(group["params"])))
        start += len(group["params"])
        groups.append({**group["hyper"], "params": params})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---- save ------------------------------------------------------------------------------------------
def _make_tmp_dir(root: Path, step: int) -> Path:
    name = None
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        name = Path(tempfile.mkdtemp(prefix=f".tmp-{checkpoint_dirname(step)}-", dir=root)).name
    return root / _broadcast(name)


def _global_counters(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with its per-rank counters summed over all ranks (collective)."""
    state = dict(state)
    for key in REBALANCER_COUNTERS:
        if key in state:
            total = torch.as_tensor(state[key]).detach().to("cpu").clone()
            if dist.is_initialized():
                dist.all_reduce(total)
            state[key] = total
    return state


def _placement_of(layers: list[tuple[str, MoELayer]]) -> dict[str, Any]:
    placements = {id(layer.placement): layer.placement for _, layer in layers}
    if len(placements) != 1:
        raise ValueError(f"all MoE layers must share one ExpertPlacement, found {len(placements)}")
    return next(iter(placements.values())).to_dict()


def _model_save_state(view: ModelView) -> dict[str, Any]:
    state: dict[str, Any] = {name: t.detach().to("cpu") for name, t in view.dense.items()}
    for key, expert in view.experts.items():
        rows = _save_rows(expert, expert.param)
        if rows is not None:
            state[key] = rows
    return state


def save_checkpoint(root: str | Path, step: int, model: nn.Module, optimizer: OptimizerLike | None,
                    groups: ParallelGroups, *, moe_config: Any, rebalancer: Any | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Save ``root/step_{step:08d}`` and point ``root/latest`` at it; collective over all ranks.

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
    view = model_view(model, groups)
    if not view.moe_layers:
        raise ValueError("model has no MoELayer; nothing expert-parallel to checkpoint")
    placement = _placement_of(view.moe_layers)
    config = config_dict(moe_config)
    rebalancer_tensors: dict[str, torch.Tensor] = {}
    rebalancer_json = None
    if rebalancer is not None:
        rebalancer_json = _split_tensors(_global_counters(rebalancer.state_dict()), rebalancer_tensors)

    tmp = _make_tmp_dir(root, step)
    state = _model_save_state(view)
    optimizer_json = None if optimizer is None else _optimizer_save(optimizer, view, state)
    with _quiet():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True), **_dcp_kwargs())

    rank, world = _rank(), _world()
    error = None
    try:
        _write_torch(tmp / f"rng_rank{rank}.pt", _rng_state())
        if rank == 0:
            _write_torch(tmp / "common.pt", {"iteration": step, "checkpoint_version": 3.0})
            _write_json(tmp / "metadata.json", MEGATRON_METADATA)
            _write_torch(tmp / "state.pt", rebalancer_tensors)
    except OSError as exc:
        error = f"writing {tmp}: {exc}"
    _raise_if_any(_all_gather(error), "checkpoint write")
    names = sorted(p.name for p in tmp.iterdir())
    files = _all_gather(_file_entries(tmp, names[rank::world]))

    status = None
    if rank == 0:
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": world,
            "ep_size": groups.ep_size,
            "config": config,
            "placement": placement,
            "moe_layers": [{"prefix": p, "layer_idx": layer.layer_idx} for p, layer in view.moe_layers],
            "tensors_model": _model_shapes(view),
            "optimizer": optimizer_json,
            "rebalancer": rebalancer_json,
            "rng": True,
            "extra": extra_json,
        }
        try:
            _publish(tmp, final, manifest, {name: entry for part in files for name, entry in part.items()})
        except OSError as exc:
            status = f"publishing {final}: {exc}"
    _raise_if_any([_broadcast(status)], "checkpoint publish")
    return final


def _publish(tmp: Path, final: Path, manifest: dict[str, Any], files: dict[str, dict[str, int]]) -> None:
    """Write the manifest last, rename ``tmp`` to ``final``, then point ``latest`` at it."""
    manifest = {**manifest, "tensors": _tensor_table(tmp), "files": files}
    _write_json(tmp / MANIFEST_FILE, manifest)
    _fsync_dir(tmp)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    _point_latest(final.parent, final.name)


def _tensor_table(path: Path) -> dict[str, dict[str, Any]]:
    """``{key: {shape, dtype}}`` of every tensor in a DCP checkpoint's metadata."""
    meta = dcp.FileSystemReader(path).read_metadata()
    return {key: {"shape": list(m.size), "dtype": str(m.properties.dtype).removeprefix("torch.")}
            for key, m in sorted(meta.state_dict_metadata.items()) if hasattr(m, "size")}


def _point_latest(root: Path, name: str) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=".latest-", dir=root)
    with os.fdopen(fd, "w") as handle:
        handle.write(name + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp_name, root / LATEST_FILE)
    _fsync_dir(root)


# ---- load ------------------------------------------------------------------------------------------
def load_checkpoint(path_or_root: str | Path, model: nn.Module, optimizer: OptimizerLike | None,
                    groups: ParallelGroups, *, moe_config: Any, rebalancer: Any | None = None,
                    restore_placement: bool = True, verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint into ``model`` / ``optimizer`` / ``rebalancer`` under the current layout.

    Every local slot reads the row of the logical expert its placement maps it to. When
    ``restore_placement`` and the saved placement fits the current layout (same EP size and slots), the
    saved placement is installed first. RNG states are restored when the world size is unchanged.
    ``verify`` checks the size and CRC32 of every file (split over ranks). Collective over all ranks.
    Returns ``{"step", "extra", "path", "placement_restored", "rng_restored"}``.
    """
    path = resolve_checkpoint(path_or_root)
    manifest = read_manifest(path)
    view = model_view(model, groups)
    check_compatible(manifest, view, moe_config)
    if optimizer is not None and manifest["optimizer"] is None:
        raise ValueError(f"{path} holds no optimizer state; pass optimizer=None to load the model only")
    saved_placement = ExpertPlacement.from_dict(manifest["placement"])
    current = view.moe_layers[0][1].placement
    placement_fits = (saved_placement.num_ranks, saved_placement.num_slots) == (
        current.num_ranks, current.num_slots)
    if verify:
        names = sorted(manifest["files"])
        problems = verify_files(path, manifest, names[_rank() :: _world()])
        _raise_if_any(_all_gather("; ".join(problems) or None), f"verifying {path}")
    if restore_placement and placement_fits and saved_placement != current:
        for _, layer in view.moe_layers:
            layer.set_placement(saved_placement)
        view = model_view(model, groups)

    tensor_meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    targets: dict[str, Any] = {name: t.detach() for name, t in view.dense.items()}
    expert_rows = {}
    for key, expert in view.experts.items():
        targets[key], expert_rows[key] = _load_rows(expert, expert.param.dtype)
    buffers = None
    if optimizer is not None:
        buffers = _optimizer_load_targets(manifest["optimizer"], optimizer, view, tensor_meta, targets)
    with _quiet():
        dcp.load(targets, storage_reader=dcp.FileSystemReader(path), **_dcp_kwargs())
    with torch.no_grad():
        for key, expert in view.experts.items():
            expert.param.copy_(_gather_rows(expert, expert_rows[key]))
    if optimizer is not None and buffers is not None:
        _optimizer_apply(manifest["optimizer"], optimizer, view, buffers)
    if rebalancer is not None and manifest["rebalancer"] is not None:
        state = _join_tensors(manifest["rebalancer"], read_tensor_file(path / "state.pt"))
        if _rank() != 0:
            state.update({key: torch.zeros_like(state[key]) for key in REBALANCER_COUNTERS if key in state})
        rebalancer.load_state_dict(state)
    rng_restored = manifest["rng"] and manifest["world_size"] == _world()
    if rng_restored:
        _set_rng_state(read_tensor_file(path / f"rng_rank{_rank()}.pt"))
    return {"step": manifest["step"], "extra": manifest["extra"], "path": path,
            "placement_restored": bool(restore_placement and placement_fits), "rng_restored": rng_restored}


# ---- offline reading (single process) --------------------------------------------------------------
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
    with _quiet():
        dcp.load(targets, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    return targets


def iter_checkpoints(root: str | Path) -> Iterator[Path]:
    """Complete checkpoints under ``root`` in step order (incomplete temporaries are skipped)."""
    for path in sorted(Path(root).glob("step_*")):
        if (path / MANIFEST_FILE).is_file():
            yield path


def remove_stale_temporaries(root: str | Path) -> list[Path]:
    """Delete ``root/.tmp-*`` directories left by killed saves; call when no save is running."""
    removed = []
    for path in sorted(Path(root).glob(".tmp-step_*")):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


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
    fc1_keys = [_join(p, f"experts.{EXPERT_PARAM_NAMES['fc1_weight']}") for p in moe_prefixes]
    missing = [k for k in fc1_keys if k not in tensors]
    if not moe_prefixes or missing:
        raise ValueError(f"moe_prefixes={moe_prefixes}: expert tensors {missing} not in the tensors")
    num_experts = int(tensors[fc1_keys[0]].shape[0])
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{checkpoint_dirname(step)}-", dir=root))
    with _quiet():
        dcp.save({k: t.contiguous() for k, t in tensors.items()}, storage_writer=dcp.FileSystemWriter(tmp),
                 no_dist=True)
    _write_torch(tmp / "common.pt", {"iteration": step, "checkpoint_version": 3.0})
    _write_json(tmp / "metadata.json", MEGATRON_METADATA)
    _write_torch(tmp / "state.pt", {})
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
    _publish(tmp, final, manifest, _file_entries(tmp, sorted(p.name for p in tmp.iterdir())))
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
        stacked = {name: tensors.pop(_join(prefix, f"experts.{name}"))
                   for name in EXPERT_PARAM_NAMES.values()}
        num_experts = next(iter(stacked.values())).shape[0]
        for expert in range(num_experts):
            weights = {_join(prefix, f"{DS_EXPERTS}.{expert}.{name}"): t[expert].clone()
                       for name, t in stacked.items()}
            torch.save(weights, deepspeed_expert_file(target, moe_layer, expert))
        tensors[_join(prefix, DS_GATE)] = tensors.pop(_join(prefix, "router.weight"))
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
            experts.setdefault(_join(prefix, f"experts.{name}"), {})[expert] = value
    if not experts:
        raise FileNotFoundError(f"{directory}: no layer_*_expert_*_mp_rank_00_model_states.pt files")
    for key, by_expert in experts.items():
        if sorted(by_expert) != list(range(len(by_expert))):
            raise ValueError(f"{key}: expert ids {sorted(by_expert)} are not 0..{len(by_expert) - 1}")
        tensors[key] = torch.stack([by_expert[e] for e in range(len(by_expert))])
    moe_prefixes = [prefixes[i] for i in sorted(prefixes)]
    for prefix in moe_prefixes:
        gate = _join(prefix, DS_GATE)
        if gate in tensors:
            tensors[_join(prefix, "router.weight")] = tensors.pop(gate)
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


# ---- summaries ---------------------------------------------------------------------------------------
