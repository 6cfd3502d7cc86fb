"""``GroupedExperts``: one rank's expert slots as stacked weights, computed as a grouped GEMM.

``fc1_weight [local_slots, fc1_out, hidden]`` and ``fc2_weight [local_slots, hidden, ffn]`` use the
(out, in) orientation of Megatron's per-expert ``linear_fc1/linear_fc2.weight``; for SwiGLU the fc1 rows
are ``[gate; up]``. A slot is a row of each parameter, so migrating an expert is a row copy. Both carry
``allreduce = False`` and ``group_name`` (the expert-parameter markers of DeepSpeed and Megatron).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ep_megatron.config import MoEConfig


def expert_activation(fc1_out: Tensor, activation: str) -> Tensor:
    """``[rows, fc1_out] -> [rows, ffn]``: SwiGLU (``silu(gate) * up``) or GELU."""
    if activation == "swiglu":
        gate, up = fc1_out.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(fc1_out)


_ALIGN_BYTES = 16  # torch._grouped_mm needs 16-byte aligned row strides (forward and backward)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def grouped_mm_supported(rows: Tensor, weights: tuple[Tensor, ...]) -> bool:
    """Whether ``torch._grouped_mm`` has a kernel for ``rows`` x ``weights`` in this torch on this device.

    - CUDA: bf16 rows and weights; torch 2.8 on compute capability 9.0 only, torch >= 2.9 on 9.x and 10.x
      (its fast path; elsewhere torch loops in Python, which the per-slot path does as well).
    - CPU: fp32 or bf16 rows and weights, torch >= 2.9 (2.8 has no CPU kernel).
    - every GEMM width (``weights``' last two dimensions) 16-byte aligned; rows and weights one dtype.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    if any(w.dtype != rows.dtype or w.device != rows.device for w in weights):
        return False
    widths = [size for w in weights for size in w.shape[1:]]
    if any(size * rows.element_size() % _ALIGN_BYTES for size in widths):
        return False
    version = _torch_version()
    if rows.is_cuda:
        if rows.dtype != torch.bfloat16 or version < (2, 8):
            return False
        capability = torch.cuda.get_device_capability(rows.device)
        return capability == (9, 0) if version < (2, 9) else capability[0] in (9, 10)
    return rows.device.type == "cpu" and version >= (2, 9) and rows.dtype in (torch.float32, torch.bfloat16)


class _ContiguousGrad(torch.autograd.Function):
    """Identity; in backward, hands on a contiguous gradient (``torch._grouped_mm`` refuses the stride-0
    gradients of e.g. ``.sum()``; a copy happens only for such gradients)."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        if grad.numel() == 0:  # an empty expanded tensor counts as contiguous but keeps stride 0
            return grad.new_zeros(grad.shape)
        return grad.contiguous()


class GroupedExperts(nn.Module):
    """The expert MLPs of a rank's ``local_slots`` slots, applied to rows sorted by local slot."""

    def __init__(self, config: MoEConfig, num_local_slots: int, group_name: str) -> None:
        super().__init__()
        self.activation = config.activation
        self.num_local_slots = num_local_slots
        self.fc1_weight = nn.Parameter(torch.empty(num_local_slots, config.fc1_out, config.hidden_size))
        self.fc2_weight = nn.Parameter(
            torch.empty(num_local_slots, config.hidden_size, config.ffn_hidden_size)
        )
        for param in (self.fc1_weight, self.fc2_weight):
            param.allreduce = False  # type: ignore[attr-defined]
            param.group_name = group_name  # type: ignore[attr-defined]
        self.use_grouped_mm = True  # False forces the per-slot loop (tests compare both paths)

    def forward(self, rows: Tensor, tokens_per_local_slot: list[int], slot_offsets: Tensor | None = None,
                ) -> Tensor:
        """``rows [M, hidden]`` sorted by local slot -> ``[M, hidden]``.

        ``tokens_per_local_slot [local_slots]`` (host ints) are the segment lengths; ``slot_offsets
        [local_slots]`` (int32, on the rows' device, optional) their cumulative sums, which the grouped
        GEMM takes without a host-to-device copy.
        """
        if len(tokens_per_local_slot) != self.num_local_slots or sum(tokens_per_local_slot) != rows.shape[0]:
            raise ValueError(
                f"tokens_per_local_slot={tokens_per_local_slot} must have {self.num_local_slots} entries "
                f"summing to rows.shape[0]={rows.shape[0]}"
            )
        if self.use_grouped_mm and grouped_mm_supported(rows, (self.fc1_weight, self.fc2_weight)):
            if slot_offsets is None:
                slot_offsets = torch.tensor(tokens_per_local_slot, device=rows.device).cumsum(0)
            return self.grouped(rows, slot_offsets.to(torch.int32))
        return self.per_slot(rows, tokens_per_local_slot)

    def grouped(self, rows: Tensor, slot_offsets: Tensor) -> Tensor:
        """One ``torch._grouped_mm`` per GEMM over all slots; ``slot_offsets [local_slots]`` int32 end row
        of each slot's segment (on the rows' device). Rows are used as they are (no padding copy)."""
        hidden = torch._grouped_mm(rows, self.fc1_weight.transpose(1, 2), offs=slot_offsets)
        hidden = _ContiguousGrad.apply(hidden)
        hidden = expert_activation(hidden, self.activation)
        out = torch._grouped_mm(hidden, self.fc2_weight.transpose(1, 2), offs=slot_offsets)
        return _ContiguousGrad.apply(out)

    def per_slot(self, rows: Tensor, tokens_per_local_slot: list[int]) -> Tensor:
        """A loop over local slots (not tokens) on contiguous segments. The stacked weights are unbound
        once, so backward stacks the slots' gradients once (cost linear in the slot count); empty slots
        still join the graph so every slot's weight gradient exists (zero) after backward."""
        outputs = []
        slots = zip(rows.split(tokens_per_local_slot), self.fc1_weight.unbind(0), self.fc2_weight.unbind(0))
        for segment, fc1, fc2 in slots:
            outputs.append(expert_activation(segment @ fc1.t(), self.activation) @ fc2.t())
        return torch.cat(outputs) if outputs else rows.new_zeros(0, rows.shape[1])
