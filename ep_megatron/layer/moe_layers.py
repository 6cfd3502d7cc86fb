"""``MoELayers``: the one owner of a model's MoE layers and of their single :class:`ExpertPlacement`.

Every service (gradient sync, rebalancing, checkpoints, the integrations, the trainer) takes this object
instead of finding the layers and re-deriving facts itself. It owns:

- the ordered MoE layers (found once, here: any submodule with ``placement``, ``layer_idx`` and
  ``experts``), with their module names;
- the placement: one object held by every layer. Equal placements passed in as distinct objects are
  unified at construction; :meth:`set_placement` is the only writer afterwards;
- which parameters are expert parameters (stacked ``[local_slots, ...]``) and which are dense, and the
  optimizer parameter groups built from that split;
- the owner mask of this rank (which local slot counts / writes its logical expert);
- the per-step drain of the routed load ``[L, E]`` (one call; the result goes to the rebalancer and the
  logger alike), the expert-bias update and the aux-loss gradient scale.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ep_megatron.config import MoEConfig
from ep_megatron.layer.moe_layer import MoELayer
from ep_megatron.parallel.groups import ParallelGroups
from ep_megatron.placement import ExpertPlacement

ParamGroups = list[dict[str, Any]]


def _is_moe_layer(module: nn.Module) -> bool:
    return all(hasattr(module, attr) for attr in ("placement", "layer_idx", "experts"))


class MoELayers:
    """The MoE layers of one model (or of one pipeline stage) and their one placement.

    ``model_or_layers`` is a model (its MoE layers are found in module order; dense parameters are the
    model's other parameters) or a sequence of MoE layers (no dense parameters known). Layers must
    cover placement rows ``0 .. L-1`` once each, share one :class:`ParallelGroups` and one
    :class:`MoEConfig`, and hold equal placements.
    """

    def __init__(self, model_or_layers: nn.Module | Sequence[nn.Module]) -> None:
        if isinstance(model_or_layers, nn.Module):
            self.model: nn.Module | None = model_or_layers
            named = [(name, m) for name, m in model_or_layers.named_modules() if _is_moe_layer(m)]
        else:
            self.model = None
            named = [(f"layers.{i}", m) for i, m in enumerate(model_or_layers)]
        if not named:
            raise ValueError("model_or_layers: no MoE layer found (a module with placement, layer_idx and "
                             "experts, e.g. ep_megatron.layer.MoELayer)")
        named.sort(key=lambda item: item[1].layer_idx)
        self.names: tuple[str, ...] = tuple(name for name, _ in named)
        self.layers: tuple[Any, ...] = tuple(layer for _, layer in named)
        self.groups: ParallelGroups = self.layers[0].groups
        self.config: MoEConfig | None = getattr(self.layers[0], "config", None)  # None for stand-ins
        self._check_layers()
        self._placement: ExpertPlacement = self.layers[0].placement
        for layer in self.layers:
            layer.placement = self._placement  # equal by value (checked): one shared object
        self._owner_mask: tuple[ExpertPlacement, Tensor] | None = None
        self._expert_ids = {id(p) for p in self.expert_params()}

    @classmethod
    def build(cls, config: MoEConfig, groups: ParallelGroups, num_layers: int,
              layer_cls: type[nn.Module] | None = None) -> MoELayers:
        """``num_layers`` new layers (``layer_cls``, default :class:`MoELayer`) of ``config``'s strategy."""
        placement = config.placement(num_layers, groups.ep_size)
        layer_cls = layer_cls or MoELayer
        return cls([layer_cls(config, placement, groups, i) for i in range(num_layers)])

    def _check_layers(self) -> None:
        indices = [layer.layer_idx for layer in self.layers]
        first = self.layers[0].placement
        if indices != list(range(first.num_layers)):
            raise ValueError(f"layers: need one MoE layer per placement row 0..{first.num_layers - 1}, got "
                             f"layer_idx {indices}")
        if first.ep_size != self.groups.ep_size:
            raise ValueError(f"{self.names[0]}: placement.ep_size={first.ep_size} must equal "
                             f"groups.ep_size={self.groups.ep_size}")
        for name, layer in zip(self.names, self.layers):
            if layer.placement != first:
                raise ValueError(f"{name}: its placement differs from {self.names[0]}'s; all MoE layers of a "
                                 f"model share one placement")
            if layer.groups != self.groups:
                raise ValueError(f"{name}: built with other ParallelGroups than {self.names[0]}")
            if getattr(layer, "config", None) != self.config:
                raise ValueError(f"{name}: its MoEConfig differs from {self.names[0]}'s")

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.layers)

    # ---- the placement ----------------------------------------------------------------------------
    @property
    def placement(self) -> ExpertPlacement:
        """The active placement, held by every layer."""
        return self._placement

    def check_placement(self, new: ExpertPlacement) -> None:
        """Raise ``ValueError`` unless ``new`` fits these layers (layers, experts, EP size, local slots)."""
        old = self._placement
        got = (new.num_layers, new.num_logical_experts, new.ep_size, new.slots_per_rank)
        want = (old.num_layers, old.num_logical_experts, old.ep_size, old.slots_per_rank)
        if got != want:
            raise ValueError(f"placement (num_layers, num_logical_experts, ep_size, slots_per_rank)={got} "
                             f"does not fit the layers' {want}")

    def set_placement(self, new: ExpertPlacement) -> None:
        """Make ``new`` active on every layer once the caller moved the expert rows (all ranks, same step)."""
        self.check_placement(new)
        for layer in self.layers:
            layer.placement = new
        self._placement = new

    def owner_mask(self) -> Tensor:
        """``[L, slots_per_rank]`` bool (CPU): which local slots of this rank own their logical expert.

        Each logical expert has one owner slot; counting owners only counts every logical expert once.
        """
        cached = self._owner_mask
        if cached is None or cached[0] is not self._placement:
            cached = (self._placement, self._placement.is_owner(self.groups.ep_rank))
            self._owner_mask = cached
        return cached[1]

    def local_logical_ids(self) -> Tensor:
        """``[L, slots_per_rank]`` logical expert of each local slot of this rank."""
        return self._placement.local_logical_ids(self.groups.ep_rank)

    # ---- parameters -------------------------------------------------------------------------------
    def layer_expert_params(self, layer: Any) -> list[nn.Parameter]:
        """Trainable parameters of ``layer.experts``, each ``[local_slots, ...]``."""
        slots_per_rank = self._placement.slots_per_rank
        params = []
        for name, param in layer.experts.named_parameters():
            if param.dim() < 1 or param.shape[0] != slots_per_rank:
                raise ValueError(f"MoE layer {layer.layer_idx}: experts.{name} has shape "
                                 f"{tuple(param.shape)}, expected [local_slots={slots_per_rank}, ...]")
            if param.requires_grad:
                params.append(param)
        return params

    def expert_params(self) -> list[nn.Parameter]:
        """Expert parameters of all layers, in layer order."""
        return [p for layer in self.layers for p in self.layer_expert_params(layer)]

    def is_expert_param(self, param: Tensor) -> bool:
        return id(param) in self._expert_ids

    def dense_params(self) -> list[nn.Parameter]:
        """Trainable model parameters that are not expert parameters (reduced over data parallelism)."""
        if self.model is None:
            raise ValueError("MoELayers was built from a list of layers: dense parameters are unknown; build "
                             "it from the model")
        return [p for p in self.model.parameters() if p.requires_grad and not self.is_expert_param(p)]

    def param_groups(self, weight_decay: float | None = None) -> ParamGroups:
        """Optimizer parameter groups ``[dense matrices, dense vectors, experts]`` (empty groups dropped).

        ``weight_decay`` (when given) decays matrices and stacked expert weights; vectors (norms, biases)
        get 0. ``None`` leaves the optimizer's default everywhere. The same groups under any optimizer keep
        checkpoints compatible between them.
        """
        dense = self.dense_params()
        groups = [
            {"name": "dense", "params": [p for p in dense if p.dim() >= 2]},
            {"name": "dense_no_decay", "params": [p for p in dense if p.dim() < 2]},
            {"name": "experts", "params": self.expert_params()},
        ]
        if weight_decay is not None:
            for group in groups:
                group["weight_decay"] = 0.0 if group["name"] == "dense_no_decay" else weight_decay
        return [group for group in groups if group["params"]]

    # ---- per step ---------------------------------------------------------------------------------
    def take_loads(self) -> Tensor:
        """``[L, E]`` int64 (token, logical expert) pairs this rank routed since the last call; resets.

        Call once per optimizer step and hand the result to everything that needs it. On the host (one
        device-to-host copy for all layers).
        """
        return torch.stack([layer.take_load().detach().to(torch.int64) for layer in self.layers]).to("cpu")

    def update_expert_bias(self) -> None:
        """Once per optimizer step on every rank: the aux-loss-free bias update of every layer."""
        for layer in self.layers:
            layer.update_expert_bias()

    def set_aux_loss_scale(self, scale: float) -> None:
        """Gradient given to every aux loss in backward: the main loss's scale (1 / micro-batches)."""
        for layer in self.layers:
            layer.router.aux_loss_scale = float(scale)

    def expert_rows(self) -> list[int]:
        """``[L]`` rows this rank's experts computed in each layer's last forward."""
        return [layer.last_expert_rows for layer in self.layers]

    def aux_losses(self) -> dict[str, Tensor]:
        """Each aux loss of the last forward (``[]``, detached, on the device) summed over the layers and
        divided by their number. Read them on the host once per step, not per micro-batch."""
        total: dict[str, Tensor] = {}
        for layer in self.layers:
            for name, value in layer.last_aux_losses.items():
                share = value / len(self.layers)
                total[name] = total[name] + share if name in total else share
        return total
