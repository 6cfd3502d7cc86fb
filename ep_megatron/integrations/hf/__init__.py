"""Hugging Face ``transformers`` MoE models with expert parallelism and rebalancing, and back to HF.

- :func:`swap_moe_blocks` replaces a Mixtral / Qwen3-MoE / Qwen2-MoE / DeepSeek-V3 model's MoE blocks in
  place by our :class:`~ep_megatron.layer.MoELayer` (weights and routing semantics exact); the model then
  trains under ``ep_megatron.integrations.deepspeed.initialize`` with a ``Rebalancer``;
- :func:`export_hf` writes our checkpoint of a swapped model in the family's HF layout (``from_pretrained``)
  (``ep_megatron.trainer.hf_export`` does the same for the trainer's ``MoEGPT`` as Mixtral where it maps);
- :func:`import_hf` turns an HF directory into our layout-free checkpoint.

Needs ``transformers >= 5`` (``pip install ep_megatron[hf]``); nothing in the core imports this package.
See ``docs/huggingface.md``.
"""

from ep_megatron.integrations.hf.convert import (
    export_hf,
    import_hf,
    read_hf_tensors,
    write_hf_dir,
)
from ep_megatron.integrations.hf.families import (
    FAMILIES,
    HF_DEFINED_FIELDS,
    Family,
    family_of,
    moe_config_from_hf,
)
from ep_megatron.integrations.hf.swap import HFMoEBlock, HFSwap, swap_moe_blocks

__all__ = [
    "FAMILIES", "HF_DEFINED_FIELDS", "Family", "HFMoEBlock", "HFSwap", "export_hf", "family_of", "import_hf",
    "moe_config_from_hf", "read_hf_tensors", "swap_moe_blocks", "write_hf_dir",
]
