"""The arrows point down: each module imports only from its own package or from lower layers (function-level
imports included), no training stage imports another, nothing imports the CLI. ARCHITECTURE.md draws the same."""

import ast
from pathlib import Path

import yunque

SRC = Path(yunque.__file__).parent
LAYERS = [
    {"config", "atomic", "formats", "losses", "paths"},  # leaves: nothing of yunque, or configs only
    {"precision", "model", "tokenizer", "outputs", "feedback"},
    {"data", "modeldir"},
    {"interop", "engine"},
    {"eval", "train"},
    {"chat", "speedrun", "apps", "serve"},
    {"cli"},
    {"__main__"},
]
"""Top-level modules and packages of yunque, lowest first. `formats` names higher modules only as strings, which
it imports on use (the registry of model formats)."""
STAGES = {"pretrain", "sft", "align", "reward"}
"""Training stages: each stands on the skeleton (train/run.py) and the loop, never on another stage."""


def layer(unit: str) -> int:
    return next(i for i, units in enumerate(LAYERS) if unit in units)


def imports() -> list[tuple[str, str, int]]:
    """(importing module, imported yunque module, line) for every import in src/yunque."""
    found = []
    for path in SRC.rglob("*.py"):
        module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("yunque"):
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                target = max((n for n in names if _exists(n)), key=len, default=node.module)
                found.append((module, target, node.lineno))
            elif isinstance(node, ast.Import):
                found += [(module, a.name, node.lineno) for a in node.names if a.name.startswith("yunque")]
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node but those under `if TYPE_CHECKING:` (imports for annotations only, never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _exists(dotted: str) -> bool:
    path = SRC.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_is_in_a_layer():
    units = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert units <= set().union(*LAYERS), sorted(units - set().union(*LAYERS))


def test_imports_point_down():
    wrong = []
    for module, target, line in imports():
        a, b = unit_of(module), unit_of(target)
        if a == "__init__" or b == "__init__" or a == b:
            continue
        if layer(b) > layer(a) or (layer(b) == layer(a)):
            wrong.append(f"{module}:{line} imports {target} ({a} is in layer {layer(a)}, {b} in {layer(b)})")
    assert not wrong, "\n".join(wrong)


def test_no_stage_imports_another_and_nothing_imports_the_cli():
    wrong = []
    for module, target, line in imports():
        parts, tparts = module.split("."), target.split(".")
        if parts[1:2] == ["train"] and tparts[1:2] == ["train"] and len(parts) > 2 and len(tparts) > 2:
            if parts[2] in STAGES and tparts[2] in STAGES and parts[2] != tparts[2]:
                wrong.append(f"{module}:{line} imports the stage {target}")
        if unit_of(target) == "cli" and unit_of(module) not in ("cli", "__main__"):
            wrong.append(f"{module}:{line} imports the CLI ({target})")
    assert not wrong, "\n".join(wrong)


def test_the_package_imports_light():
    """`import yunque` and the configs import no torch, so that `yunque --help` starts fast."""
    import subprocess
    import sys

    code = "import sys, yunque, yunque.config, yunque.cli.flags; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
