"""Checkpoint files: atomic publication, manifests with sizes and CRC32, ``latest``, safe reading.

A checkpoint directory ``root/step_{N:08d}`` becomes visible only complete: files are written to
``root/.tmp-step_*``, the manifest (format version, step, config, placement, tensor table, size and CRC32
of every file) is written last, the directory is renamed and only then does ``root/latest`` (replaced
atomically) name it. A checkpoint is untrusted input: tensor files are read with
``torch.load(weights_only=True)`` and metadata is plain JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from ep_megatron.parallel.comm import broadcast_object

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
MEGATRON_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
_CHUNK_BYTES = 1 << 22
_TMP_PREFIX = ".tmp-"


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))
    fsync_file(path)


def write_torch(path: Path, obj: Any) -> None:
    torch.save(obj, path)
    fsync_file(path)


def read_tensor_file(path: Path) -> Any:
    """``torch.load(weights_only=True)`` on CPU; any failure is a RuntimeError naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an untrusted/corrupt file
        raise RuntimeError(f"{path}: not a loadable tensor file ({exc})") from exc


def file_crc32(path: Path) -> int:
    """CRC32 of a file's bytes, read in 4 MiB chunks."""
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_entries(directory: Path, names: list[str]) -> dict[str, dict[str, int]]:
    return {name: {"bytes": (directory / name).stat().st_size, "crc32": file_crc32(directory / name)}
            for name in names}


def checkpoint_dirname(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint ``root/latest`` names, or None when there is none (or it is incomplete)."""
    latest = Path(root) / LATEST_FILE
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    if not name or "/" in name or name.startswith("."):
        raise RuntimeError(f"{latest}: malformed content {name!r}")
    path = Path(root) / name
    return path if (path / MANIFEST_FILE).is_file() else None


def resolve_checkpoint(path_or_root: str | Path) -> Path:
    """A checkpoint directory itself, or the one ``latest`` names in a root directory."""
    path = Path(path_or_root)
    if (path / MANIFEST_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path}: neither a complete checkpoint (no {MANIFEST_FILE}) nor a root "
                                f"whose '{LATEST_FILE}' names one")
    return latest


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint directory."""
    manifest_path = Path(path) / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{manifest_path}: unreadable manifest ({exc})") from exc
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise RuntimeError(f"{manifest_path}: format_version={version}, this code reads {FORMAT_VERSION}")
    return manifest


def verify_files(path: str | Path, manifest: dict[str, Any], names: list[str] | None = None) -> list[str]:
    """Problems (missing, truncated, corrupted files) among ``names`` (default: all); empty when intact."""
    path = Path(path)
    problems = []
    for name in names if names is not None else sorted(manifest["files"]):
        expected = manifest["files"][name]
        file = path / name
        if not file.is_file():
            problems.append(f"{name}: missing")
        elif file.stat().st_size != expected["bytes"]:
            problems.append(f"{name}: {file.stat().st_size} bytes, manifest says {expected['bytes']}")
        elif file_crc32(file) != expected["crc32"]:
            problems.append(f"{name}: CRC32 mismatch (corrupted)")
    return problems


def make_tmp_dir(root: Path, step: int) -> Path:
    """Rank 0 creates ``root/.tmp-step_{N}-*``; every rank gets its path (collective)."""
    name = None
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        name = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{checkpoint_dirname(step)}-", dir=root)).name
    return root / broadcast_object(name)


def publish(tmp: Path, final: Path, manifest: dict[str, Any], files: dict[str, dict[str, int]]) -> None:
    """Write the manifest last, rename ``tmp`` to ``final``, then point ``latest`` at it."""
    manifest = {**manifest, "tensors": tensor_table(tmp), "files": files}
    write_json(tmp / MANIFEST_FILE, manifest)
    fsync_dir(tmp)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    point_latest(final.parent, final.name)


def tensor_table(path: Path) -> dict[str, dict[str, Any]]:
    """``{key: {shape, dtype}}`` of every tensor in a DCP checkpoint's metadata."""
    meta = dcp.FileSystemReader(path).read_metadata()
    return {key: {"shape": list(m.size), "dtype": str(m.properties.dtype).removeprefix("torch.")}
            for key, m in sorted(meta.state_dict_metadata.items()) if hasattr(m, "size")}


def point_latest(root: Path, name: str) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=".latest-", dir=root)
    with os.fdopen(fd, "w") as handle:
        handle.write(name + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp_name, root / LATEST_FILE)
    fsync_dir(root)


def remove_stale_temporaries(root: str | Path) -> list[Path]:
    """Delete ``root/.tmp-*`` directories left by killed saves; call when no save is running."""
    removed = []
    for path in sorted(Path(root).glob(f"{_TMP_PREFIX}step_*")):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
