"""The pretraining job behind ``ep-megatron train``: an MoE GPT on real text, with rebalancing,
checkpoints with auto-resume, metrics, validation and a final report.

Launch with ``torchrun --nproc_per_node N -m ep_megatron train CONFIG.yaml``, with the
``deepspeed`` launcher, or as a single process. Every rank runs the same loop; all collectives of a
step are entered by every rank in the same order.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn

from ep_megatron.config import MoEConfig
from ep_megatron.integrations import deepspeed as ds_glue
from ep_megatron.layer import MoELayer
from ep_megatron.layer.router import AuxLossAutoScaler
from ep_megatron.parallel import ParallelGroups, build_groups, init_distributed
from ep_megatron.parallel.grad_sync import (
    ExpertGradSync,
    clip_grad_norm_,
    expert_params,
    optimizer_param_groups,
)
from ep_megatron.services.checkpoint import OptimizerLike, latest_checkpoint, load_checkpoint, save_checkpoint
from ep_megatron.services.rebalance import RebalanceConfig, Rebalancer
from ep_megatron.trainer.data import DataConfig, TokenBatches, build_data, megatron_blend
from ep_megatron.trainer.metrics_io import METRICS_FILE, ExpertLoadLog
from ep_megatron.trainer.model import GPTConfig, MoEGPT
from ep_megatron.trainer.report import write_report
from ep_megatron.trainer.shipped import resolve_shipped


@dataclass
class TrainerConfig:
    """The optimisation schedule and the run's bookkeeping."""

    steps: int = 300  # optimizer steps in the whole run (> 0)
    micro_batch_size: int = 4  # sequences per rank per forward/backward (> 0)
    grad_accum_steps: int = 1  # micro-batches per rank per optimizer step (> 0)
    lr: float = 3e-3  # peak learning rate (> 0)
    min_lr: float = 3e-4  # learning rate at the end of the cosine decay, in [0, lr]
    warmup_steps: int = 30  # linear warmup steps, in [0, steps]
    weight_decay: float = 0.1  # AdamW decoupled weight decay of matrices (norms and biases get none)
    beta1: float = 0.9  # AdamW beta1, in [0, 1)
    beta2: float = 0.95  # AdamW beta2, in [0, 1)
    grad_clip: float = 1.0  # max global grad norm (each logical expert counted once); 0 disables
    precision: str = "fp32"  # "fp32" or "bf16" (autocast; fp32 master weights and optimizer state)
    seed: int = 0  # seeds weights (dense and per logical expert) and data order
    expert_parallel_size: int = 0  # EP size; 0 means all ranks
    eval_interval: int = 100  # steps between validations; 0 validates only at the end
    eval_batches: int = 8  # validation micro-batches per rank (> 0)
    checkpoint_interval: int = 100  # steps between checkpoints; 0 saves only at the end
    log_interval: int = 1  # steps between progress-bar updates (> 0)
    deepspeed_config: str = ""  # DeepSpeed JSON (ZeRO stage 0/1/2 settings); "" trains with torch AdamW

    def __post_init__(self) -> None:
        _positive(self, "steps", "micro_batch_size", "grad_accum_steps", "eval_batches", "log_interval")
        _non_negative(self, "expert_parallel_size", "eval_interval", "checkpoint_interval", "grad_clip")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"train.lr={self.lr} must be > 0 and train.min_lr={self.min_lr} in [0, lr]")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"train.warmup_steps={self.warmup_steps} must be in [0, steps={self.steps}]")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be in [0, 1)")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"train.precision={self.precision!r} must be 'fp32' or 'bf16'")
        if self.deepspeed_config:
            deepspeed_config(self)


def deepspeed_config(cfg: TrainerConfig, world_size: int | None = None) -> dict[str, Any]:
    """``train.deepspeed_config`` completed from the train section, which owns the batch size, clipping,
    precision and optimizer (AdamW with its schedule); the file holds ZeRO and communication settings.

    A file value that disagrees with the train section raises ``ValueError`` naming both.
    """
    where = f"train.deepspeed_config={cfg.deepspeed_config!r}"
    try:
        raw = json.loads(resolve_shipped(cfg.deepspeed_config, ".json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: cannot read it as JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: must hold a JSON object")
    owned_sections = [k for k in ("optimizer", "scheduler") if k in raw]
    if owned_sections:
        raise ValueError(f"{where}: remove {owned_sections}; the optimizer is AdamW with train.lr, beta1, "
                         f"beta2, weight_decay, warmup_steps and min_lr")
    if (raw.get("fp16") or {}).get("enabled", False):
        raise ValueError(f"{where}: fp16 is not supported; set train.precision to 'fp32' or 'bf16'")
    stage = (raw.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2) or (stage == 0 and cfg.precision == "bf16"):
        raise ValueError(f"{where}: zero_optimization.stage={stage} must be 0, 1 or 2 (1 or 2 with "
                         f"train.precision='bf16')")
    owned: dict[str, Any] = {"train_micro_batch_size_per_gpu": cfg.micro_batch_size,
                             "gradient_accumulation_steps": cfg.grad_accum_steps,
                             "gradient_clipping": float(cfg.grad_clip)}
    if world_size is not None:
        owned["train_batch_size"] = cfg.micro_batch_size * cfg.grad_accum_steps * world_size
    bf16 = {**(raw.get("bf16") or {}), "enabled": cfg.precision == "bf16"}
    for key, value in [*owned.items(), ("bf16.enabled", bf16["enabled"])]:
        section, _, field = key.partition(".")
        given = (raw.get(section) or {}).get(field) if field else raw.get(section)
        if given is not None and given != value:
            raise ValueError(f"{where}: {key}={given} disagrees with the train section ({value}); remove it "
                             f"from the file")
    return {**raw, **owned, "bf16": bf16}


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        if not getattr(cfg, name) > 0:
            raise ValueError(f"train.{name}={getattr(cfg, name)} must be > 0")


def _non_negative(cfg: Any, *names: str) -> None:
    for name in names:
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"train.{name}={getattr(cfg, name)} must be >= 0")


@dataclass
class RunConfig:
    """A whole run, as a YAML file spells it: one section per dataclass."""

    model: dict[str, Any]  # GPTConfig fields (vocab_size and max_seq_len come from the data)
    moe: dict[str, Any]  # MoEConfig fields (hidden_size comes from the model, EP size from train)
    data: DataConfig
    train: TrainerConfig
    rebalance: RebalanceConfig  # used with moe.sharding_strategy == "dynamic"


_SECTIONS = {"model": GPTConfig, "moe": MoEConfig, "data": DataConfig, "train": TrainerConfig,
             "rebalance": RebalanceConfig}
_DERIVED = {"model": {"vocab_size", "max_seq_len"}, "moe": {"hidden_size", "expert_parallel_size"},
            "rebalance": {"num_redundant_experts"}}


def _check_keys(section: str, values: dict[str, Any]) -> None:
    allowed = {f.name for f in dataclasses.fields(_SECTIONS[section])} - _DERIVED.get(section, set())
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
                         f"allowed in '{section}': {', '.join(sorted(allowed))}")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, field = key.partition(".")
        if not sep or not dot or not field:
            raise ValueError(f"--set {item!r} must look like section.key=value")
        if section not in _SECTIONS:
            raise ValueError(f"--set {item!r}: section {section!r} must be one of {sorted(_SECTIONS)}")
        raw.setdefault(section, {})[field] = yaml.safe_load(value)
    return raw


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read and validate a run config; every bad key or value raises ``ValueError`` naming it."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections {sorted(_SECTIONS)}")
    raw = apply_overrides(raw, list(overrides))
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; allowed: {sorted(_SECTIONS)}")
    sections = {name: dict(raw.get(name) or {}) for name in _SECTIONS}
    for name, values in sections.items():
        _check_keys(name, values)
    config = RunConfig(
        model=sections["model"],
        moe=sections["moe"],
        data=_section("data", lambda: DataConfig(**sections["data"])),
        train=_section("train", lambda: TrainerConfig(**sections["train"])),
        rebalance=_section("rebalance", lambda: RebalanceConfig(**sections["rebalance"])),
    )
    # Validate the model and MoE sections with placeholder derived values.
    _section("model", lambda: gpt_config(config, vocab_size=257))
    _section("moe", lambda: moe_config(config, ep_size=config.train.expert_parallel_size or 1))
    return config


def _section(name: str, build: Any) -> Any:
    """Run a section's constructor; its errors are re-raised prefixed with the section name."""
    try:
        return build()
    except (TypeError, ValueError) as exc:
        message = str(exc)
        prefix = "" if message.startswith(f"{name}.") else f"{name}."
        raise ValueError(f"{prefix}{message}") from exc


def gpt_config(config: RunConfig, vocab_size: int) -> GPTConfig:
    return GPTConfig(**{"seed": config.train.seed, **config.model, "vocab_size": vocab_size,
                        "max_seq_len": config.data.seq_len})


def moe_config(config: RunConfig, ep_size: int) -> MoEConfig:
    hidden = config.model.get("hidden_size", GPTConfig.hidden_size)
    return MoEConfig(**{"seed": config.train.seed, **config.moe, "hidden_size": hidden,
                        "expert_parallel_size": ep_size})


def lr_at(step: int, cfg: TrainerConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``steps`` (``step`` is 0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


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
    moe_layers: list[MoELayer]
    moe_cfg: MoEConfig
    dense_params: list[nn.Parameter]
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
    moe_cfg = moe_config(config, ep_size)
    model_cfg = gpt_config(config, data.vocab_size)
    num_moe = sum(model_cfg.is_moe_layer(i) for i in range(model_cfg.num_layers))
    placement = moe_cfg.placement(max(num_moe, 1))
    model = MoEGPT(model_cfg, lambda i: MoELayer(moe_cfg, placement, groups, i)).to(env.device)
    moe_layers = list(model.moe_layers())
    experts = {id(p) for layer in moe_layers for p in expert_params(layer)}
    dense = [p for p in model.parameters() if id(p) not in experts]
    if config.train.deepspeed_config:
        engine = _deepspeed_engine(model, groups, config.train)
        optimizer, grad_sync = ds_glue.checkpoint_optimizer(engine), None
    else:
        engine, optimizer = None, _optimizer(model, config.train)
        grad_sync = ExpertGradSync(moe_layers, groups)
    rebalancer = None
    if moe_cfg.sharding_strategy == "dynamic" and config.rebalance.enabled and moe_layers:
        redundant = moe_cfg.num_redundant_experts
        rebalance_cfg = dataclasses.replace(config.rebalance, num_redundant_experts=redundant)
        rebalancer = Rebalancer(moe_layers, engine or optimizer, groups, rebalance_cfg)
    return _Run(config, groups, env.device, data, model, moe_layers, moe_cfg, dense, optimizer, engine,
                grad_sync, rebalancer, run_dir)


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
    if dist.is_initialized():
        dist.barrier()
    if groups.rank != 0:
        data, _ = build_data(config.data)
    return data


def _optimizer(model: nn.Module, cfg: TrainerConfig) -> torch.optim.Optimizer:
    """AdamW; matrices (incl. stacked expert weights) decay, norms and vectors do not."""
    return _adamw(optimizer_param_groups(model, cfg.weight_decay), cfg)


def _adamw(param_groups: list[dict[str, Any]], cfg: TrainerConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _deepspeed_engine(model: nn.Module, groups: ParallelGroups, cfg: TrainerConfig) -> Any:
    """The DeepSpeed engine of ``train.deepspeed_config`` around ``model`` (AdamW, same param groups)."""
    ds_config = deepspeed_config(cfg, groups.world_size)
    engine, *_ = ds_glue.initialize(model, groups, lambda param_groups: _adamw(param_groups, cfg), ds_config,
                                    weight_decay=cfg.weight_decay)
    return engine


def _all_reduce_mean(tensors: list[Tensor], groups: ParallelGroups) -> None:
    """Average dense grads over all data-parallel ranks in one flat all-reduce."""
    if groups.world_size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=groups.dp_group)
    flat /= groups.world_size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


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
    out = (_deepspeed_step if run.engine is not None else _torch_step)(run, step, micro)
    for layer in run.moe_layers:
        layer.update_expert_bias()
    return out


def forward_backward(moe_layers: list[MoELayer], micro: list[tuple[Tensor, Tensor]],
                     forward: Callable[[Tensor, Tensor], Tensor], backward: Callable[[Tensor], None],
                     ) -> tuple[Tensor, list[int], dict[str, float]]:
    """Run ``backward(forward(inputs, targets))`` on every micro-batch ``[batch, seq]``, with the aux-loss
    gradients scaled like the main loss (``1 / len(micro)``); return the mean loss, the expert rows per
    layer summed over micro-batches and the aux losses averaged over layers and micro-batches."""
    losses, rows, aux = [], [0] * len(moe_layers), {}
    AuxLossAutoScaler.loss_scale = 1.0 / len(micro)
    try:
        for inputs, targets in micro:
            loss = forward(inputs, targets)
            backward(loss)
            losses.append(loss.detach().float())
            for j, layer in enumerate(moe_layers):
                rows[j] += layer.last_expert_rows
                for name, value in layer.last_aux_losses.items():
                    aux[name] = aux.get(name, 0.0) + value / (len(moe_layers) * len(micro))
    finally:
        AuxLossAutoScaler.loss_scale = 1.0
    return torch.stack(losses).mean(), rows, aux


def _torch_step(run: _Run, step: int, micro: list[tuple[Tensor, Tensor]]) -> StepOutput:
    """A step with our sync and AdamW: micro-batch gradients accumulate, then sync, clip and step."""
    cfg, groups = run.config.train, run.groups

    def forward(inputs: Tensor, targets: Tensor) -> Tensor:
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            return run.model(inputs, targets)[0]

    def backward(loss: Tensor) -> None:
        (loss / len(micro)).backward()

    loss, rows, aux = forward_backward(run.moe_layers, micro, forward, backward)
    for p in run.dense_params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    sync_stats = run.grad_sync()
    _all_reduce_mean([p.grad for p in run.dense_params], groups)
    grad_norm = float("nan")
    if cfg.grad_clip > 0:
        grad_norm = float(clip_grad_norm_(run.dense_params, run.moe_layers, groups, cfg.grad_clip))
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=False)
    return StepOutput(loss, rows, aux, grad_norm, sync_stats.bytes_sent)


def _deepspeed_step(run: _Run, step: int, micro: list[tuple[Tensor, Tensor]]) -> StepOutput:
    """The same step through the DeepSpeed engine (its reductions, ZeRO, bf16 and accumulation
    boundary; our replica hooks and norm). ``engine.backward`` divides by the accumulation steps."""
    engine = run.engine
    for group in engine.optimizer.param_groups:
        group["lr"] = lr_at(step, run.config.train)

    def backward(loss: Tensor) -> None:
        engine.backward(loss)
        engine.step()  # applies the update at the accumulation boundary only

    loss, rows, aux = forward_backward(run.moe_layers, micro, lambda i, t: engine(i, t)[0], backward)
    norm = engine.get_global_grad_norm()
    grad_norm = float(norm) if norm is not None and run.config.train.grad_clip > 0 else float("nan")
    return StepOutput(loss, rows, aux, grad_norm, ds_glue.replica_grad_hooks(engine).take_bytes_sent())


def _step_loads(run: _Run) -> Tensor:
    """``[L, E]`` this rank's routed pairs of the step (the rebalancer drains the layers itself)."""
    if run.rebalancer is not None:
        return run.rebalancer.load_window[(run.rebalancer.step_count - 1) % run.rebalancer.config.window]
    return torch.stack([layer.take_load().cpu() for layer in run.moe_layers])


def _reduce_step(run: _Run, out: StepOutput, stop: bool) -> tuple[float, Tensor, Tensor, bool]:
    """One all-reduce per step: mean loss, global load [L, E], rows per rank [world, L], stop flag."""
    groups, num_layers = run.groups, len(run.moe_layers)
    load = _step_loads(run).to(torch.float64) if num_layers else torch.zeros(0, 0, dtype=torch.float64)
    rows = torch.zeros(groups.world_size, num_layers, dtype=torch.float64)
    rows[groups.rank] = torch.tensor(out.expert_rows, dtype=torch.float64)
    packed = torch.cat([out.loss.cpu().double().view(1), torch.tensor([float(stop)], dtype=torch.float64),
                        load.flatten(), rows.flatten()])
    if dist.is_initialized():
        dist.all_reduce(packed, group=groups.dp_group)
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
    total = torch.zeros(2, dtype=torch.float64)
    batches = run.data.val_batches(cfg.micro_batch_size, groups.rank, groups.world_size)
    for _, (inputs, targets) in zip(range(cfg.eval_batches), batches):
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss, _ = run.model(inputs.to(run.device), targets.to(run.device))
        total += torch.tensor([float(loss) * targets.numel(), targets.numel()], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(total, group=groups.dp_group)
    run.model.train()
    return float(total[0] / total[1])


class _Logger:
    """``metrics.jsonl`` and ``expert_load.bin`` (rank 0), TensorBoard when installed, and a tqdm progress
    bar."""

    def __init__(self, run: _Run, start_step: int) -> None:
        self.enabled = run.groups.rank == 0
        self.file = (run.run_dir / METRICS_FILE).open("a") if self.enabled else None
        self.expert_load = None
        if self.enabled and run.moe_layers:
            self.expert_load = ExpertLoadLog(run.run_dir, len(run.moe_layers), run.moe_cfg.num_experts)
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
    return save_checkpoint(run.run_dir / "checkpoints", step, run.model, run.optimizer, run.groups,
                           moe_config=run.moe_cfg, rebalancer=run.rebalancer)


def _resume(run: _Run) -> int:
    """Load the newest complete checkpoint of the run directory, if any; return its step."""
    if latest_checkpoint(run.run_dir / "checkpoints") is None:
        return 0
    state = load_checkpoint(run.run_dir / "checkpoints", run.model, run.optimizer, run.groups,
                            moe_config=run.moe_cfg, rebalancer=run.rebalancer)
    return int(state["step"])


def _write_run_info(run: _Run, config_path: str) -> None:
    info = {
        "config": str(config_path),
        "world_size": run.groups.world_size,
        "expert_parallel_size": run.groups.ep_size,
        "sharding_strategy": run.moe_cfg.sharding_strategy,
        "corpus": run.config.data.source,
        **_bigram_info(run.data),
        "num_moe_layers": len(run.moe_layers),
        "num_experts": run.moe_cfg.num_experts,
        "num_slots": run.moe_layers[0].placement.num_slots if run.moe_layers else 0,
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
            metrics = run.rebalancer.step() if run.rebalancer is not None else None
            mean_loss, load, rows, stop_now = _reduce_step(run, out, stop.requested)
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
    if dist.is_initialized():
        dist.barrier()
    return summary

