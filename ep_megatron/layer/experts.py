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


_ALIGN_BYTES = 16  # torch._grouped_mm needs 16-byte aligned strides (forward and backward)
_ALIGN_ROWS = 16  # rows are zero-padded to a multiple of this, so transposed strides align too


def _grouped_mm_usable(rows: Tensor, widths: tuple[int, ...]) -> bool:
    """``torch._grouped_mm`` on CUDA bf16 or CPU fp32/bf16, with every GEMM width 16-byte aligned."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if rows.is_cuda:
        dtype_ok = rows.dtype == torch.bfloat16
    else:
        dtype_ok = rows.device.type == "cpu" and rows.dtype in (torch.float32, torch.bfloat16)
    return dtype_ok and all(w * rows.element_size() % _ALIGN_BYTES == 0 for w in widths)


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

    def forward(self, rows: Tensor, tokens_per_local_slot: list[int]) -> Tensor:
        """``rows [M, hidden]`` sorted by local slot -> ``[M, hidden]``.

        ``tokens_per_local_slot [local_slots]`` (host ints) are the segment lengths.
        """
        if len(tokens_per_local_slot) != self.num_local_slots or sum(tokens_per_local_slot) != rows.shape[0]:
            raise ValueError(
                f"tokens_per_local_slot={tokens_per_local_slot} must have {self.num_local_slots} entries "
                f"summing to rows.shape[0]={rows.shape[0]}"
            )
        widths = (*self.fc1_weight.shape[1:], self.fc2_weight.shape[2])
        if self.use_grouped_mm and _grouped_mm_usable(rows, widths):
            return self.grouped(rows, tokens_per_local_slot)
        return self.per_slot(rows, tokens_per_local_slot)

    def grouped(self, rows: Tensor, tokens_per_local_slot: list[int]) -> Tensor:
        """One ``torch._grouped_mm`` per GEMM over all slots; rows are zero-padded to a multiple of 16
        (the padding lies past the last group's end, so it is never computed into any slot)."""
        num_rows = rows.shape[0]
        pad = -num_rows % _ALIGN_ROWS
        padded = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])]) if pad else rows
        offsets = torch.tensor(tokens_per_local_slot, device=rows.device).cumsum(0).to(torch.int32)
        hidden = torch._grouped_mm(padded, self.fc1_weight.transpose(1, 2), offs=offsets)
        hidden = expert_activation(hidden, self.activation)
        return torch._grouped_mm(hidden, self.fc2_weight.transpose(1, 2), offs=offsets)[:num_rows]

    def per_slot(self, rows: Tensor, tokens_per_local_slot: list[int]) -> Tensor:
        """A loop over local slots (not tokens) on contiguous segments; empty slots still join the graph
        so every slot's weight gradient exists (zero) after backward."""
        outputs = []
        for local_slot, segment in enumerate(rows.split(tokens_per_local_slot)):
            hidden = expert_activation(segment @ self.fc1_weight[local_slot].t(), self.activation)
            outputs.append(hidden @ self.fc2_weight[local_slot].t())
        return torch.cat(outputs) if outputs else rows.new_zeros(0, rows.shape[1])
