"""What a package's source imports, read from its syntax trees (every import, lazy ones included)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def module_name(path: Path) -> str:
    """services/transfer/base.py -> baton.services.transfer.base (the installed namespace)."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(("baton", *(parts[:-1] if parts[-1] == "__init__" else parts)))


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports; `from a import b` counts as both a and a.b."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def package_imports(folder: str) -> dict[str, set[str]]:
    """module name -> what it imports, for every .py file under `folder` (relative to the repository)."""
    return {module_name(p): imports_of(p) for p in sorted((REPO / folder).rglob("*.py"))}


def baton_imports(folder: str, *outside: str) -> list[str]:
    """"module -> imported" for each import of a baton module under one of the `outside` prefixes."""
    return [f"{module} -> {name}" for module, names in package_imports(folder).items() for name in sorted(names)
            if any(name == p or name.startswith(p + ".") for p in outside)]
