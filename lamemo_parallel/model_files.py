"""The model directory format and the strict state-dict check.

A model directory holds ``config.json`` (``LaMemoConfig``) and ``model.safetensors`` (the single-device state
dict; the embedding / output tie is stored once). ``check_state_dict`` names every tensor that does not fit.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import LaMemoConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


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


def save_model_dir(path: str | Path, config: LaMemoConfig, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write ``config.json`` and ``model.safetensors`` under ``path`` (created if needed)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config.save(path / CONFIG_NAME)
    tensors = {name: t.detach().contiguous().cpu() for name, t in state_dict.items()}
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "lamemo-v1"})
    return path


def load_model_dir(path: str | Path) -> tuple[LaMemoConfig, dict[str, torch.Tensor]]:
    """The config and the CPU state dict of a model directory."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{path} is not a LaMemo model directory: it needs {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME}")
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
