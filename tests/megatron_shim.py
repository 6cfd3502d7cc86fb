"""Test-only shim: run Megatron-Core 0.16 *training* (GPTModel, DDP, optimizers, MoE) on CPU with gloo.

Megatron-Core assumes CUDA in places that have nothing to do with the math. :func:`install` patches
exactly those, process-wide, so call it only inside a rank process of ``tests.multirank.run_ranks``
(never in pytest's own process). Each patch, and the Megatron lines it works around (line numbers in the
installed ``megatron/core``, megatron-core 0.16.1):

- ``torch.cuda.current_device()`` returns the CPU device: DDP buffers
  ``distributed/param_and_grad_buffer.py``:783-806, ``tensor_parallel/mappings.py``:91/141/148/442,
  ``transformer/moe/router.py``:90.
- tensor factories (``tensor zeros ones empty full arange``) called with ``device="cuda"`` build on CPU:
  ``pipeline_parallel/schedules.py``:596, ``optimizer/optimizer.py``:473-485/907,
  ``optimizer/clip_grads.py``:90-115.
- CUDA RNG get/set/seed act on the CPU default generator, also Megatron's own
  ``tensor_parallel/random.py`` ``_get_cuda_rng_state``/``_set_cuda_rng_state``: the RNG tracker
  (:225-277) and ``model_parallel_cuda_manual_seed`` (:422). ``torch.cuda.manual_seed`` really seeds:
  a no-op would store one identical state under every tracker name.
- ``Tensor.type()`` of a CPU tensor reports ``torch.cuda.*``: ``optimizer/optimizer.py``:671/690,
  ``optimizer/distrib_optimizer.py``:361/420/582, ``optimizer/clip_grads.py``:167.
- ``Tensor.cuda()`` returns the tensor itself: ``models/common/language_module/language_module.py``:244
  (tied embeddings at PP > 1).
- no-op ``torch.cuda.Stream``/``Event``/``stream``/``current_stream``/``synchronize``: the alltoall
  dispatcher's side stream, ``transformer/moe/token_dispatcher.py``:445 and :871-894.
- ``moe_utils.te_general_gemm = None``: ``transformer/moe/moe_utils.py``:22-39 defines it only when
  Transformer Engine imports; it is read at :1192/:1225.
- the dispatcher's split sizes become numpy arrays on CPU too: ``moe_utils.py``:1093 converts only
  ``if tensor.is_cuda`` (``token_dispatcher.py``:876-886), and gloo's ``all_to_all_single`` binding
  rejects tensor split sizes ("incompatible function arguments").
- uneven all-gather as pad / gather / slice: ``tensor_parallel/mappings.py``:150 calls
  ``all_gather`` with unequal chunks (the alltoall dispatcher at TP > 1), which gloo rejects ("invalid
  tensor size"). Uneven reduce-scatter works on gloo.
- ``dist_checkpointing``'s ``torch_dist`` writer writes in the rank's own process:
  ``dist_checkpointing/strategies/filesystem_async.py``:55 starts a ``spawn`` Manager for its result
  queue and :297-322 forks one writer process per bucket, which the daemonic ranks of ``run_ranks``
  may not do ("daemonic processes are not allowed to have children").
- the torch fallback norm accepts ``sequence_parallel`` and marks its weights like Apex's
  ``FusedLayerNorm`` does: ``transformer/torch_norm.py``:32 asserts instead, and
  ``distributed/finalize_model_grads.py``:354 all-reduces only marked norm grads over TP.

Not patched (the harness avoids them): Megatron-LM's ``model.cuda()`` on modules, and the default
causal mask of ``transformer/utils.py``:35 (an explicit attention mask is passed). Models are built with
``use_cpu_initialization=True``, which makes the initial weights independent of the EP rank's RNG.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
from typing import Any

import torch

_CPU = torch.device("cpu")
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange")
_installed = False


def install() -> None:
    """Apply every patch (idempotent). Call inside the rank function, before importing the model."""
    global _installed
    if _installed:
        return
    _patch_cuda_device()
    _patch_factories()
    _patch_rng()
    _patch_tensor_type()
    _patch_tensor_cuda()
    _patch_streams()
    _patch_megatron()
    _patch_checkpoint_writer()
    _installed = True


def _is_cuda(device: Any) -> bool:
    return isinstance(device, int) or (device is not None and torch.device(device).type == "cuda")


def _patch_cuda_device() -> None:
    torch.cuda.current_device = lambda: _CPU  # type: ignore[assignment]


def _patch_factories() -> None:
    def on_cpu(factory: Any) -> Any:
        @functools.wraps(factory)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if _is_cuda(kwargs.get("device")):
                kwargs["device"] = _CPU
            return factory(*args, **kwargs)

        return wrapper

    for name in _FACTORIES:
        setattr(torch, name, on_cpu(getattr(torch, name)))


def _patch_rng() -> None:
    """The "CUDA" generator is the CPU default generator: Megatron's tracker saves/restores its state."""
    from megatron.core.tensor_parallel import random as mrandom

    def manual_seed(seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))  # not torch.manual_seed: it calls back into cuda

    def get_state(*args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        torch.set_rng_state(state)

    torch.cuda.manual_seed = manual_seed  # type: ignore[assignment]
    torch.cuda.manual_seed_all = manual_seed  # type: ignore[assignment]
    torch.cuda.get_rng_state = get_state  # type: ignore[assignment]
    torch.cuda.set_rng_state = set_state  # type: ignore[assignment]
    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    # The tracker's fork (random.py:265) warns whenever the "CUDA" state was used, which is always here.
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)


def _patch_tensor_cuda() -> None:
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]


def _patch_tensor_type() -> None:
    original = torch.Tensor.type

    def tensor_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or self.device.type != "cpu":
            return original(self, *args, **kwargs)
        return original(self).replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = tensor_type  # type: ignore[method-assign]


class _Event:
    def record(self, *args: Any) -> None: ...
    def synchronize(self) -> None: ...
    def wait(self, *args: Any) -> None: ...
    def query(self) -> bool: return True


class _Stream:
    def __init__(self, *args: Any, **kwargs: Any) -> None: ...
    def wait_stream(self, other: Any) -> None: ...
    def wait_event(self, event: Any) -> None: ...
    def record_event(self, event: Any = None) -> _Event: return event or _Event()
    def synchronize(self) -> None: ...


_DEFAULT_STREAM = _Stream()


def _patch_streams() -> None:
    torch.cuda.Stream = _Stream  # type: ignore[assignment,misc]
    torch.cuda.Event = lambda *args, **kwargs: _Event()  # type: ignore[assignment]
    torch.cuda.current_stream = lambda *args: _DEFAULT_STREAM  # type: ignore[assignment]
    torch.cuda.stream = lambda *args: contextlib.nullcontext()  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *args: None  # type: ignore[assignment]


def _patch_checkpoint_writer() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    writer = filesystem_async.FileSystemWriterAsync

    def write_in_process(transform_list: Any, use_msc: bool, rank: int, write_buckets: list,
                         global_results_queue: Any) -> None:
        """``write_preloaded_data_multiproc`` without worker processes: same writes, same results."""
        results: dict[int, Any] = {}
        for index, bucket in enumerate(write_buckets):
            local_results: queue.Queue = queue.Queue()
            count: queue.Queue = queue.Queue()
            count.put(index)
            writer.write_preloaded_data(transform_list, index, bucket, local_results, count, use_fsync=True,
                                        use_msc=use_msc)
            proc_index, result = local_results.get()
            if isinstance(result, Exception):
                global_results_queue.put(result)
                return
            results[proc_index] = result
        global_results_queue.put(results)

    filesystem_async._get_write_results_queue = queue.Queue
    writer.write_preloaded_data_multiproc = staticmethod(write_in_process)


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer import torch_norm
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    moe_utils.te_general_gemm = None

    def split_sizes_to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.cpu().numpy()
        return tensor.cpu() if torch.is_tensor(tensor) else tensor

    token_dispatcher.maybe_move_tensor_to_cpu = split_sizes_to_host

    gather = mappings._gather_along_first_dim

    def gather_uneven(input_: torch.Tensor, group: Any, output_split_sizes: Any = None,
                      use_global_buffer: bool = False) -> torch.Tensor:
        """``[n_r, ...]`` on rank r -> ``[sum_r n_r, ...]``: pad every chunk to the largest, gather, slice."""
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        padded = input_.new_zeros((max(sizes), *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        chunks = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(chunks, padded.contiguous(), group=group)
        return torch.cat([chunk[:size] for chunk, size in zip(chunks, sizes)])

    mappings._gather_along_first_dim = gather_uneven

    torch_norm_new = torch_norm.WrappedTorchNorm.__new__

    def norm_new(cls: Any, config: Any, *args: Any, **kwargs: Any) -> Any:
        """``WrappedTorchNorm`` built as if ``sequence_parallel`` were off, its weights then marked."""
        sequence_parallel = config.sequence_parallel
        config.sequence_parallel = False
        try:
            norm = torch_norm_new(cls, config, *args, **kwargs)
        finally:
            config.sequence_parallel = sequence_parallel
        for param in norm.parameters():
            param.sequence_parallel = sequence_parallel  # type: ignore[attr-defined]
        return norm

    torch_norm.WrappedTorchNorm.__new__ = norm_new  # type: ignore[assignment]
