"""The plain engine (no pipelining): the model (single-device or tensor-parallel) inside DeepSpeed (data
parallel, ZeRO, precision, gradient accumulation and clipping) and one optimizer step over the micro-batches
with memory carried per micro-batch slot."""
from __future__ import annotations

import time

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.utils import get_flattened_grad_norm
from megatron.core import parallel_state

from lamemo_parallel import LaMemoMemory
from lamemo_parallel.inference import EvalResult, evaluate_streams

from .. import divergence
from ..config import TrainConfig
from ..layout import Layout
from ..megatron_mpu import MegatronMPU
from ..optim import build_optimizer, build_scheduler
from .base import EngineBase, StepResult, _quiet_deepspeed
from .builder import ModelBuilder


class PlainEngine(EngineBase):
    """Owns the DeepSpeed engine and the per-slot memory; ``train_step`` runs one optimizer step."""

    def __init__(self, config: TrainConfig, layout: Layout, vocab_size: int, device: torch.device):
        _quiet_deepspeed()
        self.config, self.layout, self.device = config, layout, device
        self._builder = builder = ModelBuilder(config, layout, vocab_size, device)
        self.model_config = builder.model_config
        # Identical initial weights on every rank (the single-device model's at run.seed); a tensor-parallel
        # rank draws each tensor in full, one at a time, and keeps its slice. ZeRO-3 without tensor parallelism
        # partitions every parameter over the data-parallel ranks as soon as its module is built (with tensor
        # parallelism a rank builds only its 1/TP shard, partitioned by deepspeed.initialize).
        partition = self._zero3_init if config.parallel.zero_stage == 3 and layout.tensor == 1 else None
        self.model = builder.model(partition=partition)
        optimizer = build_optimizer(self.model.parameters(), config.optim, device)
        scheduler = build_scheduler(optimizer, config.optim, config.run.steps)
        if config.parallel.zero_stage == 3:
            # The tied output layer reads the embedding weight outside the embedding module's forward.
            deepspeed.zero.register_external_parameter(self.model, self.model.embedding.weight)
        self._deepspeed, _, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler,
            config=builder.deepspeed_config(), mpu=self._mpu(), dist_init_required=False)
        self.guard = divergence.install(optimizer, config, device)   # skips bad steps (pretrain/divergence.py)
        self.memories: list[LaMemoMemory | None] = [None] * config.data.micro_batches
        # Dropout differs across data-parallel ranks, agrees across tensor-parallel ranks (split regions
        # are forked inside the tensor-parallel model).
        torch.manual_seed(config.run.seed + 1 + self.dp_rank)

    def _zero3_init(self):
        """``deepspeed.zero.Init`` for this run: parameters partitioned over the data-parallel ranks as their
        modules are built, so no rank ever holds the whole model, not even at start-up."""
        ds_config = self._builder.deepspeed_config()
        # zero.Init reads only the ZeRO and precision keys; the batch keys it would check against a world size
        # it cannot know yet (DeepSpeed's communication layer starts in deepspeed.initialize).
        for key in ("train_batch_size", "gradient_accumulation_steps"):
            ds_config.pop(key, None)
        return deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=self._mpu())

    # ------------------------------------------------------------------ parallel pieces
    @property
    def dp_rank(self) -> int:
        if self.layout.tensor > 1 or self.layout.pipeline > 1:
            return parallel_state.get_data_parallel_rank()
        return dist.get_rank()

    @property
    def dp_group(self):
        if self.layout.tensor > 1 or self.layout.pipeline > 1:
            return parallel_state.get_data_parallel_group()
        return None

    def _mpu(self):
        if self.layout.tensor == 1:
            return None
        return MegatronMPU()

    # ------------------------------------------------------------------ training
    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepResult:
        """One optimizer step: forward/backward of every micro-batch (memory carried per slot), then step."""
        start = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        self._deepspeed.train()
        losses = []
        for slot, (inputs, targets) in enumerate(micro_batches):
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            out = self._deepspeed(inputs, targets=targets, memory=self.memories[slot])
            loss = out.nll.float().mean()
            self._deepspeed.backward(loss)
            if slot == len(micro_batches) - 1:
                grad_norm = self._grad_norm_before_step()
                self.guard.arm(lambda: torch.stack([*losses, loss.detach()]).mean())
            self._deepspeed.step()
            self.memories[slot] = out.memory
            losses.append(loss.detach())
        loss = torch.stack(losses).mean()
        if dist.is_initialized() and self.layout.data > 1:
            dist.all_reduce(loss, group=self.dp_group)
            loss /= self.layout.data
        if grad_norm is None:      # ZeRO / mixed-precision optimizers compute it during their step
            grad_norm = self._deepspeed.get_global_grad_norm()
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
        params = [q for q in self._deepspeed.module.parameters() if q.grad is not None]
        return float(get_flattened_grad_norm(params, mpu=self._deepspeed.mpu))

    # ------------------------------------------------------------------ checkpoint hooks
    def memory_state(self) -> list[dict | None]:
        """This rank's memory per micro-batch slot, as plain tensors (for the per-rank checkpoint file); None for
        a slot not run yet."""
        return [None if m is None else m.state_dict() for m in self.memories]

    def load_memory_state(self, state: list[dict | None]) -> None:
        if len(state) != len(self.memories):
            raise ValueError(f"checkpoint holds memory for {len(state)} micro-batch slots, this run has "
                             f"{len(self.memories)}")
        self.memories = [None if s is None else LaMemoMemory.from_state_dict(s, self.device) for s in state]

    def reset_memory(self, rows: list[list[bool]] | None = None) -> None:
        """Empty the memory; ``rows`` (per slot, per batch row): only the rows marked True, the others keep
        theirs (``LaMemoMemory.valid``: the forgotten rows are masked, as an empty memory)."""
        for slot, memory in enumerate(self.memories):
            forget = None if rows is None else torch.tensor(rows[slot], dtype=torch.bool)
            if memory is None or forget is None or bool(forget.all()):
                self.memories[slot] = None
            elif bool(forget.any()):
                self.memories[slot] = memory.with_valid(
                    torch.where(forget.to(memory.embeddings.device), 0, memory.full_valid()))

    def evaluate(self, streams: torch.Tensor, *, tgt_len: int, mem_len: int) -> EvalResult:
        """Score this data-parallel rank's evaluation ``streams`` [E, L + 1] with the parallel model itself
        (tensor-parallel collectives, ZeRO-3 gathers), the memory carried per stream apart from training's."""
        return evaluate_streams(self._deepspeed.module, streams.to(self.device), tgt_len=tgt_len, mem_len=mem_len)

