"""The pretraining job behind ``ep-megatron train``: an MoE GPT on real text, with rebalancing,
checkpoints with auto-resume, metrics, validation and a final report.

Launch with ``torchrun --nproc_per_node N -m ep_megatron train CONFIG.yaml``, with the
``deepspeed`` launcher, or as a single process. Every rank runs the same loop; all collectives of a
step are entered by every rank in the same order.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ep_megatron.integrations import deepspeed as ds_glue
from ep_megatron.layer import MoELayer
from ep_megatron.layer.moe_layers import MoELayers
from ep_megatron.mixed_precision import MixedPrecisionOptimizer, to_low_precision
from ep_megatron.parallel import ParallelGroups, build_groups, init_distributed
from ep_megatron.parallel.comm import barrier, host_all_reduce
from ep_megatron.parallel.grad_sync import ExpertGradSync
from ep_megatron.services.checkpoint import (
    OptimizerLike,
    latest_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from ep_megatron.services.rebalance import Rebalancer
from ep_megatron.trainer.config import (
    RunConfig,
    TrainerConfig,
    deepspeed_config,
    gpt_config,
    load_config,
    lr_at,
    moe_config,
)
from ep_megatron.trainer.data import TokenBatches, build_data, megatron_blend
from ep_megatron.trainer.metrics_io import METRICS_FILE, ExpertLoadLog
from ep_megatron.trainer.model import MoEGPT
from ep_megatron.trainer.report import write_report
from ep_megatron.trainer.step import forward_backward, optimizer_step


class _StopFlag:
    """Set by SIGINT / SIGTERM; the loop finishes the step, agrees across ranks, saves and exits 0."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True


@dataclass
class _Run:
    """Everything a step needs, built once."""

    config: RunConfig
    groups: ParallelGroups
    device: torch.device
    data: TokenBatches
    model: MoEGPT
    moe: MoELayers  # the model's MoE layers and their placement
    optimizer: OptimizerLike  # what checkpoints save: the torch AdamW or a DeepSpeed ZeRO view
    engine: Any | None  # the DeepSpeed engine with train.deepspeed_config, else None
    grad_sync: ExpertGradSync | None  # our sync of expert grads (DeepSpeed runs use its replica hooks)
    rebalancer: Rebalancer | None
    run_dir: Path


def _build(config: RunConfig, run_dir: Path) -> _Run:
    env = init_distributed()
    ep_size = config.train.expert_parallel_size or env.world_size
    groups = build_groups(ep_size)
    torch.manual_seed(config.train.seed)
    data = _build_data(config, groups)
    moe_cfg = moe_config(config)
    model_cfg = gpt_config(config, data.vocab_size)
    num_moe = sum(model_cfg.is_moe_layer(i) for i in range(model_cfg.num_layers))
    placement = moe_cfg.placement(num_moe, groups.ep_size)
    model = MoEGPT(model_cfg, lambda i: MoELayer(moe_cfg, placement, groups, i)).to(env.device)
    moe = MoELayers(model)
    if config.train.deepspeed_config:
        engine = _deepspeed_engine(moe, config.train)
        optimizer, rows = ds_glue.checkpoint_optimizer(engine), ds_glue.optimizer_rows(engine)
        grad_sync = None
    else:
        engine, grad_sync = None, ExpertGradSync(moe)
        optimizer = rows = _torch_optimizer(moe, config.train)
    rebalancer = None
    if moe_cfg.sharding_strategy == "dynamic" and config.rebalance.enabled:
        rebalancer = Rebalancer(moe, rows, config.rebalance)
    return _Run(config, groups, env.device, data, model, moe, optimizer, engine, grad_sync, rebalancer,
                run_dir)


def _build_data(config: RunConfig, groups: ParallelGroups) -> TokenBatches:
    """Rank 0 builds (and caches) the corpus first, so the other ranks only read the cache. Megatron's
    dataset builder orders the ranks itself, so every rank calls it at once."""
    cfg = config.train
    num_samples = (cfg.steps * cfg.grad_accum_steps * cfg.micro_batch_size * groups.world_size,
                   cfg.eval_batches * cfg.micro_batch_size * groups.world_size)
    if megatron_blend(config.data.source) is not None:
        return build_data(config.data, num_samples)[0]
    if groups.rank == 0:
        data, _ = build_data(config.data)
    barrier(groups.host_group)
    if groups.rank != 0:
        data, _ = build_data(config.data)
    return data


def _adamw(param_groups: list[dict[str, Any]], cfg: TrainerConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _torch_optimizer(moe: MoELayers, cfg: TrainerConfig) -> Any:
    """AdamW; under bf16 the model's parameters become bf16 and AdamW steps fp32 masters of them."""
    param_groups = moe.param_groups(cfg.weight_decay)
    if cfg.precision != "bf16":
        return _adamw(param_groups, cfg)
    to_low_precision(moe.model, torch.bfloat16)
    return MixedPrecisionOptimizer(param_groups, lambda master_groups: _adamw(master_groups, cfg))


def _deepspeed_engine(moe: MoELayers, cfg: TrainerConfig) -> Any:
    """The DeepSpeed engine of ``train.deepspeed_config`` around ``moe.model`` (AdamW, same param groups)."""
    ds_config = deepspeed_config(cfg, moe.groups.world_size)
    engine, *_ = ds_glue.initialize(moe, lambda param_groups: _adamw(param_groups, cfg), ds_config,
                                    weight_decay=cfg.weight_decay)
    return engine


@dataclass(frozen=True)
class StepOutput:
    """What one optimizer step reports (this rank's view; the loop reduces loss and rows over ranks)."""

    loss: Tensor  # [] mean loss over this rank's micro-batches
    expert_rows: list[int]  # [L] rows this rank's experts computed, summed over micro-batches
    aux_losses: dict[str, float]  # mean over MoE layers and micro-batches
    grad_norm: float  # true global norm before clipping (NaN when clipping is off)
    grad_sync_bytes: int  # bytes this rank sent to sum expert replicas


def _train_step(run: _Run, step: int) -> StepOutput:
    """``grad_accum_steps`` forward/backward passes, gradient sync, clipping and one optimizer step."""
    cfg, groups = run.config.train, run.groups
    micro = [run.data.train_batch(step * cfg.grad_accum_steps + i, cfg.micro_batch_size, groups.rank,
                                  groups.world_size) for i in range(cfg.grad_accum_steps)]
    micro = [(inputs.to(run.device), targets.to(run.device)) for inputs, targets in micro]
    return (_deepspeed_step if run.engine is not None else _torch_step)(run, step, micro)


def _torch_step(run: _Run, step: int, micro: list[tuple[Tensor, Tensor]]) -> StepOutput:
    """A step with our sync and AdamW: micro-batch gradients accumulate, then sync, clip and step."""
    cfg = run.config.train

    def forward(inputs: Tensor, targets: Tensor) -> Tensor:
        return run.model(inputs, targets)[0]  # bf16 parameters under precision bf16: no autocast

    def backward(loss: Tensor) -> None:
        (loss / len(micro)).backward()

    loss, rows, aux = forward_backward(run.moe, micro, forward, backward, run.grad_sync)
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    stats = optimizer_step(run.moe, run.optimizer, run.grad_sync, max_norm=cfg.grad_clip)
    return StepOutput(loss, rows, aux, stats.grad_norm, stats.grad_sync_bytes)


def _deepspeed_step(run: _Run, step: int, micro: list[tuple[Tensor, Tensor]]) -> StepOutput:
    """The same step through the DeepSpeed engine (its reductions, ZeRO, bf16 and accumulation
    boundary; our replica hooks and norm). ``engine.backward`` divides by the accumulation steps."""
    engine = run.engine
    for group in engine.optimizer.param_groups:
        group["lr"] = lr_at(step, run.config.train)

    def backward(loss: Tensor) -> None:
        engine.backward(loss)
        engine.step()  # applies the update at the accumulation boundary only

    loss, rows, aux = forward_backward(run.moe, micro, lambda i, t: engine(i, t)[0], backward)
    run.moe.update_expert_bias()
    norm = engine.get_global_grad_norm()
    grad_norm = float(norm) if norm is not None and run.config.train.grad_clip > 0 else float("nan")
    return StepOutput(loss, rows, aux, grad_norm, ds_glue.replica_grad_hooks(engine).take_bytes_sent())


def _reduce_step(run: _Run, out: StepOutput, load: Tensor, stop: bool) -> tuple[float, Tensor, Tensor, bool]:
    """One all-reduce per step over the host group: mean loss, global ``load [L, E]`` (this rank's routed
    pairs of the step), rows per rank ``[world, L]``, stop flag."""
    groups, num_layers = run.groups, len(run.moe)
    load = load.to(torch.float64)
    rows = torch.zeros(groups.world_size, num_layers, dtype=torch.float64)
    rows[groups.rank] = torch.tensor(out.expert_rows, dtype=torch.float64)
    packed = torch.cat([out.loss.cpu().double().view(1), torch.tensor([float(stop)], dtype=torch.float64),
                        load.flatten(), rows.flatten()])
    host_all_reduce(packed, groups, "step metrics")
    mean_loss = float(packed[0]) / groups.world_size
    load = packed[2 : 2 + load.numel()].view_as(load)
    rows = packed[2 + load.numel():].view(groups.world_size, num_layers)
    return mean_loss, load, rows, bool(packed[1] > 0)


def _max_over_mean(rows: Tensor, ep_size: int) -> list[float]:
    """``rows [world, L]`` expert rows per rank -> per layer, worst EP group's max/mean rows per rank."""
    per_group = rows.view(-1, ep_size, rows.shape[1])  # [edp, ep, L]
    ratio = per_group.amax(dim=1) / per_group.mean(dim=1).clamp(min=1e-9)
    return ratio.amax(dim=0).tolist()


@torch.no_grad()
def evaluate(run: _Run) -> float:
    """Mean validation loss per token over every rank's shard (same batch count on every rank)."""
    run.model.eval()
    cfg, groups = run.config.train, run.groups
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    num_targets = 0
    batches = run.data.val_batches(cfg.micro_batch_size, groups.rank, groups.world_size)
    for _, (inputs, targets) in zip(range(cfg.eval_batches), batches):
        loss, _ = run.model(inputs.to(run.device), targets.to(run.device))
        loss_sum += loss.double() * targets.numel()
        num_targets += targets.numel()
    total = torch.stack([loss_sum.cpu(), torch.tensor(float(num_targets), dtype=torch.float64)])
    host_all_reduce(total, groups, "validation loss")
    run.model.train()
    return float(total[0] / total[1])


class _Logger:
    """``metrics.jsonl`` and ``expert_load.bin`` (rank 0), TensorBoard when installed, and a tqdm progress
    bar."""

    def __init__(self, run: _Run, start_step: int) -> None:
        self.enabled = run.groups.rank == 0
        self.file = (run.run_dir / METRICS_FILE).open("a") if self.enabled else None
        self.expert_load = None
        if self.enabled:
            self.expert_load = ExpertLoadLog(run.run_dir, len(run.moe), run.moe.placement.num_logical_experts)
        self.tensorboard = _tensorboard(run.run_dir) if self.enabled else None
        self.bar = None
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=run.config.train.steps, initial=start_step, unit="step",
                            dynamic_ncols=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key in ("loss", "val_loss", "lr", "tokens_per_s"):
                if key in record:
                    self.tensorboard.add_scalar(key, record[key], record["step"])
            for layer, value in enumerate(record.get("max_over_mean", [])):
                self.tensorboard.add_scalar(f"max_over_mean/layer{layer}", value, record["step"])

    def log_expert_load(self, step: int, load: Tensor) -> None:
        """Append the step's global ``load [L, E]`` (routed token-expert pairs) to ``expert_load.bin``."""
        if self.expert_load is not None:
            self.expert_load.append(step, load.numpy())

    def progress(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(record["step"] - self.bar.n)
            worst = max(record["max_over_mean"], default=1.0)
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                 imbalance=f"{worst:.2f}")

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.file.close()
            if self.expert_load is not None:
                self.expert_load.close()
            if self.tensorboard is not None:
                self.tensorboard.close()


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _save(run: _Run, step: int) -> Path:
    return save_checkpoint(run.run_dir / "checkpoints", step, run.moe, run.optimizer,
                           rebalancer=run.rebalancer)


def _resume(run: _Run) -> int:
    """Load the newest complete checkpoint of the run directory, if any; return its step."""
    if latest_checkpoint(run.run_dir / "checkpoints") is None:
        return 0
    state = load_checkpoint(run.run_dir / "checkpoints", run.moe, run.optimizer, rebalancer=run.rebalancer)
    return int(state["step"])


def _write_run_info(run: _Run, config_path: str) -> None:
    info = {
        "config": str(config_path),
        "world_size": run.groups.world_size,
        "device": str(run.device),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else "none",
        "expert_parallel_size": run.groups.ep_size,
        "sharding_strategy": run.moe.config.sharding_strategy,
        "corpus": run.config.data.source,
        **_bigram_info(run.data),
        "num_moe_layers": len(run.moe),
        "num_experts": run.moe.config.num_experts,
        "num_slots": run.moe.placement.num_slots,
        "optimizer": _optimizer_name(run),
    }
    (run.run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")


def _bigram_info(data: TokenBatches) -> dict[str, Any]:
    baseline = data.bigram_baseline()
    return {"bigram_entropy": baseline.nats, "bigram_label": baseline.label}


def _optimizer_name(run: _Run) -> str:
    if run.engine is None:
        return "torch AdamW"
    return f"DeepSpeed ZeRO stage {run.engine.zero_optimization_stage()} AdamW"


def _step_record(run: _Run, step: int, loss: float, rows: Tensor, out: StepOutput,
                 metrics: Any) -> dict[str, Any]:
    """The ``metrics.jsonl`` line of a training step (``step`` is 1-based: steps done)."""
    record = {
        "split": "train", "step": step, "loss": loss, "lr": lr_at(step - 1, run.config.train),
        "aux_losses": out.aux_losses, "grad_norm": out.grad_norm, "grad_sync_bytes": out.grad_sync_bytes,
        "max_over_mean": _max_over_mean(rows, run.groups.ep_size),
        "rebalanced": metrics is not None and metrics.slots_moved > 0,
        "slots_moved": metrics.slots_moved if metrics is not None else 0,
        "bytes_moved": sum(metrics.bytes_sent_per_rank) if metrics is not None else 0,
    }
    if metrics is not None:
        record["rebalance"] = metrics.to_dict()
    return record


def train(config_path: str | Path, overrides: list[str] = (),
          run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run (or resume) the pretraining job; returns the final summary on every rank."""
    config = load_config(config_path, overrides)
    run_dir = Path(run_dir or Path("runs") / Path(config_path).stem)
    run_dir.mkdir(parents=True, exist_ok=True)
    stop = _StopFlag()
    run = _build(config, run_dir)
    if run.groups.rank == 0:
        remove_stale_temporaries(run.run_dir / "checkpoints")  # left by killed saves; no save runs now
    start_step = _resume(run)
    if run.groups.rank == 0:
        _write_run_info(run, str(config_path))
    logger = _Logger(run, start_step)
    cfg = config.train
    tokens_per_step = (cfg.micro_batch_size * cfg.grad_accum_steps * config.data.seq_len
                       * run.groups.world_size)
    step = start_step
    try:
        while step < cfg.steps:
            started = time.perf_counter()
            out = _train_step(run, step)
            step_load = run.moe.take_loads()  # [L, E], the one drain of the step
            metrics = run.rebalancer.step(step_load) if run.rebalancer is not None else None
            mean_loss, load, rows, stop_now = _reduce_step(run, out, step_load, stop.requested)
            step += 1
            record = _step_record(run, step, mean_loss, rows, out, metrics)
            record["tokens_per_s"] = tokens_per_step / (time.perf_counter() - started)
            logger.log(record)
            logger.log_expert_load(step, load)
            if step % cfg.log_interval == 0 or step == cfg.steps:
                logger.progress(record)
            final = step == cfg.steps or stop_now
            if (cfg.eval_interval and step % cfg.eval_interval == 0) or final:
                val_loss = evaluate(run)
                logger.log({"split": "val", "step": step, "val_loss": val_loss})
                logger.write(f"step {step}: validation loss {val_loss:.4f}")
            if (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0) or final:
                _save(run, step)
            if stop_now:
                logger.write(f"stopping at step {step} on request; checkpoint saved")
                break
    finally:
        logger.close()
    summary: dict[str, Any] = {"step": step}
    if run.groups.rank == 0:
        report = write_report(run_dir)
        summary = json.loads((report / "summary.json").read_text())
        print(f"report: {report}")
        print(f"final validation loss {summary['final_val_loss']:.4f} nats/token; "
              f"{summary['bigram_label']} {summary['bigram_entropy']:.4f} nats/token")
    barrier(run.groups.host_group)
    return summary

