"""Optimizer state in a checkpoint, stored like the parameters: expert state by logical expert.

Any optimizer that presents torch's ``param_groups`` / ``state_dict()`` / ``load_state_dict()`` with
per-parameter state tensors shaped like the parameter is stored under Megatron's optimizer keys,
``optimizer.state.{exp_avg|exp_avg_sq|...}.{param_key}``; expert state rows follow the logical-expert
layout of :mod:`ep_megatron.services.checkpoint.layout`. Hyperparameters and scalar state are JSON.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import torch

from ep_megatron.services.checkpoint.layout import ModelView, gather_rows, load_rows, save_rows

OPTIMIZER_PREFIX = "optimizer.state"


def _json_value(value: Any, where: str) -> Any:
    """``value`` as JSON data; tensors are refused (optimizer hyperparameters must be plain numbers)."""
    try:
        return json.loads(json.dumps(value))
    except TypeError as exc:
        raise ValueError(f"optimizer entry '{where}' is not JSON data ({exc})") from exc


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


def optimizer_save(optimizer: OptimizerLike, view: ModelView, state: dict[str, Any]) -> dict[str, Any]:
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
                rows = save_rows(experts_by_key[key], value)
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


def optimizer_load_targets(desc: dict[str, Any], optimizer: OptimizerLike, view: ModelView,
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
                sharded, rows = load_rows(view.experts[key], tensor_meta[dcp_key].properties.dtype)
                targets[dcp_key] = sharded
                buffers[key][name] = ("expert", rows)
            elif kind == "tensor":
                meta = tensor_meta[dcp_key]
                targets[dcp_key] = torch.empty(meta.size, dtype=meta.properties.dtype)
                buffers[key][name] = ("tensor", targets[dcp_key])
            else:
                buffers[key][name] = ("value", kind["value"])
    return buffers


def optimizer_apply(desc: dict[str, Any], optimizer: OptimizerLike, view: ModelView,
                     buffers: dict[str, dict[str, Any]]) -> None:
    """Rebuild the optimizer's ``state_dict`` (slots read their logical expert's rows) and load it."""
    index_of = {key: i for i, key in enumerate(k for group in desc["param_groups"] for k in group["params"])}
    state = {}
    for key, entries in buffers.items():
        param_state = {}
        for name, (kind, value) in entries.items():
            param_state[name] = gather_rows(view.experts[key], value) if kind == "expert" else value
        state[index_of[key]] = param_state
    groups, start = [], 0
    for group in desc["param_groups"]:
        params = list(range(start, start + len(group["params"])))
        start += len(group["params"])
        groups.append({**group["hyper"], "params": params})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


