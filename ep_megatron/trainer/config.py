"""The run config of ``ep-megatron train``: one YAML section per dataclass, overrides, validation.

Every bad key or value raises ``ValueError`` naming it (``section.key``) before any process group exists.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ep_megatron.config import MoEConfig
from ep_megatron.services.rebalance import RebalanceConfig
from ep_megatron.trainer.data import DataConfig
from ep_megatron.trainer.model import GPTConfig
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
    precision: str = "fp32"  # "fp32" or "bf16" (bf16 parameters; fp32 masters and optimizer state)
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
_DERIVED = {"model": {"vocab_size", "max_seq_len"}, "moe": {"hidden_size"}}


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
    _section("moe", lambda: moe_config(config))
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


def moe_config(config: RunConfig) -> MoEConfig:
    hidden = config.model.get("hidden_size", GPTConfig.hidden_size)
    return MoEConfig(**{"seed": config.train.seed, **config.moe, "hidden_size": hidden})


def lr_at(step: int, cfg: TrainerConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``steps`` (``step`` is 0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


