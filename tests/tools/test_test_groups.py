"""The suite runs on two pytest-xdist workers that share out tests one by one (pyproject.toml: ``-n 2 --dist
loadgroup``). A test module whose own fixtures are module- or session-wide (a SLURM cluster, an mlflow server, a
4-rank run) must be one ``xdist_group``: split over two workers it would build them twice, or, for the SLURM
cluster, one worker would stop it under the other's jobs."""
from __future__ import annotations

import ast

from helpers import ROOT


def _wide_fixtures(tree: ast.Module) -> list[str]:
    """Names of the module's fixtures declared with scope "module" or "session"."""
    names = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for decorator in node.decorator_list:
            if isinstance(decorator, ast.Call) and ast.unparse(decorator.func) == "pytest.fixture" and any(
                    k.arg == "scope" and isinstance(k.value, ast.Constant) and k.value.value in ("module", "session")
                    for k in decorator.keywords):
                names.append(node.name)
    return names


def _grouped(tree: ast.Module) -> bool:
    """Whether a module-level ``pytestmark`` carries ``pytest.mark.xdist_group(...)``."""
    return any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets)
               and "pytest.mark.xdist_group(" in ast.unparse(node.value) for node in tree.body)


def test_modules_with_module_wide_fixtures_are_one_xdist_group():
    modules = sorted((ROOT / "tests").rglob("test_*.py"))
    assert len(modules) > 40
    ungrouped = []
    for path in modules:
        tree = ast.parse(path.read_text())
        wide = _wide_fixtures(tree)
        if wide and not _grouped(tree):
            ungrouped.append(f"{path.relative_to(ROOT)} ({', '.join(wide)})")
    # the SLURM tests share the session's cluster fixture of their folder's conftest.py
    slurm = ast.parse((ROOT / "tests" / "slurm" / "test_slurm.py").read_text())
    assert _grouped(slurm) and not ungrouped, ungrouped


def test_the_checks_see_a_wide_fixture_and_a_group_mark():
    source = ('import pytest\npytestmark = [pytest.mark.slow, pytest.mark.xdist_group("x")]\n'
              '@pytest.fixture(scope="module")\ndef built():\n    return 1\n'
              '@pytest.fixture\ndef per_test():\n    return 2\n')
    tree = ast.parse(source)
    assert _wide_fixtures(tree) == ["built"] and _grouped(tree)
    assert not _grouped(ast.parse(source.replace('pytest.mark.xdist_group("x")', "pytest.mark.distributed")))
