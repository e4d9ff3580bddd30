"""The model directory format and the strict state-dict check.

A model directory holds ``config.json`` (``LaMemoConfig``, plus the keys transformers' ``AutoConfig`` reads),
``model.safetensors`` (the single-device state dict; the embedding / output tie is stored once) and the
modelling code that ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` runs: the files of
this package that ``configuration_lamemo`` / ``modeling_lamemo`` import, copied unchanged (one model, not two).
``check_state_dict`` names every tensor that does not fit.
"""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import LaMemoConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
#: The entry points of the transformers code (``auto_map``); their import closure is what a directory carries.
TRANSFORMERS_CODE = ("configuration_lamemo.py", "modeling_lamemo.py")
TRANSFORMERS_CONFIG = {
    "model_type": "lamemo",
    "architectures": ["LaMemoForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_lamemo.LaMemoConfig",
                 "AutoModelForCausalLM": "modeling_lamemo.LaMemoForCausalLM"},
}


class CheckpointMismatchError(ValueError):
    """A state dict whose tensors do not match the model (missing, unexpected or mis-shaped)."""


class ModelFileError(ValueError):
    """A model directory whose files cannot be used (truncated or damaged weights, a non-float tensor)."""


def check_state_dict(state_dict: dict[str, torch.Tensor], expected_shapes: dict[str, tuple]) -> None:
    """Raise CheckpointMismatchError naming every missing, unexpected or mis-shaped tensor."""
    missing = sorted(set(expected_shapes) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected_shapes))
    misshaped = [f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected_shapes[k])})"
                 for k in sorted(set(expected_shapes) & set(state_dict))
                 if tuple(state_dict[k].shape) != tuple(expected_shapes[k])]
    problems = []
    if missing:
        problems.append("missing tensors: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected tensors: " + ", ".join(unexpected))
    if misshaped:
        problems.append("mis-shaped tensors: " + ", ".join(misshaped))
    if problems:
        raise CheckpointMismatchError("state dict does not match the model; " + "; ".join(problems))


def code_files(package_dir: Path = Path(__file__).parent) -> list[Path]:
    """The modules of this package that the transformers entry points import, directly or not (every relative
    import, function-level ones included), found by reading the source: the set follows the code as it changes.
    They are copied flat beside ``config.json``, where their relative imports still resolve (transformers loads
    the directory as one package), so they must be modules of this package's top level."""
    found: dict[str, Path] = {}
    todo = [package_dir / name for name in TRANSFORMERS_CODE]
    while todo:
        path = todo.pop()
        if path.name in found:
            continue
        found[path.name] = path
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            names = [node.module] if node.module else [alias.name for alias in node.names]
            target = [package_dir / f"{name}.py" for name in names]
            if node.level != 1 or any("." in name or not t.is_file() for name, t in zip(names, target)):
                raise ImportError(f"{path.name}: relative import {'.' * node.level}{node.module or ''} is not a "
                                  "module of the package's top level; the exported model code cannot carry it")
            todo.extend(target)
    return [found[name] for name in sorted(found)]


def save_model_config(path: str | Path, config: LaMemoConfig) -> None:
    """``config.json`` (the model's keys plus transformers' ``model_type`` / ``architectures`` / ``auto_map``)
    and the modelling code that ``auto_map`` names, under ``path`` (created if needed)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    data = {**config.to_dict(), **TRANSFORMERS_CONFIG}
    (path / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    for source in code_files():
        shutil.copyfile(source, path / source.name)


def save_model_dir(path: str | Path, config: LaMemoConfig, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the transformers code under ``path`` (created if needed)."""
    path = Path(path)
    save_model_config(path, config)
    tensors = {name: t.detach().contiguous().cpu() for name, t in state_dict.items()}
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "lamemo-v1"})
    return path


def require_model_dir(path: str | Path) -> Path:
    """``path`` as a Path if it holds a model's config and weights, else FileNotFoundError naming what is missing
    (a cheap check: nothing is read)."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{path} is not a LaMemo model directory: it needs {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME}")
    return path


def load_model_dir(path: str | Path) -> tuple[LaMemoConfig, dict[str, torch.Tensor]]:
    """The config and the CPU state dict of a model directory."""
    path = require_model_dir(path)
    config = LaMemoConfig.load(path / CONFIG_NAME)
    weights_path = path / WEIGHTS_NAME
    try:
        weights = load_file(str(weights_path), device="cpu")
    except Exception as err:         # safetensors' SafetensorError (truncated, bad header) is no OSError
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ModelFileError(f"{weights_path} cannot be read ({first}): the file is truncated or damaged; "
                             f"export the model again") from None
    wrong = sorted(name for name, t in weights.items() if not t.is_floating_point())
    if wrong:
        raise ModelFileError(f"{weights_path}: tensors stored as integers, not floating point "
                             f"({', '.join(f'{n} {weights[n].dtype}' for n in wrong[:3])}"
                             f"{', ...' if len(wrong) > 3 else ''}): not a LaMemo model's weights")
    return config, weights
