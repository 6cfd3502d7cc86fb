"""The configs shipped inside the package (``ep_megatron/configs``: YAML run configs and DeepSpeed JSON
files), found by name so that they work after a wheel install, where the repository's ``configs/`` is
absent: ``ep-megatron train tiny_cpu`` and ``--set train.deepspeed_config=ds_zero2``."""

from __future__ import annotations

from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "configs"


def shipped_names(suffix: str) -> list[str]:
    """Names (without ``suffix``) of the shipped files ending in ``suffix``, sorted."""
    return sorted(p.name.removesuffix(suffix) for p in SHIPPED_DIR.glob(f"*{suffix}"))


def resolve_shipped(value: str | Path, suffix: str) -> Path:
    """``value`` if it is an existing file, else the shipped file named ``value`` (``suffix`` optional).

    A bare name (``tiny_cpu``, ``ds_zero2.json``) or a path in a folder named ``configs`` (the
    repository's spelling, ``configs/tiny_cpu.yaml``) may name a shipped file. ``suffix`` is ``".yaml"``
    for run configs, ``".json"`` for DeepSpeed configs. Anything else raises ``FileNotFoundError`` that
    lists the shipped names.
    """
    path = Path(value)
    if path.is_file():
        return path
    shipped = SHIPPED_DIR / (path.name if path.name.endswith(suffix) else path.name + suffix)
    if path.parent.name in ("", "configs") and shipped.is_file():
        return shipped
    raise FileNotFoundError(f"no file {str(value)!r}, and no shipped config of that name "
                            f"(shipped {suffix} configs: {', '.join(shipped_names(suffix))})")
