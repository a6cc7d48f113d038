"""The layering rules of docs/architecture.md, checked on the source itself: imports run one
way, no private name crosses a module, no module grows past 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "protege"
RANKS = {
    "errors": 0, "ids": 0, "config": 0, "prices": 0, "jsonsafe": 0, "asgi": 0, "fsutil": 0, "bases": 0,
    "traces": 1,
    "tasks": 2, "runs": 2, "capture": 2,
    "datasets": 3,
    "models": 4,
    "bench": 5,
    "train": 6,
    "decide": 7, "serve": 7, "deploy": 7,
    "ui": 8, "cli": 8, "testing": 8, "__init__": 8, "__main__": 8,
}
MODULES = sorted(p for p in SRC.rglob("*.py") if "migrations" not in p.parts)


def package_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imports(path: Path):
    """(line, imported module as a path under protege, imported names) of every relative import."""
    rel = path.relative_to(SRC).with_suffix("")
    here = list(rel.parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[:len(here) - (node.level - 1)]
            target = base + (node.module.split(".") if node.module else [])
            yield node.lineno, target, [a.name for a in node.names]


def test_every_package_has_a_rank():
    assert {package_of(p) for p in MODULES} <= set(RANKS), "add the new package to RANKS and docs/architecture.md"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_run_one_way(path):
    rank = RANKS[package_of(path)]
    for line, target, names in imports(path):
        top = target[0] if target else names[0]
        if top == package_of(path):
            continue
        assert RANKS[top] <= rank, (f"{path.relative_to(SRC)}:{line} imports {'.'.join(target) or names} "
                                    f"(rank {RANKS[top]}) from rank {rank}: see docs/architecture.md")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_private_name_crosses_a_module(path):
    for line, target, names in imports(path):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{path.relative_to(SRC)}:{line} imports {private} from {'.'.join(target)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_past_500_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= 500, f"{path.relative_to(SRC)} has {n} lines: split it by idea"


def test_models_base_is_the_protocol_alone():
    backends = {"causal", "knn", "openai_api", "replay", "trained", "registry", "student"}
    imported = {t[-1] for _, t, _ in imports(SRC / "models" / "base.py") if t[:1] == ["models"]}
    assert not imported & backends
