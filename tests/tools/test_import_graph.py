"""The project's own import graph: no cycle among its modules, and the layering the style rules ask for
(the model library ``lamemo_parallel`` never imports the trainer ``pretrain``).

Imports are read from the source with ``ast`` (every ``import`` statement, function-level ones included,
relative imports resolved), so a cycle hidden behind a lazy import counts as much as a top-level one.
Importing a submodule is an edge to that module only, not to the packages above it (Python runs their
``__init__`` first, but that is not a dependency the author wrote).
"""
from __future__ import annotations

import ast
import io
import textwrap
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("lamemo_parallel", "pretrain")


def project_modules(root: Path = ROOT, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of ``packages`` (a package is its ``__init__``)."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` refers to: itself, or the longest enclosing project module."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``module`` (source at ``path``) imports anywhere in its body."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(_resolve(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:     # ``from pkg import submodule`` imports the submodule itself
                found.add(_resolve(f"{source}.{alias.name}", modules) if f"{source}.{alias.name}" in modules
                          else _resolve(source, modules))
    return {m for m in found if m is not None and m != module}


def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    modules = project_modules(root, packages)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None when the graph has none (depth-first search)."""
    state: dict[str, str] = {}          # "open" while on the current path, "done" once fully explored
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = "open"
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = "done"
                stack.pop()
            elif state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = "open"
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"b"}}) is None


def test_import_resolution_on_a_synthetic_package(tmp_path):
    """Relative, function-level and ``from package import submodule`` imports all make edges: the two
    modules below form a cycle only through a lazy import inside a function."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import thing\n")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("thing = 1\ndef f():\n    from .. import a\n    import pkg.a.x\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph == {"pkg": set(), "pkg.sub": {"pkg.sub.b"}, "pkg.a": {"pkg.sub.b"}, "pkg.sub.b": {"pkg.a"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]


def test_project_modules_import_no_cycle():
    graph = import_graph()
    assert "pretrain.engines.plain" in graph and "lamemo_parallel.model" in graph     # the walk found the code
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_model_library_never_imports_the_trainer():
    wrong = {module: sorted(m for m in imported if m.split(".")[0] == "pretrain")
             for module, imported in import_graph().items() if module.split(".")[0] == "lamemo_parallel"}
    wrong = {module: imported for module, imported in wrong.items() if imported}
    assert not wrong, f"lamemo_parallel imports pretrain: {wrong}"


# ---------------------------------------------------------------------------------------------------------------
# Imports at the top of the file unless a comment says why (cost or cycle). An import inside a function is
# accepted when a comment sits on one of its lines or on the line just above it; a run of such imports one under
# the other shares the comment above the first (one comment for a function's lazy block).
LAZY_IMPORT_PACKAGES = ("lamemo_parallel", "pretrain", "tools")


def _comment_lines(source: str) -> set[int]:
    return {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT}


def function_imports(source: str) -> list[ast.stmt]:
    """Every ``import`` / ``from ... import`` statement inside a function (methods and nested functions too)."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(source), False)
    return sorted(found, key=lambda n: n.lineno)


def unexplained_imports(source: str) -> list[int]:
    """Line numbers of the function-level imports that no comment explains (see above)."""
    comments = _comment_lines(source)
    explained_ends: set[int] = set()      # last line of each explained import (what the next one may lean on)
    bad = []
    for node in function_imports(source):
        lines = range(node.lineno, node.end_lineno + 1)
        if any(line in comments for line in lines) or node.lineno - 1 in comments or node.lineno - 1 in explained_ends:
            explained_ends.add(node.end_lineno)
        else:
            bad.append(node.lineno)
    return bad


def test_unexplained_import_finder_on_examples():
    source = textwrap.dedent('''\
        import os                      # module level: never a finding


        def light():
            import json
            return json


        def heavy():
            # torch is costly: only this command needs it
            import torch
            from torch import nn
            x = 1
            import numpy
            import yaml  # cycle: yaml's loader imports this module
            return torch, nn, numpy, yaml, x


        class Engine:
            def build(self):
                def inner():
                    from deepspeed import utils
                    return utils
                return inner
        ''')
    assert unexplained_imports(source) == [5, 14, 22]


def test_function_level_imports_say_why():
    found = {}
    for package in LAZY_IMPORT_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            bad = unexplained_imports(path.read_text())
            if bad:
                found[str(path.relative_to(ROOT))] = bad
    assert found == {}, ("imports inside functions without a comment saying why (cost or cycle): move them to "
                         f"the top of the file, or say why on the line or the line above: {found}")


def test_megatron_core_loads_with_its_own_no_op_fuser_and_the_stand_in_matches_its_jit_module():
    """pretrain/library_imports.py puts a stand-in for megatron-core's jit.py in place: the real module must
    define exactly the stand-in's names (a megatron-core release that changes it fails here, not in a run), and
    with it megatron-core's tensor-parallel layers load without TorchInductor."""
    import importlib.util
    import subprocess
    import sys

    from helpers import ROOT, subprocess_env
    from pretrain.library_imports import MEGATRON_JIT_NAMES

    package = Path(importlib.util.find_spec("megatron").submodule_search_locations[0])
    tree = ast.parse((package / "core" / "jit.py").read_text())
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    defined |= {target.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets
                if isinstance(target, ast.Name)}
    assert defined == set(MEGATRON_JIT_NAMES)
    probe = ("import sys; from pretrain.library_imports import import_megatron_core; import_megatron_core(); "
             "from megatron.core.tensor_parallel import ColumnParallelLinear; from megatron.core.jit import jit_fuser; "
             "f = lambda x: x; assert jit_fuser(f) is f; print(sorted(m for m in ('torch._inductor.compile_fx',) "
             "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=subprocess_env())
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "[]", done.stderr[-2000:]
