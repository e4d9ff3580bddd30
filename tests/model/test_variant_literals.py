"""Variant numbers are read in one place: ``lamemo_parallel/config.py`` (``VariantTraits``) and the importer of
the official release (``lamemo_parallel/convert.py``, which must name the release's ``attn_type`` numbers).
Everywhere else the code asks named questions (``config.traits.looks_ahead``, ``.full_look_ahead``, ...)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("lamemo_parallel", "pretrain", "tools", "bench")
ALLOWED = {"lamemo_parallel/config.py", "lamemo_parallel/convert.py"}


def _mentions_variant(node: ast.AST) -> bool:
    return any((isinstance(n, ast.Name) and "variant" in n.id.lower())
               or (isinstance(n, ast.Attribute) and "variant" in n.attr.lower()) for n in ast.walk(node))


def _int_literals(node: ast.AST) -> bool:
    """An int constant, or a tuple / list / set of them (``variant in (3, 32, 33)``)."""
    if isinstance(node, ast.Constant):
        return type(node.value) is int
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return bool(node.elts) and all(_int_literals(e) for e in node.elts)
    return False


def literal_variant_uses(source: str) -> list[int]:
    """Line numbers where code compares a variant with a number, passes ``variant=<number>``, defaults a
    variant to a number, or iterates over variant numbers."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_mentions_variant(o) for o in operands) and any(_int_literals(o) for o in operands):
                lines.append(node.lineno)
        elif isinstance(node, ast.keyword) and node.arg and "variant" in node.arg and _int_literals(node.value):
            lines.append(node.value.lineno)
        elif isinstance(node, ast.AnnAssign) and node.value is not None and _mentions_variant(node.target) \
                and _int_literals(node.value):
            lines.append(node.lineno)
        elif isinstance(node, ast.Assign) and any(_mentions_variant(t) for t in node.targets) \
                and _int_literals(node.value):
            lines.append(node.lineno)
        elif isinstance(node, ast.For) and _mentions_variant(node.target) and _int_literals(node.iter):
            lines.append(node.lineno)
    return sorted(lines)


def test_the_detector_finds_each_kind_of_literal():
    source = "\n".join([
        "if config.variant in (3, 32, 33): pass",
        "x = m.variant != 0",
        "y = 31 == variant",
        "LaMemoConfig(vocab_size=5, variant=33)",
        "class A:\n    variant: int = 3",
        "for variant in (3, 0): pass",
        "ok = config.traits.looks_ahead and config.variant == DEFAULT_VARIANT",
    ])
    assert literal_variant_uses(source) == [1, 2, 3, 4, 6, 7]


def test_no_literal_variant_numbers_outside_the_config_and_the_official_importer():
    found = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in ALLOWED:
                continue
            found += [f"{rel}:{line}" for line in literal_variant_uses(path.read_text())]
    assert found == [], "literal variant numbers (use LaMemoConfig's named properties): " + ", ".join(found)
