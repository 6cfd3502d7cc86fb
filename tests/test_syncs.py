"""Host-device syncs of the MoE layer, pinned on CPU, and the per-slot expert path's backward cost.

``tests/device_model.py`` tags tensors host/device as CUDA would and records every operation that would
make the host wait for the GPU (``.item()``, ``.tolist()``, ``.cpu()``, ``bool()``, ``bincount``,
``nonzero``, ``repeat_interleave`` without ``output_size``, host-to-device copies, ...). A dropless layer
forward must read the device once (the count exchange, which also carries the NaN/inf check) and its
backward never: a new sync fails here. The GPU check (``tests/test_gpu.py``) counts the same with
``torch.cuda.set_sync_debug_mode``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ep_megatron.config import MoEConfig
from ep_megatron.layer import MoELayer
from ep_megatron.layer.experts import GroupedExperts
from ep_megatron.parallel import ParallelGroups
from tests.cpu_memory import total_allocated_bytes
from tests.device_model import HostDeviceModel, mark_host

BASE = dict(hidden_size=16, ffn_hidden_size=16, num_experts=8, top_k=2)
CASES = {
    "plain": {},
    "losses_shared": dict(load_balancing_type="aux_loss", aux_loss_coeff=0.1, z_loss_coeff=0.01,
                          shared_expert_ffn_size=8),
    "dynamic_bias_sigmoid": dict(sharding_strategy="dynamic", num_redundant_experts=4,
                                 enable_expert_bias=True, score_function="sigmoid",
                                 load_balancing_type="seq_aux_loss", aux_loss_coeff=0.1),
    "groups_gelu": dict(num_groups=4, group_topk=2, activation="gelu", pre_softmax=True),
}


def _syncs(overrides: dict[str, Any], grouped: bool) -> tuple[list[str], list[str], list[str]]:
    config = MoEConfig(**{**BASE, **overrides})
    layer = MoELayer(config, config.placement(1, 1), ParallelGroups.single())
    layer.experts.use_grouped_mm = grouped
    x = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    layer(x)[0].sum().backward()  # warm-up: the replica table is built once per placement
    mark_host(*vars(layer.placement).values())
    with HostDeviceModel() as forward:
        out = layer(x)[0]
    with HostDeviceModel() as backward:
        out.square().sum().backward()
    return forward.syncs, backward.syncs, forward.mixed + backward.mixed


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per_slot"])
def test_a_dropless_forward_reads_the_device_once_and_its_backward_never(grouped: bool) -> None:
    for name, overrides in CASES.items():
        forward, backward, mixed = _syncs(overrides, grouped)
        assert len(forward) == 1 and "dispatcher.py" in forward[0], (name, forward)
        assert backward == [], (name, backward)
        assert mixed == [], (name, mixed)


def test_the_sync_model_sees_what_would_stall_a_gpu() -> None:
    """The counter itself: each kind of host read of a device tensor is seen, host-only work is not."""
    device_tensor = torch.arange(6)
    with HostDeviceModel() as model:
        host = torch.tensor([1, 2, 3])
        host.tolist(), int(host.sum()), host.bincount()  # host tensors: nothing to wait for
        counts = device_tensor.bincount()
        counts.tolist()
        bool(device_tensor.any())
        device_tensor.nonzero()
        device_tensor.repeat_interleave(device_tensor)
        device_tensor.repeat_interleave(device_tensor, output_size=15)  # no sync
        device_tensor[device_tensor > 2]
        device_tensor.cpu()
        host.to(device_tensor.device)
        torch.zeros(3, device=device_tensor.device) + device_tensor[:3]  # no sync
        device_tensor[:3] + host  # a host tensor mixed into device work
    kinds = [sync.split(" at ")[0] for sync in model.syncs]
    assert kinds == ["bincount (output size from device data)", ".tolist()", ".__bool__()",
                     "nonzero (output size from device data)", "repeat_interleave without output_size",
                     "__getitem__ with a boolean mask", ".cpu()", "host-to-device copy (.to(device))"], kinds
    assert len(model.mixed) == 1 and model.mixed[0].startswith("add"), model.mixed


def test_capacity_mode_adds_only_the_nonzero_of_dropped_pairs() -> None:
    forward, backward, _ = _syncs(dict(capacity_factor=1.0), grouped=False)
    assert len(forward) == 2 and any("nonzero" in s for s in forward), forward
    assert backward == []


def test_per_slot_backward_allocates_linearly_in_the_slot_count() -> None:
    """The stacked weights are unbound once, so backward writes each slot's gradient once; indexing the
    weight per slot would allocate a full-size zero gradient per slot (16x from 8 to 32 slots)."""
    allocated = {}
    for slots in (8, 32):
        experts = GroupedExperts(MoEConfig(**{**BASE, "num_experts": slots}), slots, "ep_size_1")
        torch.nn.init.normal_(experts.fc1_weight)
        torch.nn.init.normal_(experts.fc2_weight)
        rows = torch.randn(4 * slots, 16, requires_grad=True)
        out = experts.per_slot(rows, [4] * slots).sum()
        allocated[slots] = total_allocated_bytes(out.backward)
    assert allocated[32] <= 5 * allocated[8], allocated
