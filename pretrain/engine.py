"""The training engine: the model (plain or tensor-parallel), DeepSpeed (data parallel, ZeRO, precision,
gradient accumulation and clipping) and one optimizer step over the micro-batches with memory carried per
micro-batch slot."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lamemo_parallel import LaMemoConfig, LaMemoModel, LaMemoMemory
from lamemo_parallel.init import draw_init_seed, initialise_parameters
from lamemo_parallel.sharding import sharding_table

from . import divergence
from .config import TrainConfig
from .evaluation import EvalResult, evaluate_streams
from .layout import Layout
from .optim import build_optimizer, build_scheduler


def model_config(config: TrainConfig, vocab_size: int) -> LaMemoConfig:
    m, d = config.model, config.data
    return LaMemoConfig(vocab_size=vocab_size, n_layer=m.n_layer, d_model=m.d_model, n_head=m.n_head,
                        d_head=m.d_head, d_inner=m.d_inner, variant=m.variant, pre_lnorm=m.pre_lnorm,
                        dropout=m.dropout, dropatt=m.dropatt, clamp_len=m.clamp_len, tgt_len=d.tgt_len,
                        mem_len=d.mem_len, init_std=m.init_std)


def deepspeed_config(config: TrainConfig, layout: Layout) -> dict:
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
                                         on_gpu=runs_on_gpu(config)),
    }


def runs_on_gpu(config: TrainConfig) -> bool:
    return config.run.device == "cuda" or (config.run.device == "auto" and torch.cuda.is_available())


def zero_config(p, stage: int, *, on_gpu: bool) -> dict:
    """ZeRO's keys: the stage and, on GPUs from stage 1 on, communication overlapped with compute (gradients
    reduced bucket by bucket on a side stream while the backward pass still runs, ZeRO-3 parameters prefetched
    during compute). CPU runs keep DeepSpeed's defaults (no side streams to overlap on)."""
    out = {"stage": stage}
    if stage >= 1 and on_gpu:
        out.update(overlap_comm=p.overlap_comm, contiguous_gradients=True,
                   reduce_bucket_size=p.reduce_bucket_size, allgather_bucket_size=p.allgather_bucket_size)
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
    import logging

    import deepspeed.ops
    # DeepSpeed builds its shm_comm C++ op on every init (~45 s on CPU) unless told it is incompatible.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from deepspeed.utils import logger
    logger.setLevel(logging.WARNING)


@dataclass
class StepResult:
    loss: float          # mean token nll over the global batch (nats)
    lr: float            # learning rate used by this step
    grad_norm: float
    tokens: int          # tokens processed by the whole job in this step
    seconds: float


class Engine:
    """Owns the DeepSpeed engine and the per-slot memory; ``train_step`` runs one optimizer step."""

    def __init__(self, config: TrainConfig, layout: Layout, vocab_size: int, device: torch.device):
        import deepspeed
        _quiet_deepspeed()
        self.config, self.layout, self.device = config, layout, device
        self.model_config = model_config(config, vocab_size)
        # Identical initial weights on every rank (the single-device model's at run.seed); a tensor-parallel
        # rank draws each tensor in full, one at a time, and keeps its slice.
        torch.manual_seed(config.run.seed)
        init_seed = draw_init_seed()
        if layout.tensor > 1:
            from lamemo_parallel.tensor_parallel import TensorParallelLaMemoModel as model_class
        else:
            model_class = LaMemoModel
        if config.parallel.zero_stage == 3 and layout.tensor == 1:
            # (with tensor parallelism a rank builds only its 1/TP shard, partitioned by deepspeed.initialize)
            model = self._partitioned_model(model_class, init_seed)
        else:
            model = model_class(self.model_config, init_seed=init_seed).to(device)
        model.activation_checkpointing = config.parallel.activation_checkpointing
        model.attention_backend = attention_backend(config.parallel.attention_backend, device)
        self.model = model
        optimizer = build_optimizer(self.model.parameters(), config.optim, device)
        scheduler = build_scheduler(optimizer, config.optim, config.run.steps)
        if config.parallel.zero_stage == 3:
            # The tied output layer reads the embedding weight outside the embedding module's forward.
            deepspeed.zero.register_external_parameter(self.model, self.model.embedding.weight)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(config, layout), mpu=self._mpu(), dist_init_required=False)
        self.guard = divergence.install(optimizer, config, device)   # skips bad steps (pretrain/divergence.py)
        self.memories: list[LaMemoMemory | None] = [None] * config.data.micro_batches
        # Dropout differs across data-parallel ranks, agrees across tensor-parallel ranks (split regions
        # are forked inside the tensor-parallel model).
        torch.manual_seed(config.run.seed + 1 + self.dp_rank)

    def _partitioned_model(self, model_class, init_seed: int):
        """ZeRO-3: every parameter is partitioned over the data-parallel ranks as soon as its module is built
        (``deepspeed.zero.Init``), then filled one tensor at a time (gathered, set from its per-tensor seed,
        partitioned again), so no rank ever holds the whole model, not even at start-up."""
        import deepspeed
        ds_config = deepspeed_config(self.config, self.layout)
        # zero.Init reads only the ZeRO and precision keys; the batch keys it would check against a world size
        # it cannot know yet (DeepSpeed's communication layer starts in deepspeed.initialize).
        for key in ("train_batch_size", "gradient_accumulation_steps"):
            ds_config.pop(key, None)
        with deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=self._mpu()):
            model = model_class(self.model_config, initialize=False)
        table = sharding_table(self.model_config, model.linears.tp_size)
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                initialise_parameters({name: param}, table, init_seed=init_seed,
                                      init_std=self.model_config.init_std, tp_rank=model.linears.tp_rank,
                                      tp_size=model.linears.tp_size)
        return model

    # ------------------------------------------------------------------ parallel pieces
    @property
    def dp_rank(self) -> int:
        if self.layout.tensor > 1 or self.layout.pipeline > 1:
            from megatron.core import parallel_state
            return parallel_state.get_data_parallel_rank()
        return dist.get_rank()

    @property
    def dp_group(self):
        if self.layout.tensor > 1 or self.layout.pipeline > 1:
            from megatron.core import parallel_state
            return parallel_state.get_data_parallel_group()
        return None

    def _mpu(self):
        if self.layout.tensor == 1:
            return None
        from .megatron_mpu import MegatronMPU
        return MegatronMPU()

    # ------------------------------------------------------------------ training
    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepResult:
        """One optimizer step: forward/backward of every micro-batch (memory carried per slot), then step."""
        start = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        self.engine.train()
        losses = []
        for slot, (inputs, targets) in enumerate(micro_batches):
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            out = self.engine(inputs, targets=targets, memory=self.memories[slot])
            loss = out.nll.float().mean()
            self.engine.backward(loss)
            if slot == len(micro_batches) - 1:
                grad_norm = self._grad_norm_before_step()
                self.guard.arm(lambda: torch.stack([*losses, loss.detach()]).mean())
            self.engine.step()
            self.memories[slot] = out.memory
            losses.append(loss.detach())
        loss = torch.stack(losses).mean()
        if dist.is_initialized() and self.layout.data > 1:
            dist.all_reduce(loss, group=self.dp_group)
            loss /= self.layout.data
        if grad_norm is None:      # ZeRO / mixed-precision optimizers compute it during their step
            grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        tokens = sum(x.numel() for x, _ in micro_batches) * self.layout.data
        return StepResult(loss=loss.item(), lr=lr, grad_norm=grad_norm, tokens=tokens,
                          seconds=time.perf_counter() - start)

    def _grad_norm_before_step(self) -> float | None:
        """Global gradient norm (before clipping) when DeepSpeed's plain fp32 path does not record it: at the
        accumulation boundary the gradients are already averaged over data-parallel ranks; tensor-parallel
        shards are combined through the mpu without counting replicated parameters twice."""
        p = self.config.parallel
        if p.zero_stage > 0 or p.precision != "fp32":
            return None
        from deepspeed.runtime.utils import get_flattened_grad_norm
        params = [q for q in self.engine.module.parameters() if q.grad is not None]
        return float(get_flattened_grad_norm(params, mpu=self.engine.mpu))

    # ------------------------------------------------------------------ checkpoint hooks
    def memory_state(self) -> list[dict | None]:
        """This rank's memory per micro-batch slot, as plain tensors (for the per-rank checkpoint file)."""
        from .checkpoint import memory_to_state
        return [memory_to_state(m) for m in self.memories]

    def load_memory_state(self, state: list[dict | None]) -> None:
        from .checkpoint import memory_from_state
        if len(state) != len(self.memories):
            raise ValueError(f"checkpoint holds memory for {len(state)} micro-batch slots, this run has "
                             f"{len(self.memories)}")
        self.memories = [memory_from_state(s, self.device) for s in state]

    def reset_memory(self) -> None:
        self.memories = [None] * len(self.memories)

    def evaluate(self, streams: torch.Tensor, *, tgt_len: int, mem_len: int) -> EvalResult:
        """Score this data-parallel rank's evaluation ``streams`` [E, L + 1] with the parallel model itself
        (tensor-parallel collectives, ZeRO-3 gathers), the memory carried per stream apart from training's."""
        return evaluate_streams(self.engine.module, streams.to(self.device), tgt_len=tgt_len, mem_len=mem_len)


def build_engine(config: TrainConfig, layout: Layout, vocab_size: int, device: torch.device):
    """The engine for this layout: DeepSpeed's pipeline engine when pipelining, the plain one otherwise."""
    from .host_memory import release_freed_memory
    release_freed_memory()            # before any weight is allocated (see pretrain/host_memory.py)
    if layout.pipeline > 1:
        from .pipeline_engine import PipelineEngine
        return PipelineEngine(config, layout, vocab_size, device)
    return Engine(config, layout, vocab_size, device)
