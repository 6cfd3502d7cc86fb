"""The one communication helper of the package: every collective goes through here.

- :func:`all_to_all` moves rows with variable splits (``all_to_all_single``, the form gloo and NCCL both
  support) and :class:`AllToAll` is its autograd form (backward sends gradients back with the splits
  swapped); ``async_op=True`` returns a :class:`Pending` result so compute can overlap the transfer.
- :func:`exchange` sends lists of flat pieces per destination rank in one ``all_to_all_single`` and
  returns the received pieces per source rank; the row migration uses it.
- :func:`all_reduce`, :func:`broadcast` and :func:`barrier` are the other tensor collectives.
- :func:`check_device` refuses a tensor a group's backend cannot carry (NCCL takes only CUDA tensors)
  before the collective is entered, with a message naming the tensor; every function here calls it.
  Host-side metadata (loss values for logging, load counters, plans) goes over the gloo side group
  ``ParallelGroups.host_group``, device tensors over the EP / EDP / DP groups.
- :func:`broadcast_object`, :func:`all_gather_object` and :func:`raise_if_any` carry small host-side
  verdicts (errors, names) so that a failure on one rank stops every rank with the same message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ep_megatron.parallel.groups import ParallelGroups


def check_device(tensor: Tensor, group: dist.ProcessGroup | None, what: str) -> None:
    """Raise ``RuntimeError`` when ``group``'s backend cannot carry ``tensor`` (NCCL: CUDA tensors only).

    ``group=None`` means the default group. Nothing is checked outside torch.distributed.
    """
    if not dist.is_initialized():
        return
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and not tensor.is_cuda:
        raise RuntimeError(f"{what}: a {tensor.device} tensor {tuple(tensor.shape)} cannot go over an NCCL "
                           f"group; create it on the group's CUDA device (host-side metadata belongs on the "
                           f"gloo side group, ParallelGroups.host_group)")


def all_reduce(tensor: Tensor, group: dist.ProcessGroup | None, what: str,
               op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """Reduce ``tensor`` in place over ``group`` (``None``: the default group); returns it."""
    check_device(tensor, group, what)
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_gather(tensor: Tensor, group: dist.ProcessGroup | None, what: str) -> list[Tensor]:
    """Every rank's ``tensor`` (same shape on all ranks), in ``group`` rank order."""
    check_device(tensor, group, what)
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return out


def broadcast(tensor: Tensor, group: dist.ProcessGroup | None, what: str, group_src: int = 0) -> Tensor:
    """Overwrite ``tensor`` with the one of ``group``'s rank ``group_src``, in place; returns it."""
    check_device(tensor, group, what)
    dist.broadcast(tensor, group=group, group_src=group_src)
    return tensor


def _host_route(tensor: Tensor, groups: ParallelGroups) -> tuple[dist.ProcessGroup | None, Tensor]:
    """Where a host tensor travels over all ranks: the gloo host group, or (groups built without one,
    e.g. by a framework, on an NCCL default group) a CUDA copy over the data-parallel group."""
    if groups.host_group is not None:
        return groups.host_group, tensor
    backend = str(dist.get_backend(groups.dp_group)).lower()
    if "nccl" in backend:
        return groups.dp_group, tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return groups.dp_group, tensor


def host_all_reduce(tensor: Tensor, groups: ParallelGroups, what: str) -> Tensor:
    """Sum a CPU ``tensor`` over all ranks, in place (host metadata: counters, loss values for logging)."""
    if not dist.is_initialized() or groups.world_size == 1:
        return tensor
    group, carried = _host_route(tensor, groups)
    all_reduce(carried, group, what)
    if carried is not tensor:
        tensor.copy_(carried)
    return tensor


def host_broadcast(tensor: Tensor, groups: ParallelGroups, what: str) -> Tensor:
    """Overwrite a CPU ``tensor`` with rank 0's, in place (a plan made on one rank)."""
    if not dist.is_initialized() or groups.world_size == 1:
        return tensor
    group, carried = _host_route(tensor, groups)
    broadcast(carried, group, what)
    if carried is not tensor:
        tensor.copy_(carried)
    return tensor


def barrier(group: dist.ProcessGroup | None) -> None:
    """Wait for every rank of ``group`` (a host group: no device work is involved on gloo)."""
    if dist.is_initialized():
        dist.barrier(group=group)


class Pending:
    """An all-to-all in flight: :meth:`wait` before reading its output (and before backward)."""

    def __init__(self) -> None:
        self.work: Any = None

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None


def all_to_all(rows: Tensor, send_splits: Sequence[int], recv_splits: Sequence[int],
               group: dist.ProcessGroup | None, what: str = "all_to_all",
               pending: Pending | None = None, out: Tensor | None = None) -> Tensor:
    """``rows [sum(send_splits), *row] -> [sum(recv_splits), *row]`` over ``group`` (no autograd).

    ``send_splits[r]`` rows go to rank ``r`` of ``group``, ``recv_splits[r]`` rows arrive from it, in
    rank order. Collective over ``group``; every rank must call it with matching splits. With ``pending``
    the transfer is started asynchronously and the output may be read only after ``pending.wait()``.
    ``out`` (contiguous, ``[sum(recv_splits), *row]``, ``rows``' dtype) receives the rows instead of a new
    tensor.
    """
    if len(send_splits) != len(recv_splits):
        raise ValueError(f"{what}: send_splits has {len(send_splits)} entries, recv_splits "
                         f"{len(recv_splits)}; both need one per rank of the group")
    if rows.shape[0] != sum(send_splits):
        raise ValueError(f"{what}: rows.shape[0]={rows.shape[0]} must equal sum(send_splits)="
                         f"{sum(send_splits)}")
    check_device(rows, group, what)
    shape = (sum(recv_splits), *rows.shape[1:])
    if out is None:
        out = rows.new_empty(shape)
    elif tuple(out.shape) != shape or out.dtype != rows.dtype or not out.is_contiguous():
        raise ValueError(f"{what}: out must be a contiguous {rows.dtype} tensor of shape {shape}, got "
                         f"{out.dtype} {tuple(out.shape)}")
    work = dist.all_to_all_single(out, rows.contiguous(), list(recv_splits), list(send_splits), group=group,
                                  async_op=pending is not None)
    if pending is not None:
        pending.work = work
    return out


class AllToAll(torch.autograd.Function):
    """:func:`all_to_all` with autograd: the gradient goes back with the splits swapped.

    ``pending`` (optional) starts the forward transfer asynchronously (see :func:`all_to_all`); the
    backward transfer is synchronous.
    """

    @staticmethod
    def forward(ctx, rows: Tensor, send_splits: list[int], recv_splits: list[int],  # type: ignore[override]
                group: dist.ProcessGroup | None, pending: Pending | None = None) -> Tensor:
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return all_to_all(rows, send_splits, recv_splits, group, "token all_to_all", pending)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:  # type: ignore[override]
        send_splits, recv_splits = ctx.splits
        grad_rows = all_to_all(grad, recv_splits, send_splits, ctx.group, "token all_to_all backward")
        return grad_rows, None, None, None, None


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
