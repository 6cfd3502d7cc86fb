"""The one communication helper of the package: every all-to-all goes through here.

- :func:`all_to_all` moves rows with variable splits (``all_to_all_single``, the form gloo and NCCL both
  support) and :class:`AllToAll` is its autograd form (backward sends gradients back with the splits
  swapped); the dispatcher uses both.
- :func:`exchange` sends lists of flat pieces per destination rank in one ``all_to_all_single`` and
  returns the received pieces per source rank; the gradient sync and the row migration use it.
- :func:`check_device` refuses a tensor a group's backend cannot carry (NCCL takes only CUDA tensors)
  before the collective is entered, with a message naming the tensor.
- :func:`broadcast_object`, :func:`all_gather_object` and :func:`raise_if_any` carry small host-side
  verdicts (errors, names) so that a failure on one rank stops every rank with the same message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def check_device(tensor: Tensor, group: dist.ProcessGroup | None, what: str) -> None:
    """Raise ``RuntimeError`` when ``group``'s backend cannot carry ``tensor`` (NCCL: CUDA tensors only)."""
    if group is None or not dist.is_initialized():
        return
    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl" and not tensor.is_cuda:
        raise RuntimeError(f"{what}: a {tensor.device} tensor cannot go over an NCCL group; create it on the "
                           f"group's CUDA device (host-side metadata belongs on a gloo side group)")


def all_to_all(rows: Tensor, send_splits: Sequence[int], recv_splits: Sequence[int],
               group: dist.ProcessGroup | None, what: str = "all_to_all") -> Tensor:
    """``rows [sum(send_splits), *row] -> [sum(recv_splits), *row]`` over ``group`` (no autograd).

    ``send_splits[r]`` rows go to rank ``r`` of ``group``, ``recv_splits[r]`` rows arrive from it, in
    rank order. Collective over ``group``; every rank must call it with matching splits.
    """
    if len(send_splits) != len(recv_splits):
        raise ValueError(f"{what}: send_splits has {len(send_splits)} entries, recv_splits "
                         f"{len(recv_splits)}; both need one per rank of the group")
    if rows.shape[0] != sum(send_splits):
        raise ValueError(f"{what}: rows.shape[0]={rows.shape[0]} must equal sum(send_splits)="
                         f"{sum(send_splits)}")
    check_device(rows, group, what)
    out = rows.new_empty((sum(recv_splits), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), list(recv_splits), list(send_splits), group=group)
    return out


class AllToAll(torch.autograd.Function):
    """:func:`all_to_all` with autograd: the gradient goes back with the splits swapped."""

    @staticmethod
    def forward(ctx, rows: Tensor, send_splits: list[int], recv_splits: list[int],  # type: ignore[override]
                group: dist.ProcessGroup | None) -> Tensor:
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return all_to_all(rows, send_splits, recv_splits, group, "token all_to_all")

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        send_splits, recv_splits = ctx.splits
        grad_rows = all_to_all(grad, recv_splits, send_splits, ctx.group, "token all_to_all backward")
        return grad_rows, None, None, None


def exchange(pieces: Sequence[Sequence[Tensor]], recv_numels: Sequence[Sequence[int]],
             group: dist.ProcessGroup | None, like: Tensor, what: str = "exchange") -> list[list[Tensor]]:
    """Send ``pieces[dst][k]`` (flat tensors of ``like``'s dtype) to rank ``dst``; return
    ``received[src][k]`` (flat, ``recv_numels[src][k]`` elements) from every rank ``src``.

    One ``all_to_all_single`` of the concatenated pieces; collective over ``group``.
    """
    send_parts = [piece.reshape(-1) for per_rank in pieces for piece in per_rank]
    send = torch.cat(send_parts) if send_parts else like.new_empty(0)
    send_splits = [sum(piece.numel() for piece in per_rank) for per_rank in pieces]
    recv_splits = [sum(numels) for numels in recv_numels]
    recv = all_to_all(send, send_splits, recv_splits, group, what)
    flat = recv.split([n for numels in recv_numels for n in numels])
    received, start = [], 0
    for numels in recv_numels:
        received.append(list(flat[start : start + len(numels)]))
        start += len(numels)
    return received


def broadcast_object(obj: Any, group: dist.ProcessGroup | None = None) -> Any:
    """``obj`` of the group's first rank on every rank (a plain value outside torch.distributed)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, group=group, group_src=0)
    return box[0]


def all_gather_object(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's ``obj``, in group rank order (``[obj]`` outside torch.distributed)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def raise_if_any(errors: Sequence[str | None], what: str) -> None:
    """Raise one ``RuntimeError`` naming every rank whose entry of ``errors`` is a message."""
    failed = [f"rank {r}: {err}" for r, err in enumerate(errors) if err]
    if failed:
        raise RuntimeError(f"{what} failed on {len(failed)} rank(s):\n" + "\n".join(failed))
