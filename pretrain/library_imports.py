"""Import DeepSpeed and megatron-core without what they load at import time for features this trainer never
uses: seconds of CPU in every process of every launch (on a 4-rank CPU launch, most of the start-up).

* DeepSpeed: ``deepspeed/autotuning/autotuner.py`` runs ``import mlflow`` when the package loads, only to log
  autotuning experiments, which this trainer never runs (mlflow: 2-3 s of CPU). Without tracking
  (``run.mlflow=false``) DeepSpeed is loaded with mlflow hidden (a ``None`` entry in ``sys.modules`` makes
  ``import mlflow`` raise ImportError, which DeepSpeed catches), and the entry is removed again, so a later
  ``import mlflow`` works as usual.
* megatron-core: ``megatron/core/jit.py`` makes ``jit_fuser`` ``torch.compile``, and the package decorates its
  fused kernels (bias-GeLU, SwiGLU, ...) with it when it loads, which imports TorchInductor (about 1.2 s of CPU a
  process, measured on a one-process trainer run: 7.6 -> 6.4 s). This trainer uses megatron-core's
  tensor-parallel layers, its process groups and its vocabulary-parallel loss, none of which calls those
  kernels. megatron-core is loaded with its own no-op fuser instead (``jit.py``'s ``noop_decorator``, what it
  uses itself on a torch without ``torch.compile``), through a module of the same names put in its place; the
  real module is checked to define exactly those names (tests/tools/test_import_graph.py), so a
  megatron-core release that changes it fails that test rather than a run.
"""
from __future__ import annotations

import importlib
import sys
import types


def import_deepspeed(tracking: bool) -> None:
    """Load DeepSpeed now; skip its autotuner's mlflow import unless tracking will load mlflow anyway."""
    if "deepspeed" in sys.modules:
        return
    if tracking or "mlflow" in sys.modules:
        importlib.import_module("deepspeed")
        return
    sys.modules["mlflow"] = None        # type: ignore[assignment]
    try:
        importlib.import_module("deepspeed")
    finally:
        if sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]


#: The names of ``megatron/core/jit.py`` (megatron-core 0.16), as the stand-in below defines them.
MEGATRON_JIT_NAMES = ("jit_fuser", "noop_decorator", "enable_jit_fuser", "disable_jit_fuser")


def _noop_decorator(func):
    """megatron-core's ``noop_decorator``: the function itself."""
    return func


def import_megatron_core() -> None:
    """Load megatron-core now, its fused kernels left uncompiled (the module docstring says why)."""
    if "megatron.core" in sys.modules:
        return
    jit = types.ModuleType("megatron.core.jit", "megatron-core's jit.py, its no-op fuser (pretrain/library_imports.py)")
    jit.jit_fuser = jit.noop_decorator = _noop_decorator
    jit.enable_jit_fuser = jit.disable_jit_fuser = lambda: None
    sys.modules["megatron.core.jit"] = jit
    try:
        importlib.import_module("megatron.core")
    except BaseException:
        del sys.modules["megatron.core.jit"]
        raise
