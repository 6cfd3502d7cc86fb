"""Our layout-free checkpoints <-> Hugging Face model directories (single process, no collectives).

- :func:`export_hf`: a checkpoint of a swapped model (``integrations.hf.swap``) -> the family's HF layout:
  per-expert tensors by logical id (``...experts.{e}.w1.weight`` for Mixtral, ``gate_proj/up_proj/down_proj``
  otherwise, the names ``save_pretrained`` of transformers 5.x writes and the hub holds), safetensors shards
  + ``model.safetensors.index.json`` + ``config.json``, loadable with ``from_pretrained(out_dir)``.
- (``ep_megatron.trainer.hf_export`` writes the trainer's ``MoEGPT`` as Mixtral with these helpers.)
- :func:`import_hf`: an HF directory (safetensors; per-expert or fused ``gate_up_proj`` experts) -> our
  checkpoint with the swapped model's names, which ``load_checkpoint`` reads into a swapped model under any
  EP size and strategy. The HF ``config.json`` is not part of our checkpoint: pass ``hf_config`` to
  :func:`export_hf` for an imported checkpoint.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ep_megatron.config import MoEConfig
from ep_megatron.integrations.hf.families import Family, family_of, moe_config_from_hf
from ep_megatron.integrations.hf.swap import EXTRA_KEY, MOE_CHILD
from ep_megatron.services import checkpoint as ckpt
from ep_megatron.services.checkpoint.layout import EXPERT_PARAM_NAMES

DEFAULT_SHARD_BYTES = 5 * 2**30  # save_pretrained's default max_shard_size ("5GB")
INDEX_FILE = "model.safetensors.index.json"
_FC1, _FC2 = (f"experts.{name}" for name in EXPERT_PARAM_NAMES.values())  # our stacked [E, ...] experts


# ---- writing an HF directory ---------------------------------------------------------------------------
def write_hf_dir(tensors: dict[str, torch.Tensor], hf_config: dict[str, Any], out_dir: str | Path, *,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write ``tensors`` (HF names) as safetensors shards, their index and ``config.json`` into a new dir."""
    from safetensors.torch import save_file

    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=False)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensors[key].detach().to("cpu").contiguous().clone()
        shard_bytes += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    config = {**hf_config, **({"dtype": dtypes.pop()} if len(dtypes) == 1 else {})}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def moe_block_tensors(family: Family, disk_prefix: str, ours: dict[str, torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
    """One MoE block: our tensors (keys relative to the MoELayer) -> HF names under ``disk_prefix``."""
    fc1, fc2 = ours.pop(_FC1), ours.pop(_FC2)  # [E, 2F, H], [E, H, F]
    ffn = fc2.shape[2]
    gate_name, up_name, down_name = family.expert_names
    out = {f"{disk_prefix}.gate.weight": ours.pop("router.weight")}
    for e in range(fc1.shape[0]):
        base = f"{disk_prefix}.experts.{e}"
        out[f"{base}.{gate_name}.weight"] = fc1[e, :ffn]
        out[f"{base}.{up_name}.weight"] = fc1[e, ffn:]
        out[f"{base}.{down_name}.weight"] = fc2[e]
    bias = ours.pop("router.expert_bias")
    if family.expert_bias_name is not None:
        out[f"{disk_prefix}.gate.{family.expert_bias_name}"] = bias
    elif bool(bias.any()):
        raise ValueError(f"{disk_prefix}: a non-zero expert_bias has no place in the {family.model_type} "
                         f"layout")
    if "shared_experts.fc1_weight" in ours:
        if family.shared_name is None:
            raise ValueError(f"{disk_prefix}: a shared expert has no place in the {family.model_type} layout")
        shared_fc1, shared_fc2 = ours.pop("shared_experts.fc1_weight"), ours.pop("shared_experts.fc2_weight")
        half = shared_fc1.shape[0] // 2
        base = f"{disk_prefix}.{family.shared_name}"
        out.update({f"{base}.gate_proj.weight": shared_fc1[:half],
                    f"{base}.up_proj.weight": shared_fc1[half:], f"{base}.down_proj.weight": shared_fc2})
        if "shared_experts.gate_weight" in ours:
            out[f"{disk_prefix}.{family.shared_gate_name}.weight"] = ours.pop("shared_experts.gate_weight")
    if ours:
        raise ValueError(f"{disk_prefix}: tensors {sorted(ours)} have no place in the {family.model_type} "
                         f"layout")
    return out


def split_moe(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Pop the tensors under ``prefix.`` and return them keyed relative to it."""
    keys = [k for k in tensors if k.startswith(prefix + ".")]
    return {k[len(prefix) + 1:]: tensors.pop(k) for k in keys}


def drop_tied_head(tensors: dict[str, torch.Tensor], embed_key: str, head_key: str, tied: bool) -> None:
    if tied and head_key in tensors:
        if not torch.equal(tensors[head_key], tensors[embed_key]):
            raise ValueError(f"tie_word_embeddings is set but {head_key} differs from {embed_key}")
        del tensors[head_key]


# ---- export: swapped HF model --------------------------------------------------------------------------
def _hf_config_arg(hf_config: dict[str, Any] | str | Path | None, manifest: dict[str, Any]) -> dict[str, Any]:
    if isinstance(hf_config, dict):
        return hf_config
    if hf_config is not None:
        path = Path(hf_config)
        return json.loads((path / "config.json" if path.is_dir() else path).read_text())
    saved = (manifest.get("extra") or {}).get(EXTRA_KEY)
    if saved is None:
        raise ValueError("the checkpoint records no Hugging Face config (save it with "
                         "extra=swap.checkpoint_extra()); pass hf_config (the model's config.json)")
    return saved


def export_hf(checkpoint: str | Path, out_dir: str | Path, *,
              hf_config: dict[str, Any] | str | Path | None = None, dtype: torch.dtype | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write our checkpoint of a swapped HF model as the family's HF directory; returns ``out_dir``.

    ``hf_config``: the HF config (dict, ``config.json`` or its directory); default: the one the checkpoint
    recorded (``save_checkpoint(..., extra=swap.checkpoint_extra())``). ``dtype`` casts every tensor.
    """
    path = ckpt.resolve_checkpoint(checkpoint)
    manifest = ckpt.read_manifest(path)
    config = _hf_config_arg(hf_config, manifest)
    family = family_of(config)
    tensors = ckpt.read_tensors(path)
    out: dict[str, torch.Tensor] = {}
    for entry in manifest["moe_layers"]:
        block_path, _, child = entry["prefix"].rpartition(".")
        if child != MOE_CHILD:
            raise ValueError(f"MoE layer {entry['prefix']!r} is not a swapped HF block "
                             f"('<block>.{MOE_CHILD}')")
        ours = split_moe(tensors, entry["prefix"])
        out.update(moe_block_tensors(family, family.disk_prefix(block_path), ours))
    out.update(tensors)  # dense tensors keep their HF module names
    tied = bool(config.get("tie_word_embeddings"))
    drop_tied_head(out, "model.embed_tokens.weight", "lm_head.weight", tied)
    if dtype is not None:
        out = {k: t.to(dtype) for k, t in out.items()}
    return write_hf_dir(out, config, out_dir, max_shard_bytes=max_shard_bytes)


# ---- import --------------------------------------------------------------------------------------------
def read_hf_tensors(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory's safetensors files (sharded with an index, or one file)."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    index = hf_dir / INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{hf_dir}: no {INDEX_FILE} or model.safetensors (only safetensors is read)")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(hf_dir / name)))
    return tensors


def _stack_experts(family: Family, disk_prefix: str, tensors: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fc1 [E, 2F, H], fc2 [E, H, F])`` of a block from per-expert or fused (transformers 5) tensors."""
    fused = f"{disk_prefix}.experts.gate_up_proj"
    if fused in tensors:
        return tensors.pop(fused), tensors.pop(f"{disk_prefix}.experts.down_proj")
    gate_name, up_name, down_name = family.expert_names
    pattern = re.compile(re.escape(f"{disk_prefix}.experts.") + r"(\d+)\.")
    num_experts = 1 + max((int(m.group(1)) for k in tensors if (m := pattern.match(k))), default=-1)
    if num_experts == 0:
        raise ValueError(f"{disk_prefix}: no expert tensors")
    fc1, fc2 = [], []
    for e in range(num_experts):
        base = f"{disk_prefix}.experts.{e}"
        gate, up = tensors.pop(f"{base}.{gate_name}.weight"), tensors.pop(f"{base}.{up_name}.weight")
        fc1.append(torch.cat([gate, up]))
        fc2.append(tensors.pop(f"{base}.{down_name}.weight"))
    return torch.stack(fc1), torch.stack(fc2)


def _import_block(family: Family, disk_prefix: str, tensors: dict[str, torch.Tensor],
                  config: MoEConfig) -> dict[str, torch.Tensor]:
    """One HF MoE block -> our tensors under ``<module path>.moe``."""
    prefix = f"{family.module_path(disk_prefix)}.{MOE_CHILD}"
    fc1, fc2 = _stack_experts(family, disk_prefix, tensors)
    router = tensors.pop(f"{disk_prefix}.gate.weight")
    bias = torch.zeros(router.shape[0], dtype=torch.float32)
    if family.expert_bias_name is not None:
        bias = tensors.pop(f"{disk_prefix}.gate.{family.expert_bias_name}").to(torch.float32)
    out = {f"{prefix}.router.weight": router, f"{prefix}.router.expert_bias": bias,
           f"{prefix}.{_FC1}": fc1, f"{prefix}.{_FC2}": fc2}
    if config.shared_expert_ffn_size:
        base = f"{disk_prefix}.{family.shared_name}"
        out[f"{prefix}.shared_experts.fc1_weight"] = torch.cat([tensors.pop(f"{base}.gate_proj.weight"),
                                                                tensors.pop(f"{base}.up_proj.weight")])
        out[f"{prefix}.shared_experts.fc2_weight"] = tensors.pop(f"{base}.down_proj.weight")
        if config.shared_expert_gate:
            gate_key = f"{disk_prefix}.{family.shared_gate_name}.weight"
            out[f"{prefix}.shared_experts.gate_weight"] = tensors.pop(gate_key)
    leftover = sorted(k for k in tensors if k.startswith(disk_prefix + "."))
    if leftover:
        raise ValueError(f"{disk_prefix}: tensors {leftover[:6]} are not mapped")
    return out


def import_hf(hf_dir: str | Path, out_root: str | Path, *, step: int = 0, **ep_options: Any) -> Path:
    """Write an HF directory (``config.json`` + safetensors) as our checkpoint ``out_root/step_{step}``.

    Names are those of the swapped model, so ``load_checkpoint(path, swapped_model, None, groups,
    moe_config=swap.config)`` loads it under any layout. ``ep_options`` are recorded in the checkpoint's
    MoE config (see :func:`moe_config_from_hf`). Needs ``transformers`` (``AutoConfig``, local files only).
    """
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
    family = family_of(hf_config)
    config = moe_config_from_hf(hf_config, **ep_options)
    tensors = read_hf_tensors(hf_dir)
    names = "|".join(re.escape(n) for n in {family.disk_block, family.block_attr})  # hub or module names
    block_key = re.compile(rf"(.+\.(?:{names}))\.gate\.weight")
    disk_prefixes = sorted((m.group(1) for k in tensors if (m := block_key.fullmatch(k))),
                           key=lambda p: [int(s) if s.isdigit() else s for s in p.split(".")])
    if not disk_prefixes:
        raise ValueError(f"{hf_dir}: no {family.model_type} MoE block ('*.{family.disk_block}.gate.weight')")
    out: dict[str, torch.Tensor] = {}
    for disk_prefix in disk_prefixes:
        out.update(_import_block(family, disk_prefix, tensors, config))
    out.update(tensors)
    if hf_config.tie_word_embeddings and "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]  # the swapped model's state_dict has both
    prefixes = [f"{family.module_path(p)}.{MOE_CHILD}" for p in disk_prefixes]
    config_json = json.loads(json.dumps(asdict(config)))
    return ckpt.save_tensors_checkpoint(out_root, step, out, config=config_json, moe_prefixes=prefixes)
