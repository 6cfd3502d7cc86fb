"""The import order of docs/architecture.md, enforced: a module imports only modules above it.

Every ``import`` of an ``ep_megatron`` module, at module level or inside a function, must name a module
listed earlier in ``ORDER`` (imports under ``if TYPE_CHECKING:`` are annotations only and exempt). So
there is no cycle, the core never imports an integration, and a new module must be given its place.
Framework packages (DeepSpeed, Megatron-Core, transformers) are never imported by the core (the modules
below the integrations).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ep_megatron"

# Lowest first. A package's __init__ follows the modules it re-exports.
ORDER = [
    "ep_megatron.version",
    # placement + planner
    "ep_megatron.placement.placement",
    "ep_megatron.placement.eplb",
    "ep_megatron.placement",
    "ep_megatron.config",
    "ep_megatron.mixed_precision",
    # communication + gradient sync
    "ep_megatron.parallel.groups",
    "ep_megatron.parallel",
    "ep_megatron.parallel.comm",
    "ep_megatron.parallel.grad_sync",
    # the layer, and the owner of a model's MoE layers
    "ep_megatron.layer.router",
    "ep_megatron.layer.experts",
    "ep_megatron.layer.dispatcher",
    "ep_megatron.layer.moe_layer",
    "ep_megatron.layer",
    "ep_megatron.layer.moe_layers",
    # services
    "ep_megatron.services",
    "ep_megatron.services.migration",
    "ep_megatron.services.rebalance",
    "ep_megatron.services.checkpoint.files",
    "ep_megatron.services.checkpoint.layout",
    "ep_megatron.services.checkpoint.optimizer",
    "ep_megatron.services.checkpoint.core",
    "ep_megatron.services.checkpoint.convert",
    "ep_megatron.services.checkpoint",
    # integrations
    "ep_megatron.integrations",
    "ep_megatron.integrations.megatron.config",
    "ep_megatron.integrations.megatron.layer",
    "ep_megatron.integrations.megatron.grads",
    "ep_megatron.integrations.megatron.optimizer",
    "ep_megatron.integrations.megatron.training",
    "ep_megatron.integrations.megatron",
    "ep_megatron.integrations.deepspeed",
    "ep_megatron.integrations.hf.families",
    "ep_megatron.integrations.hf.swap",
    "ep_megatron.integrations.hf.convert",
    "ep_megatron.integrations.hf",
    # the trainer
    "ep_megatron.trainer",
    "ep_megatron.trainer.shipped",
    "ep_megatron.trainer.model",
    "ep_megatron.trainer.data",
    "ep_megatron.trainer.metrics_io",
    "ep_megatron.trainer.step",
    "ep_megatron.trainer.report",
    "ep_megatron.trainer.config",
    "ep_megatron.trainer.memory",
    "ep_megatron.trainer.loop",
    "ep_megatron.trainer.hf_export",
    "ep_megatron.trainer.ckpt_cli",
    "ep_megatron.trainer.cli",
    "ep_megatron.__main__",
    "ep_megatron",
]
FRAMEWORKS = ("deepspeed", "megatron", "transformers")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.If):
            continue
        if getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(path: Path, known: set[str]) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``path`` outside ``TYPE_CHECKING`` blocks."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and node.lineno not in skip:
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.lineno not in skip and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((node.lineno, sub if sub in known else node.module))
    return found


def test_every_module_has_a_place_and_imports_only_modules_above_it() -> None:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    assert sorted(set(modules) - set(ORDER)) == [], "give each new module its place in ORDER (and the docs)"
    assert sorted(set(ORDER) - set(modules)) == [], "ORDER names modules that no longer exist"
    rank = {name: i for i, name in enumerate(ORDER)}
    violations = []
    for name, path in modules.items():
        for line, imported in _imports(path, set(modules)):
            top = imported.split(".")[0]
            if top == "ep_megatron":
                target = imported
                while target not in rank:
                    target = target.rpartition(".")[0]
                if rank[target] >= rank[name]:
                    violations.append(f"{name}:{line} imports {imported}, which is not above it")
            elif top in FRAMEWORKS and rank[name] < rank["ep_megatron.integrations"]:
                violations.append(f"{name}:{line} imports the framework {imported}; the core may not")
    assert violations == []


def test_the_order_test_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: an upward import in a module body is reported."""
    probe = tmp_path / "probe.py"
    probe.write_text("from ep_megatron.trainer.loop import train\n"
                     "from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from ep_megatron.integrations import deepspeed\n")
    imported = [module for _, module in _imports(probe, set(ORDER))]
    assert imported == ["ep_megatron.trainer.loop", "typing"]
