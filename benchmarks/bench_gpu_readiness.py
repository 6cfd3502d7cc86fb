"""GPU readiness on CPU: host-device syncs per MoE layer, grad-sync peak memory, per-slot backward time.

- ``syncs``: operations that would make the host wait for the GPU (``tests/device_model.py``'s
  ``HostDeviceModel``: ``.item()``, ``.tolist()``, ``.cpu()``, host-to-device copies, ``bincount``,
  ``nonzero``, ``repeat_interleave`` without ``output_size``, ...) in one MoE layer forward and in its
  backward, dropless, with aux and z losses; EP 1 (one process) and EP 2 (two gloo ranks).
- ``grad sync peak``: bytes ``ExpertGradSync`` allocates at its peak divided by the bytes of one layer's
  expert gradients; 4 MoE layers, EP 2, placements ``model``, ``data``, ``dynamic``; as the CPU
  allocator sees it (``allocator``: includes buffers gloo releases late on its own thread) and as the
  code holds its tensors (``tensors``), both from ``tests/cpu_memory.py``.
- ``per-slot backward``: forward+backward of the per-slot expert loop at 8 and 32 local slots, ours
  (``GroupedExperts.per_slot``) next to the peer (indexing the stacked weight once per slot, the previous
  implementation, whose backward writes a zero tensor of the whole weight per slot), interleaved in one
  run; the ratio 32 / 8 slots shows how the cost grows with the slot count (4.0 = linear).

Prints a table, then one JSON line. ``python benchmarks/bench_gpu_readiness.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HIDDEN, FFN, EXPERTS, TOKENS, LAYERS = 64, 128, 8, 256, 4


def _config(**overrides: Any) -> Any:
    from ep_megatron.config import MoEConfig

    base = dict(hidden_size=HIDDEN, ffn_hidden_size=FFN, num_experts=EXPERTS, top_k=2,
                load_balancing_type="aux_loss", aux_loss_coeff=0.01, z_loss_coeff=0.001)
    return MoEConfig(**{**base, **overrides})


def _layer_syncs(groups: Any) -> dict[str, int]:
    """Syncs of one forward and of its backward (after a warm-up step that builds the cached tables)."""
    import torch

    from ep_megatron.layer import MoELayer
    from tests.device_model import HostDeviceModel, mark_host

    config = _config(sharding_strategy="dynamic", num_redundant_experts=groups.ep_size)
    layer = MoELayer(config, config.placement(1, groups.ep_size), groups)
    gen = torch.Generator().manual_seed(groups.rank)
    x = torch.randn(TOKENS, HIDDEN, generator=gen, requires_grad=True)
    g = torch.randn(TOKENS, HIDDEN, generator=gen)
    (layer(x)[0] * g).sum().backward()
    mark_host(*vars(layer.placement).values())
    with HostDeviceModel() as forward:
        out = layer(x)[0]
    loss = (out * g).sum()
    with HostDeviceModel() as backward:
        loss.backward()
    return {"forward": len(forward.syncs), "backward": len(backward.syncs),
            "forward_where": forward.syncs, "backward_where": backward.syncs}


def _grad_sync_peak(groups: Any) -> dict[str, float]:
    import torch

    from ep_megatron.layer.moe_layers import MoELayers
    from ep_megatron.parallel.grad_sync import ExpertGradSync
    from tests.cpu_memory import peak_allocated_bytes, peak_tensor_bytes

    ratios = {}
    for strategy in ("model", "data", "dynamic"):
        extra = {"num_redundant_experts": groups.ep_size} if strategy == "dynamic" else {}
        moe = MoELayers.build(_config(sharding_strategy=strategy, **extra), groups, LAYERS)
        gen = torch.Generator().manual_seed(groups.rank)
        for p in moe.expert_params():
            p.grad = torch.randn(p.shape, generator=gen)
        first = moe.layer_expert_params(moe.layers[0])
        layer_bytes = sum(p.grad.numel() * p.grad.element_size() for p in first)
        sync = ExpertGradSync(moe)
        sync()  # warm-up: index plans are cached per placement
        ratios[f"allocator, {strategy}"] = peak_allocated_bytes(sync) / layer_bytes
        ratios[f"tensors, {strategy}"] = peak_tensor_bytes(sync) / layer_bytes
    return ratios


def _ranks() -> dict[str, Any]:
    import torch

    from ep_megatron.parallel import build_groups

    torch.manual_seed(0)
    groups = build_groups(2)
    return {"syncs": _layer_syncs(groups), "peak": _grad_sync_peak(groups)}


def _per_slot_times(slot_counts: tuple[int, ...], rows_per_slot: int, repeats: int) -> dict[str, float]:
    """Median ms of forward+backward per slot count, ours and the peer, interleaved."""
    import torch

    from ep_megatron.layer.experts import GroupedExperts, expert_activation

    def peer(experts: Any, rows: Any, counts: list[int]) -> Any:
        outputs = []
        for local_slot, segment in enumerate(rows.split(counts)):
            hidden = expert_activation(segment @ experts.fc1_weight[local_slot].t(), experts.activation)
            outputs.append(hidden @ experts.fc2_weight[local_slot].t())
        return torch.cat(outputs)

    cases = {}
    for slots in slot_counts:
        experts = GroupedExperts(_config(num_experts=slots), slots, "ep_size_1")
        torch.nn.init.normal_(experts.fc1_weight, std=0.02)
        torch.nn.init.normal_(experts.fc2_weight, std=0.02)
        rows = torch.randn(slots * rows_per_slot, HIDDEN, requires_grad=True)
        counts = [rows_per_slot] * slots
        cases[f"ours_{slots}"] = (experts, rows, counts, experts.per_slot)
        cases[f"peer_{slots}"] = (experts, rows, counts, lambda r, c, e=experts: peer(e, r, c))
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (experts, rows, counts, fn) in cases.items():
            experts.zero_grad(set_to_none=True)
            start = time.perf_counter()
            fn(rows, counts).sum().backward()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions of each per-slot case")
    args = parser.parse_args()
    import torch

    from ep_megatron.parallel import ParallelGroups
    from tests.multirank import run_ranks

    torch.set_num_threads(1)
    ep1 = _layer_syncs(ParallelGroups.single())
    ep2 = run_ranks(_ranks, 2, timeout_s=600)[0]
    times = _per_slot_times((8, 32), rows_per_slot=16, repeats=args.repeats)
    print(f"{'measure':52} {'value':>10}")
    print(f"{'syncs per layer forward, EP 1':52} {ep1['forward']:10d}")
    print(f"{'syncs per layer backward, EP 1':52} {ep1['backward']:10d}")
    print(f"{'syncs per layer forward, EP 2':52} {ep2['syncs']['forward']:10d}")
    print(f"{'syncs per layer backward, EP 2':52} {ep2['syncs']['backward']:10d}")
    for strategy, ratio in ep2["peak"].items():
        print(f"{'grad sync peak / one layer grads, ' + strategy:52} {ratio:10.2f}")
    for who in ("ours", "peer"):
        for slots in (8, 32):
            print(f"{f'per-slot fwd+bwd ms, {who}, {slots} slots':52} {times[f'{who}_{slots}']:10.2f}")
        print(f"{f'per-slot time 32 / 8 slots, {who}':52} {times[f'{who}_32'] / times[f'{who}_8']:10.2f}")
    print(f"{'per-slot time at 32 slots, peer / ours':52} {times['peer_32'] / times['ours_32']:10.2f}")
    for where in ep2["syncs"]["forward_where"]:
        print(f"  EP 2 forward sync: {where}")
    result = {
        "syncs_forward_ep1": ep1["forward"], "syncs_backward_ep1": ep1["backward"],
        "syncs_forward_ep2": ep2["syncs"]["forward"], "syncs_backward_ep2": ep2["syncs"]["backward"],
        **{f"grad_sync_peak_ratio_{k.replace(', ', '_')}": round(v, 3) for k, v in ep2["peak"].items()},
        **{f"per_slot_ms_{k}": round(v, 3) for k, v in times.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
