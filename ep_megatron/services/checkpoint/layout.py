"""The logical-expert layout of a checkpoint: which tensors a rank writes and reads, under which names.

Expert tensors carry a leading **logical**-expert axis, ``{prefix}.experts.linear_fc1.weight
[E, fc1_out, hidden]`` and ``{prefix}.experts.linear_fc2.weight [E, hidden, ffn]`` (Megatron-Core's
``torch_dist`` names); row ``e`` is written once, by the owner slot of logical expert ``e`` on
expert-data-parallel rank 0, whatever replicas exist, and read by every local slot that maps to ``e``
under the current placement. Dense tensors keep their module names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ep_megatron.layer.moe_layers import MoELayers
from ep_megatron.placement import ExpertPlacement

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

EXPERT_PARAM_NAMES = {"fc1_weight": "linear_fc1.weight", "fc2_weight": "linear_fc2.weight"}


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


def model_view(moe: MoELayers, placement: ExpertPlacement | None = None) -> ModelView:
    """Split ``moe.model``'s state into dense entries and expert tensors keyed by Megatron names, with the
    local slots mapped by ``placement`` (default: the active one)."""
    model = moe.model
    if model is None:
        raise ValueError("moe: checkpoints need MoELayers built from the model (MoELayers(model))")
    placement = placement or moe.placement
    ep_rank = moe.groups.ep_rank
    logical_ids = placement.local_logical_ids(ep_rank)  # [L, S]
    writes = placement.is_owner(ep_rank) & (moe.groups.edp_rank == 0)  # [L, S]
    expert_names: dict[str, ExpertTensor] = {}
    for prefix, layer in zip(moe.names, moe.layers):
        ids = logical_ids[layer.layer_idx]
        for attr, megatron_name in EXPERT_PARAM_NAMES.items():
            expert_names[join(prefix, f"experts.{attr}")] = ExpertTensor(
                key=join(prefix, f"experts.{megatron_name}"),
                param=getattr(layer.experts, attr),
                logical_ids=tuple(ids.tolist()),
                writer_ids=tuple(ids[writes[layer.layer_idx]].tolist()),
                num_experts=placement.num_logical_experts,
            )
    dense: dict[str, torch.Tensor] = {}
    experts: dict[str, ExpertTensor] = {}
    expert_modules = tuple(join(prefix, "experts.") for prefix in moe.names)
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
    return ModelView(dense=dense, experts=experts, param_keys=param_keys)


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def expert_rows_tensor(rows: dict[int, torch.Tensor], num_experts: int, row_shape: tuple[int, ...],
                       dtype: torch.dtype) -> ShardedTensor:
    """A DCP ``ShardedTensor [E, *row_shape]`` whose local shards are ``rows`` (logical id -> [1, *row]).

    The global metadata names one ``[1, *row_shape]`` chunk per logical expert (Megatron's regular
    grid); chunks this rank does not hold are attributed to another rank and never read or written.
    """
    my_rank, num_ranks = global_rank(), world_size()
    chunk = [1, *row_shape]
    local_shards, shards_metadata = [], []
    for logical_id in range(num_experts):
        offsets = [logical_id] + [0] * len(row_shape)
        owner = my_rank if logical_id in rows else (my_rank + 1) % num_ranks
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


def save_rows(expert: ExpertTensor, values: torch.Tensor) -> ShardedTensor | torch.Tensor | None:
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


def load_rows(expert: ExpertTensor, dtype: torch.dtype,
               ) -> tuple[ShardedTensor | torch.Tensor, dict[int, torch.Tensor]]:
    """Buffers ``[1, *row]`` of the logical experts this rank needs, and the DCP target that fills them.

    A ShardedTensor under torch.distributed; a plain ``[E, *row]`` tensor in a single process.
    """
    if not dist.is_initialized():
        full = torch.empty(expert.num_experts, *expert.row_shape, dtype=dtype)
        return full, {e: full[e : e + 1] for e in range(expert.num_experts)}
    rows = {e: torch.empty(1, *expert.row_shape, dtype=dtype) for e in sorted(set(expert.logical_ids))}
    return expert_rows_tensor(rows, expert.num_experts, expert.row_shape, dtype), rows


def gather_rows(expert: ExpertTensor, rows: dict[int, torch.Tensor]) -> torch.Tensor:
    """``[local_slots, *row]``: every local slot gets the row of its logical expert."""
    return torch.cat([rows[e] for e in expert.logical_ids])


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence DCP's ShardedTensor deprecation warnings (Megatron's torch_dist uses the same tensors)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ShardedTensor.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*", category=UserWarning)
        yield


def dcp_kwargs() -> dict[str, Any]:
    return {} if dist.is_initialized() else {"no_dist": True}


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
    "num_groups", "group_topk", "enable_expert_bias", "shared_expert_ffn_size", "norm_topk_prob",
    "topk_scaling_factor", "shared_expert_gate",
})


_REQUIRED = ("hidden_size", "ffn_hidden_size", "num_experts")  # MoEConfig fields without a default


def model_shapes(view: ModelView) -> dict[str, list[int]]:
    shapes = {name: list(t.shape) for name, t in view.dense.items()}
    shapes.update({key: [e.num_experts, *e.row_shape] for key, e in view.experts.items()})
    return shapes


def check_compatible(manifest: dict[str, Any], view: ModelView, moe: MoELayers) -> None:
    """Raise one ``ValueError`` listing every model difference between a checkpoint and the model."""
    # A field a checkpoint of an older version lacks had its default value then.
    defaults = config_dict(type(moe.config)(**{f: getattr(moe.config, f) for f in _REQUIRED}))
    saved = {**defaults, **manifest["config"]}
    diffs = config_differences(saved, config_dict(moe.config), MODEL_FIELDS)
    saved_layers, current_layers = len(manifest["moe_layers"]), len(moe)
    if saved_layers != current_layers:
        diffs.append(f"num_moe_layers: checkpoint {saved_layers} != model {current_layers}")
    saved, current = manifest["tensors_model"], model_shapes(view)
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


