"""The package layout: a pinned public surface, packages that import each other only through
the names they export, and source comments whose § references resolve in docs/."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import tyr

SRC = Path(tyr.__file__).parent
DOCS = SRC.parents[1] / "docs"
PACKAGES = sorted(p.name for p in SRC.iterdir() if (p / "__init__.py").is_file())


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_public_api_is_pinned() -> None:
    assert sorted(tyr.__all__) == ["Result", "UserError", "__version__", "evaluate", "heal", "load", "prune"]
    for name in tyr.__all__:
        assert hasattr(tyr, name), name


def test_every_package_exports_what_it_lists() -> None:
    for pkg in PACKAGES:
        module = importlib.import_module(f"tyr.{pkg}")
        names = module.__all__
        assert len(names) == len(set(names)), f"tyr.{pkg}.__all__ repeats a name"
        missing = [n for n in names if not hasattr(module, n)]
        assert not missing, f"tyr.{pkg} lists {missing} but does not define them"


def test_packages_import_each_other_only_through_their_exports() -> None:
    exported = {pkg: set(importlib.import_module(f"tyr.{pkg}").__all__) for pkg in PACKAGES}
    bad = []
    for path in _modules():
        rel = path.relative_to(SRC)
        own = rel.parts[0] if len(rel.parts) > 1 else None
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("tyr."):
                continue
            parts = node.module.split(".")  # type: ignore[union-attr]
            pkg = parts[1]
            if pkg not in exported or pkg == own:
                continue
            if len(parts) > 2:
                bad.append(f"{rel}:{node.lineno} imports {node.module} (use tyr.{pkg})")
            for alias in node.names:
                if alias.name not in exported[pkg]:
                    bad.append(f"{rel}:{node.lineno} imports {alias.name}, not in tyr.{pkg}.__all__")
    assert not bad, "\n".join(bad)


def _may_import() -> dict[str, set[str]]:
    """docs/architecture.md §2's table: each package or module and the tyr names it may import
    ("everything above": the rows before it; "everything": all; `errors` everywhere)."""
    table: dict[str, set[str]] = {}
    for line in (DOCS / "architecture.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        names = [n.strip("`/ ") for n in cells[0].split(",")]
        allowed = re.sub(r"\(.*?\)", "", cells[2])
        if allowed.strip() == "everything above":
            may = set(table)
        elif allowed.strip() == "everything":
            may = {"*"}
        else:
            may = {w.strip() for w in allowed.split(",") if w.strip() not in ("", "—")}
        for name in names:
            table[name] = may | {"errors"}
    return table


def test_packages_import_only_what_the_architecture_doc_allows() -> None:
    table = _may_import()
    modules = {p.name for p in SRC.iterdir() if p.suffix == ".py" and p.stem != "__init__"}
    assert set(PACKAGES) | {m.removesuffix(".py") for m in modules} <= set(table) | {"__main__"}
    bad = []
    for path in _modules():
        rel = path.relative_to(SRC)
        own = rel.parts[0].removesuffix(".py")
        if own not in table or "*" in table[own]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tyr."):
                used = [node.module.split(".")[1]]  # type: ignore[union-attr]
            elif isinstance(node, ast.ImportFrom) and node.module == "tyr":
                used = [alias.name for alias in node.names]
            else:
                continue
            bad += [f"{rel}:{node.lineno} imports tyr.{u}" for u in used if u != own and u not in table[own]]
    assert not bad, "not in docs/architecture.md §2:\n" + "\n".join(bad)


def test_the_budget_and_the_search_space_import_no_torch() -> None:
    for name in ("budget.py", "search/space.py", "search/evolution.py"):
        tree = ast.parse((SRC / name).read_text())
        imported = {
            alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        } | {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not {m for m in imported if m.split(".")[0] in ("torch", "numpy")}, name
        assert not {m for m in imported if m.startswith("tyr.")} - {"tyr.budget", "tyr.search.space"}, name


def _sections(doc: Path) -> set[str]:
    heads = re.findall(r"^#{2,4} (\d+(?:\.\d+)?)\.? ", doc.read_text(), flags=re.M)
    return set(heads)


REF = re.compile(r"(docs/(?:algorithm|architecture|protocol|serving|healing)\.md)|§(\d+(?:\.\d+)?)")


def test_every_section_reference_in_the_code_resolves() -> None:
    """A "§N.M" names a heading of the doc last named on the same line, else docs/algorithm.md."""
    sections = {f"docs/{p.name}": _sections(p) for p in DOCS.glob("*.md")}
    assert {"docs/algorithm.md", "docs/architecture.md", "docs/protocol.md"} <= set(sections)
    bad, count = [], 0
    for path in _modules():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            assert not re.search(r"(ALGORITHM|DESIGN|PROTOCOL|INTERFACE)\.md", line), f"{path}:{i}"
            doc = "docs/algorithm.md"
            for m in REF.finditer(line):
                if m.group(1):
                    doc = m.group(1)
                    continue
                count += 1
                if m.group(2) not in sections[doc]:
                    bad.append(f"{path.relative_to(SRC)}:{i}: §{m.group(2)} is not a section of {doc}")
    assert count > 20 and not bad, "\n".join(bad)
