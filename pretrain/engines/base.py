"""The engine contract and what both engines share.

An engine owns the model (plain, tensor-parallel or a pipeline stage), DeepSpeed's engine around it (data
parallel, ZeRO, precision, gradient accumulation and clipping) and the memory carried per micro-batch slot.
Callers (the trainer, checkpoints, resharding, evaluation) use only ``TrainingEngine``; DeepSpeed's engine
object stays inside ``pretrain/engines/`` (``EngineBase`` is the one place that talks to it for both engines).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Protocol

import deepspeed.ops
import torch
from deepspeed.utils import logger as deepspeed_logger

from lamemo_parallel import LaMemoConfig
from lamemo_parallel.inference import EvalResult

from ..config import TrainConfig
from ..divergence import StepGuard
from ..layout import Layout
from ..zero_limits import zero_limits


def deepspeed_config(config: TrainConfig, layout: Layout, rank_parameters: int = 0) -> dict:
    """``rank_parameters``: the parameters this rank holds before ZeRO partitions them, which ZeRO's buffer
    and live-parameter limits scale with (``pretrain.zero_limits``)."""
    d, p = config.data, config.parallel
    precision = precision_config(p.precision, p.zero_stage)
    return {
        "train_micro_batch_size_per_gpu": d.micro_batch_size,
        "gradient_accumulation_steps": d.micro_batches,
        "train_batch_size": d.micro_batch_size * d.micro_batches * layout.data,
        # DeepSpeed's default clip is 1.0: always set it explicitly (0 disables).
        "gradient_clipping": config.optim.clip_grad,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2 ** 31,
        "wall_clock_breakdown": False,
        **precision,
        "zero_optimization": zero_config(p, precision.get("zero_optimization", {}).get("stage", p.zero_stage),
                                         on_gpu=runs_on_gpu(config), rank_parameters=rank_parameters,
                                         data_parallel=layout.data),
    }


def runs_on_gpu(config: TrainConfig) -> bool:
    return config.run.device == "cuda" or (config.run.device == "auto" and torch.cuda.is_available())


def zero_config(p, stage: int, *, on_gpu: bool, rank_parameters: int = 0, data_parallel: int = 1) -> dict:
    """ZeRO's keys: the stage; on every device the buckets and ZeRO-3's live-parameter limits scaled to the
    rank's share (``pretrain.zero_limits``); on GPUs from stage 1 on, communication overlapped with compute
    (gradients reduced bucket by bucket on a side stream while the backward pass still runs, ZeRO-3 parameters
    prefetched during compute; CPU has no side streams to overlap on)."""
    out = {"stage": stage, **zero_limits(p, rank_parameters, data_parallel, stage)}
    if stage >= 1 and on_gpu:
        out.update(overlap_comm=p.overlap_comm, contiguous_gradients=True)
    return out


def attention_backend(name: str, device: torch.device) -> str:
    """``auto``: the fused FlexAttention on CUDA, eager attention elsewhere (FlexAttention has no CPU backward)."""
    if name == "auto":
        return "flex" if device.type == "cuda" else "eager"
    return name


def precision_config(precision: str, zero_stage: int) -> dict:
    """DeepSpeed's precision keys. Under bf16 the weights and activations are bf16, but gradients are
    accumulated over micro-batches (``data_types.grad_accum_dtype``) and all-reduced
    (``communication_data_type``) in fp32, and the optimizer steps fp32 master weights: a bf16 sum of many
    micro-batch gradients, or of many data-parallel ranks', loses the small ones. DeepSpeed 0.19 supports fp32
    accumulation of bf16 gradients only in its ZeRO optimizers (stage 1: ``BF16_Optimizer``; stages 2 / 3), so
    bf16 with ``zero_stage`` 0 runs as stage 1 (with one data-parallel rank that partitions nothing). fp16
    (GPU) keeps DeepSpeed's dynamic loss scaling. Z-bar is float32 in every mode (the model does it)."""
    out = {"bf16": {"enabled": precision == "bf16"},
           "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                    "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}}
    if precision == "bf16":
        out["data_types"] = {"grad_accum_dtype": "fp32"}
        out["communication_data_type"] = "fp32"
        if zero_stage == 0:
            out["zero_optimization"] = {"stage": 1}
    return out


def _quiet_deepspeed() -> None:
    # DeepSpeed builds its shm_comm C++ op on every init (~45 s on CPU) unless told it is incompatible.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed_logger.setLevel(logging.WARNING)


@dataclass
class StepResult:
    loss: float          # mean token nll over the global batch (nats)
    lr: float            # learning rate used by this step
    grad_norm: float
    tokens: int          # tokens processed by the whole job in this step
    seconds: float


class TrainingEngine(Protocol):
    """What the trainer, checkpoints and evaluation may use of an engine (``PlainEngine``, ``PipelineEngine``)."""
    config: TrainConfig
    layout: Layout
    device: torch.device
    model_config: LaMemoConfig
    scheduler: torch.optim.lr_scheduler.LambdaLR
    guard: StepGuard

    @property
    def dp_rank(self) -> int: ...
    @property
    def dp_group(self): ...
    @property
    def stage(self) -> int: ...
    @property
    def tp_rank(self) -> int: ...
    @property
    def module(self) -> torch.nn.Module: ...
    @property
    def optimizer(self): ...

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepResult: ...
    def evaluate(self, streams: torch.Tensor, *, tgt_len: int, mem_len: int) -> EvalResult: ...
    def memory_state(self) -> list[dict | None]: ...
    def load_memory_state(self, state: list[dict | None]) -> None: ...
    def reset_memory(self, rows: list[list[bool]] | None = None) -> None: ...
    def set_step(self, step: int) -> None: ...
    def before_update(self, hook: Callable[[], None]) -> None: ...
    def install_checkpoint_engine(self, cls): ...
    def save_shards(self, root: Path, tag: str) -> None: ...
    def load_shards(self, root: Path, tag: str) -> None: ...
    def shard_file(self, root: str, tag: str, kind: Literal["zero", "model"]) -> str: ...
    @property
    def writes_model_file(self) -> bool: ...


class EngineBase:
    """Both engines' dealings with the DeepSpeed engine they own (``self._deepspeed``, set by the subclass)."""
    _deepspeed = None
    stage = 0                       # the pipelined engine overrides it

    @property
    def module(self) -> torch.nn.Module:
        """The model as DeepSpeed holds it: this rank's parameters (a TP slice, a stage, ZeRO-3 partitions)."""
        return self._deepspeed.module

    @property
    def optimizer(self):
        """DeepSpeed's optimizer (a ZeRO / mixed-precision wrapper, or the torch optimizer under ZeRO 0 fp32):
        checkpoints index and reshard its state."""
        return self._deepspeed.optimizer

    @property
    def tp_rank(self) -> int:
        return self.module.parallel.tp_rank

    def set_step(self, step: int) -> None:
        """The optimizer-step count DeepSpeed keeps (a resharded load continues from ``step``)."""
        self._deepspeed.global_steps = step

    def before_update(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` before every optimizer update, before it changes any weight or optimizer state of this rank
        (a step pre-hook on the torch optimizer the engine built, which DeepSpeed's wrappers and the pipeline
        schedule step; a step the divergence guard skips changes nothing and does not call it)."""
        self.guard.optimizer.register_step_pre_hook(lambda *_: hook())

    def install_checkpoint_engine(self, cls):
        """DeepSpeed's checkpoint reader / writer, made an instance of ``cls`` once (idempotent); returns it."""
        current = getattr(self._deepspeed, "checkpoint_engine", None)
        if not isinstance(current, cls):
            self._deepspeed.checkpoint_engine = cls(None)
        return self._deepspeed.checkpoint_engine

    def save_shards(self, root: Path, tag: str) -> None:
        """Collective: DeepSpeed writes this rank's weights and optimizer state under ``root/tag``."""
        self._deepspeed.save_checkpoint(str(root), tag=tag, save_latest=False)

    def load_shards(self, root: Path, tag: str) -> None:
        """Collective: weights, optimizer and LR schedule back from ``root/tag`` (the same layout)."""
        self._deepspeed.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                        load_lr_scheduler_states=True)

    def shard_file(self, root: str, tag: str, kind: Literal["zero", "model"]) -> str:
        """The path DeepSpeed writes this rank's ZeRO optimizer partition (``zero``) or model states to."""
        if kind == "zero":
            return self._deepspeed._get_zero_ckpt_name(root, tag)
        return self._deepspeed._get_ckpt_name(root, tag)

    @property
    def writes_model_file(self) -> bool:
        """Whether this rank writes the (non-ZeRO) model states file (ZeRO 0: data-parallel rank 0 only)."""
        return bool(self._deepspeed.save_non_zero_checkpoint)
