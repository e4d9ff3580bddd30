"""The pipeline-parallel engine (parallel.pipeline > 1): DeepSpeed's pipe engine over ``LaMemoPipelineModule``.

The contract of ``pretrain.engines.base.TrainingEngine``, as the plain engine. One optimizer step is one
``train_batch`` of DeepSpeed's pipe engine over the step's micro-batches (1F1B schedule,
gradient_accumulation_steps = micro_batches), with tensor parallelism inside the stages (megatron-core) and
data parallelism across pipelines; ZeRO-1 is allowed, ZeRO-2/3 are refused by ``pretrain.layout``.

Process groups: megatron-core's (``parallel_state.initialize_model_parallel``, order tp-cp-ep-dp-pp, tensor
fastest) and DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data, model; the last varies fastest)
number the ranks the same way; the engine checks at start-up that this rank's tensor, data and pipeline groups
are the same in both.

Gradient clipping: with ZeRO-0 in fp32, DeepSpeed's own clip (``clip_grad_norm_`` with the pipeline grid as
mpu) keeps only tensor-parallel-split parameters on every rank but the grid's first, so it would leave the
later stages' replicated parameters out of the norm; this engine clips instead (a step pre-hook on the torch
optimizer: every stage's gradients, tied copies and TP replicas counted once). ZeRO-1 and bf16 use
DeepSpeed's optimizers, whose norms already count pipeline stages correctly.

``LAMEMO_DUMP_MEMORY=<dir>`` (tests, debugging): after every step, write the gathered single-device memory of
this data-parallel rank (all micro-batch slots, concatenated in micro-batch order) to
``<dir>/memory-dp<rank>.safetensors``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state as ps

from lamemo_parallel import LaMemoMemory
from lamemo_parallel.inference import EvalResult, segments
from lamemo_parallel.megatron_parts import is_split

from .. import divergence
from ..config import TrainConfig
from ..layout import Layout
from ..optim import build_optimizer, build_scheduler
from .base import EngineBase, StepResult, _quiet_deepspeed
from .builder import ModelBuilder

DUMP_MEMORY_ENV = "LAMEMO_DUMP_MEMORY"


def check_groups_agree(grid) -> None:
    """Raise if DeepSpeed's pipeline grid and megatron-core's parallel_state disagree on this rank's groups."""
    ranks = dist.get_process_group_ranks
    megatron = {"tensor": ranks(ps.get_tensor_model_parallel_group()), "data": ranks(ps.get_data_parallel_group()),
                "pipeline": ranks(ps.get_pipeline_model_parallel_group())}
    deepspeed = {"tensor": grid.slice_group, "data": grid.dp_group, "pipeline": grid.pp_group}
    wrong = [f"{axis}: megatron {sorted(megatron[axis])}, deepspeed {sorted(deepspeed[axis])}"
             for axis in megatron if sorted(megatron[axis]) != sorted(deepspeed[axis])]
    if wrong:
        raise RuntimeError(f"rank {dist.get_rank()}: megatron-core and DeepSpeed number the parallel groups "
                           f"differently ({'; '.join(wrong)})")


class PipelineEngine(EngineBase):
    """Owns the DeepSpeed pipeline engine and this stage's memory store; ``train_step`` runs one step."""

    def __init__(self, config: TrainConfig, layout: Layout, vocab_size: int, device: torch.device):
        _quiet_deepspeed()
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False)
        p = config.parallel
        self.config, self.layout, self.device = config, layout, device
        builder = ModelBuilder(config, layout, vocab_size, device)
        self.model_config = builder.model_config
        topology = PipeModelDataParallelTopology(num_pp=layout.pipeline, num_mp=layout.tensor, num_dp=layout.data)
        # The single-device model's initial weights at run.seed, each rank drawing only the tensors it holds.
        self.model = builder.pipeline_stage(topology)
        self.grid = self.model.mpu()
        check_groups_agree(self.grid)

        optimizer = build_optimizer(self.model.parameters(), config.optim, device)
        scheduler = build_scheduler(optimizer, config.optim, config.run.steps)
        ds_config = builder.deepspeed_config()
        self._clip_here = p.zero_stage == 0 and p.precision == "fp32"
        self._grad_norm: float | None = None
        if self._clip_here:
            ds_config["gradient_clipping"] = 0.0
            optimizer.register_step_pre_hook(lambda *_: self._clip_gradients())
        self._deepspeed, _, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=False)
        self.guard = divergence.install(optimizer, config, device)   # skips bad steps (pretrain/divergence.py)
        self._activation_rows: int | None = None
        # Dropout: different streams per data-parallel rank and per stage, the same across TP ranks (split
        # regions fork inside the layers); the position-table mask is shared by all stages
        # (lamemo_parallel/pipeline_runtime.py).
        torch.manual_seed(config.run.seed + 1 + self.dp_rank + layout.data * self.stage)

    # ------------------------------------------------------------------ parallel pieces
    @property
    def stage(self) -> int:
        return self.grid.get_stage_id()

    @property
    def dp_rank(self) -> int:
        return self.grid.get_data_parallel_rank()

    @property
    def dp_group(self):
        return self.grid.get_data_parallel_group()

    @property
    def runtime(self):
        return self.model.runtime

    # ------------------------------------------------------------------ training
    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepResult:
        """One optimizer step: the pipeline schedule over all micro-batches (memory carried per slot)."""
        if len(micro_batches) != self.config.data.micro_batches:
            raise ValueError(f"{len(micro_batches)} micro-batches, the engine was built for "
                             f"{self.config.data.micro_batches}")
        start = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        self._fit_activation_shape(micro_batches[0][0])
        self.runtime.begin_step(self._deepspeed.global_steps)
        self._grad_norm = None
        batches = [(x.to(self.device), y.to(self.device)) for x, y in micro_batches]
        # The optimizer-step instruction consults the guard; the last stage holds the summed micro-batch losses.
        self.guard.arm(lambda: (self._deepspeed.total_loss / len(batches)) if self._deepspeed.is_last_stage() else None)
        loss = self._deepspeed.train_batch(data_iter=iter(batches))
        self.runtime.end_step()
        grad_norm = self._grad_norm if self._clip_here else self._deepspeed.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        tokens = sum(x.numel() for x, _ in micro_batches) * self.layout.data
        if os.environ.get(DUMP_MEMORY_ENV):
            self.dump_memory(Path(os.environ[DUMP_MEMORY_ENV]))
        return StepResult(loss=float(loss), lr=lr, grad_norm=grad_norm, tokens=tokens,
                          seconds=time.perf_counter() - start)

    def _fit_activation_shape(self, inputs: torch.Tensor) -> None:
        """DeepSpeed caches the inter-stage shape after the first transfer. It changes only while the memory
        fills up (LaMemo sends M + N rows, M = 0, N, .. mem_len) or when a memory is loaded / reset: then every
        stage resets its buffers at the same step (all stages know M, so all agree without talking)."""
        rows = self._boundary_rows(inputs)
        if rows != self._activation_rows:
            if self._activation_rows is not None:
                self._deepspeed.reset_activation_shape()
            self._activation_rows = rows

    def _boundary_rows(self, inputs: torch.Tensor) -> int:
        """Rows of the activation that crosses a stage boundary: LaMemo sends [memory; current], XL current."""
        N = inputs.shape[1]
        return self.runtime.memory_length() + N if self.model_config.traits.looks_ahead else N

    def _clip_gradients(self) -> None:
        """Global gradient norm over the whole model (all stages, TP shards once, tied copies once), then
        clip to optim.clip_grad as torch.nn.utils.clip_grad_norm_ does. Runs inside DeepSpeed's optimizer
        step, where gradients are already averaged over data-parallel ranks and tied copies summed."""
        tp_rank = self.grid.get_slice_parallel_rank()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        counted = [p.grad for p in self.model.parameters() if p.grad is not None
                   and not getattr(p, "ds_pipe_replicated", False) and (tp_rank == 0 or is_split(p))]
        device = grads[0].device if grads else self.device
        norms = [torch.linalg.vector_norm(g.detach().float()) for g in counted]
        total = torch.stack(norms).pow(2).sum() if norms else torch.zeros((), device=device)
        dist.all_reduce(total, group=self.grid.get_model_parallel_group())   # pipe x tensor ranks of this replica
        norm = total.sqrt()
        self._grad_norm = norm.item()
        max_norm = self.config.optim.clip_grad
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef.to(g.dtype))

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, streams: torch.Tensor, *, tgt_len: int, mem_len: int) -> EvalResult:
        """Score this data-parallel rank's evaluation ``streams`` [E, L + 1] through the pipeline (every stage and
        TP rank takes part; one micro-batch of E rows per segment, DeepSpeed's inference schedule), with an
        evaluation memory of its own (``StageRuntime.evaluation``). Every rank of the pipeline returns the
        same sums."""
        nll_sum, count, rows = 0.0, 0, None
        self._deepspeed.reset_activation_shape()
        with self.runtime.evaluation(mem_len):
            for inputs, targets in segments(streams, tgt_len):
                shape = (inputs.shape[0], self._boundary_rows(inputs))
                if rows is not None and shape != rows:
                    self._deepspeed.reset_activation_shape()
                rows = shape
                self.runtime.begin_step(0)
                loss = self._deepspeed.eval_batch(iter([(inputs.to(self.device), targets.to(self.device))]),
                                              num_micro_batches=1, reduce_output="avg", bcast_loss=True)
                self.runtime.end_step()
                nll_sum += float(loss) * targets.numel()      # the loss is the segment's mean token nll
                count += targets.numel()
        self._deepspeed.reset_activation_shape()                  # training shapes are negotiated afresh
        return EvalResult(nll_sum=nll_sum, n_tokens=count)

    # ------------------------------------------------------------------ memory
    def memory_state(self) -> list[dict | None]:
        """This rank's memory per micro-batch slot, for the per-rank checkpoint file: ``LaMemoMemory.tensors()``
        names with global layer indices, restricted to this stage's layers (plus the embedding FIFO on the
        first stage) and this TP rank's heads; None for a slot not run yet."""
        return [None if s is None else {k: v.detach().cpu() for k, v in s.items()}
                for s in self.runtime.memory.state()]

    def load_memory_state(self, state: list[dict | None]) -> None:
        """Restore what ``memory_state`` returned on this rank (same layout and partition)."""
        self.runtime.memory.load_state([None if s is None else {k: v.to(self.device) for k, v in s.items()}
                                        for s in state])

    def reset_memory(self, rows: list[list[bool]] | None = None) -> None:
        """Empty this stage's memory store; ``rows`` (per slot, per batch row): only the rows marked True."""
        self.runtime.memory.forget(rows)

    def gathered_memory(self) -> LaMemoMemory | None:
        """Collective over the pipeline and TP groups: this data-parallel rank's memory in the single-device
        layout, all slots concatenated in micro-batch order (None before the first step)."""
        parts = [self.model.gathered_memory(slot) for slot in range(self.config.data.micro_batches)]
        return None if any(p is None for p in parts) else LaMemoMemory.concat_rows(parts)

    def dump_memory(self, directory: Path) -> None:
        memory = self.gathered_memory()
        if memory is not None and self.stage == 0 and self.grid.get_slice_parallel_rank() == 0:
            directory.mkdir(parents=True, exist_ok=True)
            memory.save(directory / f"memory-dp{self.dp_rank}.safetensors")
