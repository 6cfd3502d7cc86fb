"""bf16 training as GPUs do it: low-precision parameters, fp32 master weights and fp32 optimizer state.

:func:`to_low_precision` turns a model's parameters (experts included; buffers such as the expert bias
stay fp32) into bf16, so forward, backward and every all-to-all run in bf16. :class:`MixedPrecisionOptimizer`
keeps an fp32 master copy of every low-precision parameter and steps the masters with an inner torch
optimizer (fp32 Adam moments), then writes them back rounded to the parameter's dtype - Megatron's
``Float16OptimizerWithFloat16Params`` and DeepSpeed's bf16 optimizer do the same. fp32 parameters are
stepped directly (their master is the parameter itself), so an fp32 model under this wrapper trains like
the inner optimizer alone.

Seen from outside it is a torch optimizer over the model's parameters:

- ``param_groups`` hold the model's parameters; hyperparameters set there (``lr``) reach the inner
  optimizer at the next :meth:`~MixedPrecisionOptimizer.step`;
- ``state_dict()`` gives, per model parameter, the inner state (``exp_avg``, ``exp_avg_sq``, ``step``)
  and ``fp32_param`` (the master) for low-precision parameters - the layout the checkpoints store, under
  Megatron's ``optimizer.state.fp32_param.{key}`` as for DeepSpeed; ``load_state_dict`` takes it back;
- :meth:`~MixedPrecisionOptimizer.master` and :meth:`~MixedPrecisionOptimizer.state_of` give the tensors
  whose rows the rebalancer migrates with an expert slot (``services.migration.optimizer_rows``).

Memory per low-precision parameter element: 2 bytes (bf16 parameter) + 2 (bf16 gradient, freed at the
step once copied into an fp32 gradient of 4 bytes) + 4 (master) + 8 (two fp32 moments).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

ParamGroups = list[dict[str, Any]]


def to_low_precision(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Convert ``model``'s floating-point parameters to ``dtype`` in place (the parameter objects are
    kept, so hooks and optimizer references stay valid); buffers keep their dtype. Returns ``model``."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dtype.is_floating_point:
                param.data = param.data.to(dtype)
    return model


class MixedPrecisionOptimizer:
    """``make_optimizer(master_param_groups)`` (e.g. ``torch.optim.AdamW``) stepping fp32 masters of the
    parameters in ``param_groups`` (the model's parameters, possibly bf16)."""

    def __init__(self, param_groups: ParamGroups,
                 make_optimizer: Callable[[ParamGroups], torch.optim.Optimizer]) -> None:
        self.param_groups: ParamGroups = [{**g, "params": list(g["params"])} for g in param_groups]
        self._masters: dict[int, Tensor] = {}
        inner_groups = []
        for group in self.param_groups:
            masters = [self._new_master(param) for param in group["params"]]
            inner_groups.append({**group, "params": masters})
        self.optimizer = make_optimizer(inner_groups)
        for group, inner in zip(self.param_groups, self.optimizer.param_groups):  # with the defaults
            group.update({key: value for key, value in inner.items() if key != "params"})

    def _new_master(self, param: Tensor) -> Tensor:
        if not param.dtype.is_floating_point:
            raise ValueError(f"param_groups: a parameter of dtype {param.dtype} cannot be optimized")
        if id(param) in self._masters:
            raise ValueError("param_groups: a parameter appears twice")
        master = param if param.dtype == torch.float32 else nn.Parameter(param.detach().to(torch.float32))
        self._masters[id(param)] = master
        return master

    def _params(self) -> list[Tensor]:
        return [param for group in self.param_groups for param in group["params"]]

    def master(self, param: Tensor) -> Tensor:
        """The fp32 master of ``param`` (``param`` itself when it is fp32)."""
        return self._masters[id(param)]

    def state_of(self, param: Tensor) -> dict[str, Any]:
        """The inner optimizer's state of ``param``'s master (empty before the first step)."""
        return self.optimizer.state.get(self.master(param), {})

    @torch.no_grad()
    def step(self) -> None:
        """Copy hyperparameters to the inner groups, turn low-precision gradients into fp32 master
        gradients (freeing the low-precision ones), step the masters, write them back rounded."""
        for group, inner in zip(self.param_groups, self.optimizer.param_groups):
            inner.update({key: value for key, value in group.items() if key != "params"})
        low = [(param, self.master(param)) for param in self._params() if self.master(param) is not param]
        for param, master in low:
            master.grad = None if param.grad is None else param.grad.to(torch.float32)
            param.grad = None
        self.optimizer.step()
        for param, master in low:
            param.copy_(master)
            master.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self._params():
            if param.grad is None:
                continue
            if set_to_none:
                param.grad = None
            else:
                param.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        """Torch's optimizer ``state_dict`` layout over the model's parameters, plus ``fp32_param``."""
        inner = self.optimizer.state_dict()
        state = {}
        for index, param in enumerate(self._params()):
            entry = dict(inner["state"].get(index, {}))
            master = self.master(param)
            if master is not param:
                entry["fp32_param"] = master.detach()
            state[index] = entry
        groups, start = [], 0
        for group in self.param_groups:
            count = len(group["params"])
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": list(range(start, start + count))})
            start += count
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: masters from ``fp32_param`` (else from the current parameter, e.g.
        a checkpoint of an fp32 run), inner state and hyperparameters. Call after the parameters are
        loaded."""
        inner_state = {}
        for index, param in enumerate(self._params()):
            entry = dict(state_dict["state"].get(index, {}))
            saved_master = entry.pop("fp32_param", None)
            master = self.master(param)
            if master is not param:
                master.copy_(param if saved_master is None else saved_master)
            if entry:
                inner_state[index] = entry
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update({key: value for key, value in saved.items() if key != "params"})
        self.optimizer.load_state_dict({"state": inner_state, "param_groups": state_dict["param_groups"]})
