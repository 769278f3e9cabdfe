"""The folders' import rules (DESIGN.md, "Folders and what they may import"), read from every module's source: the core
(areal_async, but for its composition root areal_async/run) imports neither actors, learners nor evaluation;
actors and learners never import each other, nor evaluation. Inside the core, the actor system and planning do not
import each other, and nothing but the composition root imports it."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "areal_async": {"actors", "learners", "evaluation"},
    "actors": {"learners", "evaluation"},
    "learners": {"actors", "evaluation"},
}
COMPOSITION_ROOT = ROOT / "areal_async" / "run"
CORE_FOLDERS_FORBIDDEN = {
    "actor_system": {"areal_async.planning", "areal_async.run"},
    "planning": {"areal_async.actor_system", "areal_async.run"},
}


def imported_modules(path: Path) -> set[tuple[str, int]]:
    """The dotted modules a module imports anywhere in it (inside functions too), with the line (`from a.b import
    c` counts a.b.c too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {(alias.name, node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module, node.lineno))
            found |= {(f"{node.module}.{alias.name}", node.lineno) for alias in node.names}
    return found


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """The top-level packages a module imports, with the line."""
    return {(name.split(".")[0], line) for name, line in imported_modules(path)}


def modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if COMPOSITION_ROOT not in p.parents)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_rules(package):
    violations = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                  for path in modules(package) for name, line in imported_packages(path)
                  if name in FORBIDDEN[package]]
    assert not violations, "\n".join(violations)


def test_core_folder_rules():
    violations = []
    for folder, forbidden in CORE_FOLDERS_FORBIDDEN.items():
        paths = sorted((ROOT / "areal_async" / folder).rglob("*.py"))
        assert len(paths) >= 4, folder
        violations += [f"{path.relative_to(ROOT)}:{line} imports {name}"
                       for path in paths for name, line in imported_modules(path)
                       if any(name == f or name.startswith(f + ".") for f in forbidden)]
    violations += [f"{path.relative_to(ROOT)}:{line} imports {name}" for path in modules("areal_async")
                   for name, line in imported_modules(path) if name.split(".")[:2] == ["areal_async", "run"]]
    assert not violations, "\n".join(violations)


def test_the_rules_are_checked_on_real_modules():
    """The walk finds the modules and their imports (a rule over nothing would pass)."""
    assert len(modules("areal_async")) > 20 and len(modules("actors")) >= 5 and len(modules("learners")) >= 3
    trainer = imported_packages(COMPOSITION_ROOT / "trainer.py")
    assert {"actors", "learners", "evaluation"} <= {name for name, _ in trainer}


def test_only_the_documented_environment_variables_are_read():
    """No AREAL_* environment variable changes behaviour except the user-facing ones docs/getting-started.md lists."""
    import re

    pattern = re.compile(r"AREAL_[A-Z0-9_]+")
    documented = set(pattern.findall((ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8")))
    sources = [ROOT / "quickstart.py", *(ROOT / "examples").glob("*.sh")]
    for package in ("areal_async", "actors", "learners", "evaluation", "benchmarks"):
        sources += sorted((ROOT / package).rglob("*.py"))
    used = {(name, path.relative_to(ROOT)) for path in sources
            for name in pattern.findall(path.read_text(encoding="utf-8"))}
    assert {name for name, _ in used} >= {"AREAL_EVAL_DATA"}  # the scan sees the code
    undocumented = sorted(f"{path}: {name}" for name, path in used if name not in documented)
    assert not undocumented, "\n".join(undocumented)
