"""Imports flow one way: ground floor -> data -> experts -> mixture -> baselines -> evaluation -> pipeline -> cli.

Every ``import mocae.x`` / ``from mocae.x import`` of every module under src/mocae (at the top and
inside functions) is mapped to a layer; a module may import its own layer or lower ones only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mocae

SRC = Path(mocae.__file__).parent

# Longest prefix wins. Ground floor: services every layer shares.
LAYERS = {
    "mocae": 0, "mocae.backbones": 0, "mocae.paths": 0, "mocae.errors": 0, "mocae.config": 0,
    "mocae.stages": 0, "mocae.encoder": 0, "mocae.generation": 0, "mocae.generation_cache": 0,
    "mocae.refusal": 0,
    "mocae.data": 1,
    "mocae.experts": 2,
    "mocae.mixture": 3,
    "mocae.baselines": 4,
    # systems shares evaluation's floor: its efficiency run uses evaluation, the harness may ask it.
    "mocae.evaluation": 5, "mocae.systems": 5,
    "mocae.pipeline": 6,
    "mocae.cli": 7, "mocae.serve": 7, "mocae.export": 7, "mocae.pareto": 7,
}
NAMES = {0: "ground", 1: "data", 2: "experts", 3: "mixture", 4: "baselines", 5: "evaluation", 6: "pipeline",
         7: "cli"}


def module_name(path: Path) -> str:
    parts = ("mocae",) + path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    assert best is not None, f"{module} has no layer: add it to LAYERS in {__file__}"
    return LAYERS[best]


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every mocae import in the file ``path``."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    return imports_in(path.read_text(encoding="utf-8"), package)


def imports_in(source: str, package: str) -> list[tuple[int, str]]:
    """(line, module) of every mocae import in ``source``, relative ones resolved from ``package``.

    ``from mocae import NAME`` counts as importing the module that NAME lazily comes from
    (``mocae._EXPORTS``), else ``mocae.NAME`` (``AXES`` and ``__version__`` are the root's own).
    """
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "mocae"]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            if name == "mocae":
                out += [(node.lineno, mocae._EXPORTS.get(a.name, f"mocae.{a.name}")) for a in node.names]
            elif name.split(".")[0] == "mocae":
                out.append((node.lineno, name))
    return out


def test_no_module_imports_a_higher_layer():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        if path == SRC / "__init__.py":
            continue  # the package facade: its lazy exports reach every layer by design
        mine = layer(module_name(path))
        for line, target in imported(path):
            if layer(target) > mine:
                wrong.append(f"{path.relative_to(SRC.parent)}:{line} ({NAMES[mine]}) imports {target} "
                             f"({NAMES[layer(target)]})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_packages_form_no_cycle():
    """Between top-level units (mocae.data, mocae.systems, ...) the import graph is acyclic."""
    def unit(module: str) -> str:
        return ".".join(module.split(".")[:2])

    edges: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        if path == SRC / "__init__.py":
            continue
        src = unit(module_name(path))
        edges.setdefault(src, set()).update(unit(t) for _, t in imported(path) if unit(t) not in (src, "mocae"))
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(trail + [node, nxt])}"
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_the_checker_sees_imports_inside_functions_relative_and_lazy_ones():
    source = ("def f():\n    from mocae.mixture.model import MoCaEModel\n    from ..pipeline import run_pipeline\n"
              "    from mocae import AXES, load_system\n    import mocae.serve.app\n")
    found = imports_in(source, "mocae.data")
    assert found == [(2, "mocae.mixture.model"), (3, "mocae.pipeline"), (4, "mocae.AXES"), (4, "mocae.systems"),
                     (5, "mocae.serve.app")]
    assert [layer(t) for _, t in found] == [3, 6, 0, 5, 7]
