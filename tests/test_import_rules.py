"""DESIGN.md's "Never" list, checked by reading every module's imports (ast; nothing is imported).

    Model → Engine/Processing/Face; Geometry → anything but the standard library; Load → Model;
    Train → Engine; Engine → Face; anything in llavakit → transformers; torch from errors, config,
    anyres or `import llavakit` itself.

Rooms: Model = llavakit/model/, Engine = llavakit/engine/, Processing = llavakit/processing/,
Face = llavakit/__init__.py, api.py, cli.py (the public surface), Geometry = anyres.py,
Load = weights.py (reading tensors and configs; original.py and convert.py assemble whole checkpoints
from model and processor parts, so they are not Load), Train = llavakit/train/.

Every import counts, at module level or inside a function: a lazy import is still a dependency.
Only `if TYPE_CHECKING:` blocks are skipped (they never run). A rule "A → B" fails when a module of A
imports B directly or through any chain of llavakit modules (Train → Engine through llavakit.load is
how the rule was first broken). Train → Face is checked on its own: the Face imports the engine
lazily (`llavakit.load` → api → engine), so a chain of import statements would not show it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llavakit"

FACE = {"llavakit", "llavakit.api", "llavakit.cli"}


def room(module: str) -> str:
    """The room of a llavakit module name (a module outside the named rooms is its own room)."""
    if module in FACE:
        return "Face"
    for prefix, name in (("llavakit.model", "Model"), ("llavakit.engine", "Engine"),
                         ("llavakit.processing", "Processing"), ("llavakit.train", "Train")):
        if module == prefix or module.startswith(prefix + "."):
            return name
    return {"llavakit.anyres": "Geometry", "llavakit.weights": "Load"}.get(module, module)


# (from room, to room) pairs that must never be connected by imports.
NEVER = [
    ("Model", "Engine"), ("Model", "Processing"), ("Model", "Face"),
    ("Load", "Model"),
    ("Train", "Engine"),
    ("Engine", "Face"),
]
# Checked on direct imports only (see the module docstring).
NEVER_DIRECT = [("Train", "Face")]
# torch is never imported at module level by these (and `import llavakit` loads no torch).
TORCH_FREE = ["llavakit", "llavakit.errors", "llavakit.config", "llavakit.anyres"]


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository root
    line: int
    target: str  # the module imported, absolute (a llavakit module, or a third-party/stdlib name)
    lazy: bool  # inside a function body


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


FILES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(module: str) -> bool:
    return FILES.get(module) is not None and FILES[module].name == "__init__.py"


def _resolve(module: str, level: int, name: str | None) -> str:
    """The absolute name of `from <level dots><name> import ...` written in `module`."""
    if level == 0:
        return name or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str) -> list[Import]:
    path = FILES[module]
    rel = str(path.relative_to(ROOT))
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    visit_stmt(sub, lazy)
                continue
            visit_stmt(child, lazy)

    def visit_stmt(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(rel, node.lineno, alias.name, lazy) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from pkg import name`: a submodule when there is such a file, else a name of pkg.
                found.append(Import(rel, node.lineno, sub if sub in FILES else base, lazy))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            visit(node, True)
        elif not isinstance(node, (ast.Import, ast.ImportFrom)):
            visit(node, lazy)

    visit(ast.parse(path.read_text(encoding="utf-8"), rel), False)
    return found


IMPORTS = {m: imports_of(m) for m in FILES}


def _internal(target: str) -> str | None:
    """The llavakit module an import names (an imported attribute of a module counts as the module)."""
    while target and target not in FILES:
        if "." not in target:
            return None
        target = target.rsplit(".", 1)[0]
    return target or None


def _chain(start: str, bad: str) -> list[str] | None:
    """The shortest import chain from `start` to a module of room `bad`, or None."""
    seen, queue = {start: [start]}, [start]
    while queue:
        current = queue.pop(0)
        for imp in IMPORTS[current]:
            target = _internal(imp.target)
            if target is None or target in seen:
                continue
            seen[target] = seen[current] + [target]
            if room(target) == bad:
                return seen[target]
            queue.append(target)
    return None


def _violations_of(source: str, target: str, transitive: bool) -> list[str]:
    out = []
    for module, imports in IMPORTS.items():
        if room(module) != source:
            continue
        for imp in imports:
            first = _internal(imp.target)
            if first is None:
                continue
            if room(first) == target:
                out.append(f"{imp.file}:{imp.line}: {source} → {target} (imports {first}"
                           f"{', inside a function' if imp.lazy else ''})")
            elif transitive and room(first) != source:
                chain = _chain(first, target)
                if chain:
                    out.append(f"{imp.file}:{imp.line}: {source} → {target} (imports {first}, which reaches "
                               f"{chain[-1]} through {' → '.join(chain)})")
    return sorted(set(out))


@pytest.mark.parametrize("source,target", NEVER, ids=[f"{a}-{b}" for a, b in NEVER])
def test_never(source, target):
    found = _violations_of(source, target, transitive=True)
    assert not found, "DESIGN.md 'Never' broken:\n" + "\n".join(found)


@pytest.mark.parametrize("source,target", NEVER_DIRECT, ids=[f"{a}-{b}" for a, b in NEVER_DIRECT])
def test_never_direct(source, target):
    found = _violations_of(source, target, transitive=False)
    assert not found, "DESIGN.md 'Never' broken:\n" + "\n".join(found)


def test_geometry_imports_only_the_standard_library():
    bad = [f"{i.file}:{i.line}: Geometry → anything but the standard library (imports {i.target})"
           for i in IMPORTS["llavakit.anyres"]
           if i.target.split(".")[0] not in sys.stdlib_module_names and i.target != "__future__"]
    assert not bad, "DESIGN.md 'Never' broken:\n" + "\n".join(bad)


def test_nothing_imports_transformers():
    bad = [f"{i.file}:{i.line}: llavakit → transformers (imports {i.target}; transformers is test-only)"
           for imports in IMPORTS.values() for i in imports if i.target.split(".")[0] == "transformers"]
    assert not bad, "DESIGN.md 'Never' broken:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", TORCH_FREE)
def test_torch_free_at_module_level(module):
    bad = [f"{i.file}:{i.line}: torch from {module} (imports {i.target} at module level)"
           for i in IMPORTS[module] if not i.lazy and i.target.split(".")[0] == "torch"]
    # and not through another llavakit module imported at module level
    for i in IMPORTS[module]:
        first = _internal(i.target)
        if i.lazy or first is None or first == module:
            continue
        for imp in _module_level_closure(first):
            if imp.target.split(".")[0] == "torch":
                bad.append(f"{i.file}:{i.line}: torch from {module} (imports {first}, whose {imp.file}:{imp.line} "
                           f"imports {imp.target} at module level)")
    assert not bad, "DESIGN.md 'Never' broken:\n" + "\n".join(sorted(set(bad)))


def _module_level_closure(start: str) -> list[Import]:
    seen, queue, out = {start}, [start], []
    while queue:
        for imp in IMPORTS[queue.pop(0)]:
            if imp.lazy:
                continue
            out.append(imp)
            target = _internal(imp.target)
            if target is not None and target not in seen:
                seen.add(target)
                queue.append(target)
    return out


def test_import_llavakit_loads_no_torch():
    code = "import sys, llavakit; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"llavakit/__init__.py: torch from `import llavakit`: loaded {out.stdout.strip()}"


def test_the_checker_sees_imports():
    """The rules above pass vacuously if the reader finds nothing: check it on known imports."""
    targets = {i.target for i in IMPORTS["llavakit.api"]}
    assert "llavakit.engine.core" in targets and "torch" in targets
    lazy = {i.target for i in IMPORTS["llavakit.api"] if i.lazy}
    assert "llavakit.anyres" in lazy  # `from . import anyres` inside a method
    assert room("llavakit.train.loop") == "Train" and room("llavakit") == "Face"
