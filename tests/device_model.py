"""A model of CUDA's host/device split that runs on CPU: which tensors would live on the GPU, and which
operations would make the host wait for it.

On a CPU-only machine every tensor is a CPU tensor, so a tensor created on the host by mistake and handed
to an NCCL collective, or a ``.item()`` that stalls the GPU, cannot be seen by looking at devices.
:class:`HostDeviceModel` (a ``TorchFunctionMode``) tags every tensor as *host* or *device* the way CUDA
would place it and records:

- ``syncs``: operations that make the host wait for the device on CUDA: ``.item()``, ``.tolist()``,
  ``bool()/int()/float()``, ``.cpu()`` / ``.to("cpu")`` / ``.numpy()`` of a device tensor, host-to-device
  copies that are not ``non_blocking`` (``torch.tensor(..., device=d)``, ``host.to(d)``), and operations
  whose output size depends on device data (``bincount``, ``nonzero``, ``unique``, ``masked_select``,
  boolean-mask indexing, ``repeat_interleave`` with tensor repeats and no ``output_size``);
- ``mixed``: operations that combine a device tensor with a host tensor of more than one element (an
  error or a hidden copy on CUDA).

Tagging rules (the conventions the package follows): a factory without ``device=`` (or with the string
``"cpu"``), ``.cpu()``, ``.to("cpu")`` and ``torch.from_numpy`` make host tensors; a factory with any other
``device=`` and ``.to(device)`` make device tensors; any other operation gives a host result only when all
its tensor inputs are host. Tensors the mode never saw (created before it, or by the autograd engine,
such as gradients) count as device tensors; :func:`mark_host` tags host tensors created outside.

:class:`CollectiveAudit` wraps the ``torch.distributed`` collectives and checks each call the package makes:
it must come from ``ep_megatron/parallel/comm.py``, and its tensors must be host tensors on the host (gloo
side) group and device tensors on every other group.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

_TAG = "_ep_host"
_PACKAGE = str(Path(__file__).resolve().parents[1] / "ep_megatron")
_COMM = str(Path(_PACKAGE) / "parallel" / "comm.py")

_FACTORIES = {"zeros", "ones", "empty", "full", "arange", "range", "linspace", "logspace", "eye", "rand",
              "randn", "randint", "randperm", "tensor", "as_tensor", "asarray", "from_numpy", "frombuffer",
              "scalar_tensor", "empty_strided", "zeros_like", "ones_like", "empty_like", "full_like",
              "rand_like", "randn_like", "randint_like", "new_zeros", "new_ones", "new_empty", "new_full",
              "new_tensor", "new_empty_strided"}
_COPY_FACTORIES = {"tensor", "as_tensor", "asarray", "new_tensor"}  # copy host data to the device
_HOST_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__", "numpy",
               "__array__"}
_DATA_SHAPED = {"bincount", "nonzero", "argwhere", "unique", "unique_consecutive", "masked_select",
                "nonzero_static"}


def is_host(tensor: Tensor) -> bool:
    return bool(getattr(tensor, _TAG, False))


def _tag(tensor: Tensor, host: bool) -> None:
    object.__setattr__(tensor, _TAG, host)


def mark_host(*items: Any) -> None:
    """Tag tensors created outside the mode (e.g. a placement's maps) as host tensors."""
    for tensor in _tensors(items):
        _tag(tensor, True)


def mark_device(*items: Tensor | nn.Module) -> None:
    """Tag tensors, or every parameter and buffer of modules, as device tensors."""
    for item in items:
        tensors = list(item.parameters()) + list(item.buffers()) if isinstance(item, nn.Module) else [item]
        for tensor in tensors:
            _tag(tensor, False)


def _tensors(tree: Any) -> list[Tensor]:
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, Tensor)]


def _is_cpu(device: Any) -> bool:
    """Only the string ``"cpu"`` means the host (``torch.device`` objects stand for the compute device)."""
    return isinstance(device, str) and device.split(":")[0] == "cpu"


def _where() -> str:
    """The innermost ep_megatron frame of the current stack, for messages."""
    frames = [f for f in traceback.extract_stack() if f.filename.startswith(_PACKAGE)]
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "outside ep_megatron"


class HostDeviceModel(TorchFunctionMode):
    """Tags tensors host/device as CUDA would and records host-device syncs and mixed-device operations."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self.mixed: list[str] = []
        self._parameter_new: Any = None

    def __enter__(self) -> HostDeviceModel:
        # nn.Parameter(data) bypasses torch functions: the parameter takes its data's tag
        original = self._parameter_new = nn.Parameter.__new__

        def parameter_new(cls: type, data: Tensor | None = None, requires_grad: bool = True) -> Any:
            param = original(cls, data, requires_grad)
            if isinstance(data, Tensor):
                _tag(param, is_host(data))
            return param

        nn.Parameter.__new__ = parameter_new  # type: ignore[method-assign]
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        nn.Parameter.__new__ = self._parameter_new  # type: ignore[method-assign]

    def _sync(self, what: str) -> None:
        self.syncs.append(f"{what} at {_where()}")

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = _tensors((args, kwargs))
        device_in = any(not is_host(t) for t in inputs)
        if name == "__get__":  # a property: .grad / .data inherit the owner's tag
            out = func(*args, **kwargs)
            if isinstance(out, Tensor) and not hasattr(out, _TAG) and args and isinstance(args[0], Tensor):
                _tag(out, is_host(args[0]))
            return out
        host_out = self._classify(name, args, kwargs, inputs, device_in)
        out = func(*args, **kwargs)
        this = args[0] if args else None
        if isinstance(out, Tensor) and out is this and name in ("to", "cpu", "cuda"):
            if host_out == is_host(out):
                return out
            if not isinstance(out, nn.Parameter):  # Module.to() converts parameters in place
                out = out.clone()  # a copy between host and device is a new tensor on CUDA, never an alias
            _tag(out, host_out)
            return out
        for tensor in _tensors(out):
            if tensor is not this:  # an in-place op keeps its tensor's tag
                _tag(tensor, host_out)
        return out

    def _classify(self, name: str, args: tuple, kwargs: dict, inputs: list[Tensor], device_in: bool) -> bool:
        """Record syncs / mixing of the call; return whether its outputs are host tensors."""
        if name in _HOST_READS:
            if device_in:
                self._sync(f".{name}()")
            return True
        if name in ("cpu", "numpy", "pin_memory"):
            if device_in:
                self._sync(f".{name}()")
            return True
        if name in ("to", "cuda"):
            return self._classify_to(name, args, kwargs, device_in)
        if name in _FACTORIES:
            return self._classify_factory(name, args, kwargs, inputs)
        if device_in:
            self._check_data_shaped(name, args, kwargs)
            small_host = [t for t in inputs if is_host(t) and t.numel() > 1]
            if small_host:
                self.mixed.append(f"{name}: host tensor of shape {tuple(small_host[0].shape)} with device "
                                  f"tensors at {_where()}")
            return False
        return True

    def _classify_to(self, name: str, args: tuple, kwargs: dict, device_in: bool) -> bool:
        target: Any = kwargs.get("device")
        other = [a for a in args[1:] if isinstance(a, Tensor)]
        for arg in args[1:]:
            if isinstance(arg, (str, torch.device)):
                target = arg
        if name == "cuda":
            host = False
        elif other:
            host = is_host(other[0])
        elif target is None:
            return not device_in
        else:
            host = _is_cpu(target)
        if device_in and host:
            self._sync(".to(cpu)")
        if not device_in and not host and not kwargs.get("non_blocking", False):
            self._sync("host-to-device copy (.to(device))")
        return host

    def _classify_factory(self, name: str, args: tuple, kwargs: dict, inputs: list[Tensor]) -> bool:
        device = kwargs.get("device")
        if device is None:
            if name.endswith("_like") or name.startswith("new_"):
                host = is_host(inputs[0])
            else:
                host = True
        else:
            host = _is_cpu(device)
        if not host and name in _COPY_FACTORIES:
            self._sync(f"host-to-device copy ({name} with device=)")
        return host

    def _check_data_shaped(self, name: str, args: tuple, kwargs: dict) -> None:
        if name in _DATA_SHAPED or (name == "where" and len(args) == 1):
            self._sync(f"{name} (output size from device data)")
        elif name == "repeat_interleave":
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats", args[0] if len(args) == 1 else None)
            if isinstance(repeats, Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None:
                self._sync("repeat_interleave without output_size")
        elif name in ("__getitem__", "__setitem__", "index_put_", "index_put"):
            index = args[1] if len(args) > 1 else None
            if any(t.dtype == torch.bool and t.dim() > 0 for t in _tensors(index)):
                self._sync(f"{name} with a boolean mask")


_COLLECTIVES = ("all_reduce", "all_to_all_single", "broadcast", "all_gather", "all_gather_into_tensor",
                "reduce_scatter_tensor", "reduce", "gather", "scatter", "all_to_all")


class CollectiveAudit:
    """Wraps ``torch.distributed`` collectives; every call from ``ep_megatron`` is checked.

    ``host_group``: the gloo side group for host metadata. Violations are collected in ``errors``;
    ``calls`` counts the checked calls per collective name.
    """

    def __init__(self, host_group: dist.ProcessGroup | None) -> None:
        self.host_group = host_group
        self.errors: list[str] = []
        self.calls: dict[str, int] = {}
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> CollectiveAudit:
        for name in _COLLECTIVES:
            original = getattr(dist, name)
            self._saved[name] = original
            setattr(dist, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)

    def _wrap(self, name: str, original: Any) -> Any:
        def collective(*args: Any, **kwargs: Any) -> Any:
            caller = traceback.extract_stack()[-2]  # who called torch.distributed directly
            if caller.filename.startswith(_PACKAGE):
                self._check(name, caller, args, kwargs)
            return original(*args, **kwargs)

        return collective

    def _check(self, name: str, caller: Any, args: tuple, kwargs: dict) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        where = f"{Path(caller.filename).name}:{caller.lineno}"
        if caller.filename != _COMM:
            self.errors.append(f"dist.{name} called from {where}, not through ep_megatron/parallel/comm.py")
        group = kwargs.get("group")
        on_host_group = group is not None and group is self.host_group
        for tensor in _tensors((args, kwargs)):
            if is_host(tensor) != on_host_group:
                kind = "host" if is_host(tensor) else "device"
                target = "the host (gloo) group" if on_host_group else "a device group"
                self.errors.append(f"dist.{name} at {_where()}: a {kind} tensor {tuple(tensor.shape)} "
                                   f"{tensor.dtype} on {target}")


def device_tensors_of(*modules: nn.Module) -> Iterable[Tensor]:
    for module in modules:
        yield from module.parameters()
        yield from module.buffers()
