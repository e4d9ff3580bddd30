"""Training engines: the contract and shared settings (``base``), the plain engine (``plain``: data and tensor
parallel, ZeRO 0-3) and the pipelined one (``pipeline``); ``build_engine`` picks one for the layout."""
from __future__ import annotations

import torch

from ..config import TrainConfig
from ..host_memory import release_freed_memory
from ..layout import Layout
from .base import (EngineBase, StepResult, TrainingEngine, attention_backend, deepspeed_config, precision_config,
                   runs_on_gpu, zero_config)
from .builder import ModelBuilder
from .pipeline import PipelineEngine
from .plain import PlainEngine

__all__ = ["EngineBase", "ModelBuilder", "PipelineEngine", "PlainEngine", "StepResult", "TrainingEngine",
           "attention_backend", "build_engine", "deepspeed_config", "precision_config", "runs_on_gpu", "zero_config"]


def build_engine(config: TrainConfig, layout: Layout, vocab_size: int, device: torch.device) -> TrainingEngine:
    """The engine for this layout: DeepSpeed's pipeline engine when pipelining, the plain one otherwise."""
    release_freed_memory()            # before any weight is allocated (see pretrain/host_memory.py)
    if layout.pipeline > 1:
        return PipelineEngine(config, layout, vocab_size, device)
    return PlainEngine(config, layout, vocab_size, device)
