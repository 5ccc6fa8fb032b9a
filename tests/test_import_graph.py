"""The package's import graph (issue 11): layers import downward only, no cycles, no private
names across modules, and function-local imports only where they keep Ray, torch or another
heavy library out of a module's import (the CLI and the config loader must not pay for them).

The graph is read from the source (ast), so it covers imports inside functions too.
"""

from __future__ import annotations

import ast
import os
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rayclust")
# the layers, top to bottom; a module may import its own layer or any below it
LAYERS = {"interfaces": 3, "pipeline": 2, "method": 1, "foundation": 0}
# third-party modules worth importing lazily (seconds, or a cluster connection)
HEAVY = ("ray", "torch", "torchvision", "open_clip", "PIL", "s3fs", "fsspec", "huggingface_hub")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
    return rel.removesuffix(".__init__")


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] == "cli":
        return "interfaces"
    if len(parts) > 1 and parts[1] in ("pipeline", "method"):
        return parts[1]
    if module == "rayclust.config":  # the application config: read by pipeline and CLI
        return "pipeline"
    return "foundation"


def _imports():
    """(module, imported rayclust module or third-party top name, names, function-local?)"""
    out = []
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            module = _module_name(path)
            tree = ast.parse(open(path, encoding="utf-8").read())
            local = set()
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    local |= {id(n) for n in ast.walk(node)
                              if isinstance(n, (ast.Import, ast.ImportFrom))}
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        out.append((module, alias.name, [], id(node) in local))
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [a.name for a in node.names]
                    target = node.module
                    # `from rayclust.pipeline import stage2` imports the submodule
                    subs = [f"{target}.{n}" for n in names
                            if os.path.exists(os.path.join(os.path.dirname(ROOT),
                                                           *f"{target}.{n}".split(".")) + ".py")]
                    for sub in subs:
                        out.append((module, sub, [], id(node) in local))
                    if not subs:
                        out.append((module, target, names, id(node) in local))
    return out


IMPORTS = _imports()


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, target, _, _ in IMPORTS:
        graph.setdefault(module, set())
        if target.startswith("rayclust"):
            graph[module].add(target)
    return graph


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or nxt == "rayclust":
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state.get(nxt) is None:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if state.get(node) is None:
            visit(node)


def test_layers_import_downward_only():
    wrong = [f"{m} ({_layer(m)}) imports {t} ({_layer(t)})" for m, t, _, _ in IMPORTS
             if t.startswith("rayclust.") and LAYERS[_layer(t)] > LAYERS[_layer(m)]]
    assert not wrong, "\n".join(wrong)


def test_method_layer_imports_neither_ray_nor_the_application_config():
    wrong = [f"{m} imports {t}" for m, t, _, _ in IMPORTS if m.startswith("rayclust.method")
             and (t == "ray" or t.startswith("ray.") or t == "rayclust.config")]
    assert not wrong, "\n".join(wrong)


def test_no_private_names_across_modules():
    wrong = [f"{m} imports {n} from {t}" for m, t, names, _ in IMPORTS
             if t.startswith("rayclust") for n in names if n.startswith("_")]
    assert not wrong, "\n".join(wrong)


def _loads_heavy(module: str) -> bool:
    """Whether importing `module` imports torch or Ray (in a fresh interpreter)."""
    import subprocess

    code = (f"import sys, {module};"
            "print(any(m in sys.modules for m in ('torch', 'ray', 'open_clip')))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "True"


@pytest.mark.slow
def test_function_local_imports_only_keep_heavy_libraries_lazy():
    local = [(m, t) for m, t, _, is_local in IMPORTS if is_local]
    third_party = sorted({t for _, t in local if not t.startswith("rayclust")
                          and t.split(".")[0] not in HEAVY})
    assert not third_party, f"light libraries imported inside functions: {third_party}"
    own = sorted({t for _, t in local if t.startswith("rayclust")})
    light = [t for t in own if not _loads_heavy(t)]
    assert not light, f"rayclust modules imported inside functions that load no torch/Ray: {light}"


def test_cli_and_config_import_without_torch_or_ray():
    import subprocess

    code = ("import sys, rayclust.cli, rayclust.config, rayclust.pipeline.run;"
            "rayclust.cli.build_parser();"
            "print(sorted(m for m in ('torch', 'ray', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
