"""Layout-free checkpoints: experts stored by logical id, in Megatron-Core's ``torch_dist`` layout.

- :mod:`.layout`: which rows a rank writes and reads, under Megatron names (the logical-expert layout);
- :mod:`.files`: atomic publication, manifest, ``latest``, integrity checks, safe reading;
- :mod:`.optimizer`: optimizer state stored like the parameters;
- :mod:`.core`: :func:`save_checkpoint` / :func:`load_checkpoint` (collective, all-or-nothing load);
- :mod:`.convert`: full tensors in and out (consolidated files, DeepSpeed MoE expert files).
"""

from ep_megatron.services.checkpoint.convert import (
    export_consolidated,
    export_deepspeed,
    import_deepspeed,
    read_tensors,
    save_tensors_checkpoint,
)
from ep_megatron.services.checkpoint.core import load_checkpoint, save_checkpoint
from ep_megatron.services.checkpoint.files import (
    MANIFEST_FILE,
    latest_checkpoint,
    read_manifest,
    read_tensor_file,
    remove_stale_temporaries,
    resolve_checkpoint,
    verify_files,
)
from ep_megatron.services.checkpoint.optimizer import OptimizerLike

__all__ = [
    "MANIFEST_FILE",
    "OptimizerLike",
    "export_consolidated",
    "export_deepspeed",
    "import_deepspeed",
    "latest_checkpoint",
    "load_checkpoint",
    "read_manifest",
    "read_tensor_file",
    "read_tensors",
    "remove_stale_temporaries",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_tensors_checkpoint",
    "verify_files",
]
