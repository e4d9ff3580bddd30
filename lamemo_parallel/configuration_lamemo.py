"""transformers' view of the model configuration (``AutoConfig.from_pretrained(dir, trust_remote_code=True)``).

It reads and writes the same ``config.json`` keys as ``config.LaMemoConfig`` (the dataclass stays the one
definition: the fields, their defaults and the validation come from it), so a directory saved by either side
loads with both. Imports only transformers and this package's torch-only modules: an exported model directory
carries this file (``model_files.code_files``).
"""
from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from .config import LaMemoConfig as ModelConfig

_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}


def _default(name: str):
    f = _FIELDS[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


class LaMemoConfig(PretrainedConfig):
    """The keys of ``config.LaMemoConfig`` as attributes (``vocab_size``, ``n_layer``, ``variant``, ``tgt_len``,
    ``mem_len``, ...); ``model_config()`` gives the validated dataclass the model is built from."""

    model_type = "lamemo"

    def __init__(self, **kwargs):
        for name in _FIELDS:
            setattr(self, name, kwargs.pop(name, _default(name)))
        kwargs.setdefault("tie_word_embeddings", False)   # the output layer reads the embedding itself
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        """The dataclass the model library builds from (validated there)."""
        return ModelConfig(**{name: getattr(self, name) for name in _FIELDS})

    def to_dict(self) -> dict:
        # Only the model's keys and transformers' own (model_type, architectures, auto_map, versions): the file
        # stays readable by ``config.LaMemoConfig.from_dict``, which refuses unknown keys.
        out = super().to_dict()
        keep = set(_FIELDS) | {"model_type", "architectures", "auto_map", "transformers_version", "dtype"}
        return {k: v for k, v in out.items() if k in keep}
