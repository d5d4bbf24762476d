"""The package's layers, read from its imports (those inside functions and under TYPE_CHECKING too):
every import runs down the layers or stays inside its own package, no module imports itself back through
others, each package's docstring says what it may import and means it, and the light layers load no torch."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import romebert

ROOT = Path(romebert.__file__).parent
# bottom to top; the CLI (cli.py, __main__.py) is the top
LAYERS = ("core", "data", "runtime", "model", "training", "evaluation", "deploy", "jobs", "cli")
TORCH_FREE = ("core", "data", "runtime")  # what serving an export needs (torch only inside functions in core.devices)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str) -> str:
    """The romebert module an import names (``from romebert.x import y``: y itself when it is a module)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, romebert module) of every import in the file, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("romebert")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("romebert") and not node.level:
            found += [(node.lineno, _resolve(f"{node.module}.{a.name}")) for a in node.names]
    return [(line, _resolve(name)) for line, name in found]


def _layer(module: str) -> str | None:
    """The layer of a module: its subpackage, or "cli" for cli / __main__; None for the root package."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    return parts[1] if parts[1] in LAYERS else "cli"


GRAPH = {m: sorted({dep for _, dep in _imports(p)} - {m}) for m, p in MODULES.items()}


def test_every_module_belongs_to_a_layer():
    loose = [m for m in MODULES if _layer(m) == "cli" and m.split(".")[1] not in ("cli", "__main__")]
    assert not loose, f"modules outside the layer folders: {loose}"


def test_imports_run_down_the_layers_or_stay_in_their_package():
    wrong = []
    for module, path in MODULES.items():
        mine = _layer(module)
        for line, dep in _imports(path):
            theirs = _layer(dep)
            if mine is None:
                wrong.append(f"{path.name}:{line}: the root package imports {dep} (it must stay lazy)")
            elif theirs is not None and theirs != mine and LAYERS.index(theirs) > LAYERS.index(mine):
                wrong.append(f"{module}:{line} ({mine}) imports {dep} ({theirs}): upward")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in GRAPH.get(m, []):
            if state.get(dep) == 1:
                circles.append(" -> ".join(path[path.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])
    assert not circles, "\n".join(circles)


@pytest.mark.parametrize("layer", LAYERS[:-1])
def test_each_package_says_what_it_owns_and_may_import(layer):
    doc = ast.get_docstring(ast.parse((ROOT / layer / "__init__.py").read_text(encoding="utf-8"))) or ""
    match = re.search(r"^May import: (.*)\.$", doc, re.M)
    assert match and len(doc.splitlines()) >= 2, f"{layer}/__init__.py: say what it holds, then 'May import: ...'"
    declared = {w.strip() for w in match.group(1).split(",") if w.strip() != "nothing"}
    assert declared <= set(LAYERS[: LAYERS.index(layer)]), declared
    used = {_layer(dep) for m in MODULES if _layer(m) == layer for dep in GRAPH[m]} - {layer, None}
    assert used <= declared, f"{layer} imports {sorted(used - declared)} without saying so"


def test_the_light_layers_import_no_torch():
    heavy = re.compile(r"^(import|from) (torch|transformers)\b", re.M)
    found = [m for m, p in MODULES.items() if _layer(m) in TORCH_FREE and heavy.search(p.read_text(encoding="utf-8"))]
    assert not found, f"module-level torch or transformers imports in the torch-free layers: {found}"
    code = (
        "import sys, romebert\n"
        "import romebert.deploy.service, romebert.deploy.classifier, romebert.jobs.predict\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_no_module_is_over_500_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, long
