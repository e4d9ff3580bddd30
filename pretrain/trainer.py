"""One training run on this rank, top-down: ``run`` sets up the process and hands over to ``Trainer``, whose
``run`` is set up, then per step: train, maybe evaluate, log, maybe save, stop when asked; then finish
(final evaluation and export).

Every optimizer step appends one JSON object to ``<run.dir>/metrics.jsonl`` (through the tracker).
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lamemo_parallel.config import variant_traits
from lamemo_parallel.flops import StepShape
from lamemo_parallel.inference import EvalResult, split_streams

from .checkpoint import (CheckpointError, CheckpointWriter, conclude_save, find_resume_checkpoint, load_checkpoint,
                         quarantine_checkpoints, rotate_checkpoints, start_save)
from .checkpoint.export import export_checkpoint
from .config import TrainConfig
from .data.mixture import build_streams, data_metrics, mixture_report, span_memory_reset
from .data.sources import Source
from .library_imports import import_deepspeed, import_megatron_core
from .distributed import init_distributed, launch_world_size
from .divergence import DivergenceError
from .layout import Layout, resolve_layout
from .preflight import check_data, check_memory
from .profiling import StepProfiler
from .resume_settings import apply_changed_settings, check_data_on_resume
from .run_errors import USER_ERRORS, RunFailed, StopSignal, failure, newest_checkpoint_note
from .run_lock import RunLock
from .startup import (checked, claim_run_dir, init_model_parallel, log, replace_previous_run, resolve_device,
                      set_cpu_threads)
from .throughput import ThroughputMeter, format_console_line, resolve_peak_tflops
from .tracking import Tracker, resolve_loggers
from .tracking.metrics_rewind import rewind_metrics


def run(config: TrainConfig) -> Path:
    """The whole run on this rank (every rank calls it): process set-up, the run directory's lock, training."""
    import_deepspeed(tracking=config.run.mlflow and "mlflow" in config.run.loggers)
    import_megatron_core()
    device = resolve_device(config)
    # Before the process group: a layout every rank finds impossible stops each rank alone (a rank that left a
    # half-made process group would make the others fail inside gloo's rendezvous with a traceback).
    layout = resolve_layout(config, launch_world_size(), cuda=device.type == "cuda")
    set_cpu_threads(device)
    rank, world = init_distributed(device)
    run_dir = Path(config.run.dir)
    lock = RunLock(run_dir)          # held by global rank 0 for the trainer's life (pretrain/run_lock.py)
    created = rank == 0 and not run_dir.exists()
    try:
        checked(lambda: claim_run_dir(config, run_dir, lock) if rank == 0 else None)
        return Trainer(config, device, rank, world, layout, run_dir).run()
    finally:
        lock.release()
        if created:                  # a start refused before writing anything leaves no directory behind
            with contextlib.suppress(OSError):
                run_dir.rmdir()      # only ever removes an empty directory


def rank_streams(tokens, streams_per_rank: int, dp_size: int = 1, dp_rank: int = 0) -> torch.Tensor:
    """This data-parallel rank's evaluation streams: ``split_streams(tokens, streams_per_rank * dp_size)``
    rows ``[dp_rank * streams_per_rank, (dp_rank + 1) * streams_per_rank)``. The union over the ranks is the
    single-device evaluation with ``batch_size = streams_per_rank * dp_size``."""
    streams = split_streams(tokens, streams_per_rank * dp_size)
    return streams[dp_rank * streams_per_rank:(dp_rank + 1) * streams_per_rank]


def evaluate_validation(engine, config: TrainConfig, valid: list[Source] | None, *,
                        bits_per_char: bool = False) -> dict | None:
    """Validation loss of the current weights with streaming memory, through the parallel model: every stage
    and TP rank takes part, each data-parallel rank scores its own ``run.eval_batch_size`` streams (the
    single-device evaluation with batch size eval_batch_size x DP), and the sums are all-reduced over the
    data-parallel group. The result is the same on every rank.

    ``valid`` is the validation split as start-up's data check loaded it (``preflight.check_data``: token files
    opened and verified once, memory-mapped, not read again at each evaluation). Each source (``data.valid`` as a
    list; a prefix is one source named after its stem) is scored on its own as ``valid/<name>/loss`` and
    ``valid/<name>/ppl`` (``bpc`` with ``bits_per_char``, for byte tokenizers); ``valid/loss`` and the ``eval_*``
    keys are the token-weighted total over the sources."""
    if not valid:
        return None
    mem_len = config.data.eval_mem_len if config.data.eval_mem_len is not None else config.data.mem_len
    dp_size = engine.layout.data
    out, nll_sum, n_tokens = {}, 0.0, 0
    for source in valid:
        scored = source.tokens[:config.run.eval_tokens + 1] if config.run.eval_tokens else source.tokens[:]
        tokens = torch.from_numpy(np.asarray(scored, dtype=np.int64))
        streams = rank_streams(tokens, config.run.eval_batch_size, dp_size, engine.dp_rank)
        local = engine.evaluate(streams, tgt_len=config.data.tgt_len, mem_len=mem_len)
        sums = torch.tensor([local.nll_sum, float(local.n_tokens)], dtype=torch.float64, device=engine.device)
        if dp_size > 1:
            dist.all_reduce(sums, group=engine.dp_group)
        r = EvalResult(nll_sum=sums[0].item(), n_tokens=int(sums[1].item()))
        out[f"valid/{source.name}/loss"] = r.loss
        out[f"valid/{source.name}/bpc" if bits_per_char else f"valid/{source.name}/ppl"] = (
            r.bits_per_token if bits_per_char else r.perplexity)
        nll_sum, n_tokens = nll_sum + r.nll_sum, n_tokens + r.n_tokens
    r = EvalResult(nll_sum=nll_sum, n_tokens=n_tokens)
    return {"eval_loss": r.loss, "eval_ppl": r.perplexity, "eval_bits_per_token": r.bits_per_token,
            "eval_tokens": r.n_tokens, "valid/loss": r.loss, **out}


def export_final(run_dir: Path) -> Path:
    """``run_dir/final``: the newest checkpoint (the last step's, saved just before) exported offline from its
    shards by rank 0, as ``tools/export_checkpoint.py`` does. The other ranks do not wait for it (no
    barrier to time out on a long export)."""
    out = run_dir / "final"
    if dist.get_rank() == 0:
        export_checkpoint(run_dir, out, overwrite=True)
    return out


class Trainer:
    """The training loop of one rank. ``run`` is the whole story; each method below is one part of it."""

    def __init__(self, config: TrainConfig, device: torch.device, rank: int, world: int, layout: Layout,
                 run_dir: Path):
        self.config, self.device, self.rank, self.world, self.layout = config, device, rank, world, layout
        self.run_dir = run_dir
        self.start_step = 0
        self.unconfirmed = False   # the newest checkpoint's update has not yet been followed by an accepted step

    def run(self) -> Path:
        self.set_up()
        status, step = "FINISHED", self.start_step
        try:
            for step in range(self.start_step + 1, self.config.run.steps + 1):
                with self.profiler.step(step):          # run.profile_steps (pretrain/profiling.py)
                    stopping = self.step(step)
                if stopping:
                    status = "KILLED"
                    return self.run_dir
            self.finish()
        except DivergenceError as err:
            status = "FAILED"
            raise self.diverged(err, step) from None
        except (KeyboardInterrupt, SystemExit):
            status = "KILLED"
            raise
        except CheckpointError as err:      # a failed save, agreed by every rank; its message names what is left
            status = "FAILED"
            raise RunFailed(f"at step {step}: {err}", every_rank=False) from None
        except Exception as err:
            status = "FAILED"
            raise failure(err, f"training failed at step {step}", self.rank, self.run_dir) from err
        finally:
            self.profiler.close()                       # a run that ends inside the window keeps its trace
            self.tracker.finish(status)
        return self.run_dir

    # ------------------------------------------------------------------ set up
    def set_up(self) -> None:
        """Data, resume point, engine (and the checkpoint loaded into it), metrics, tracking, throughput."""
        self.check_inputs()
        self.build_engine()
        checked(self.record_start)
        if self.rank == 0:
            rewound = rewind_metrics(self.run_dir, self.start_step)
            if rewound:
                log(f"metrics.jsonl: {rewound} record(s) past step {self.start_step} (trained again now) moved "
                    f"to metrics.rewound.jsonl")
        self.start_tracking()
        self.writer = CheckpointWriter(self.config.run.async_save)     # collective: its own process group
        self.engine.before_update(self.writer.fence)     # a live snapshot is written before the state changes
        self.meter = self.throughput_meter()
        self.guard = self.engine.guard.guard
        self.profiler = StepProfiler(self.config.run.profile_steps, self.run_dir, self.rank, self.device, log)

    def check_inputs(self) -> None:
        """Every rank agrees the data, the memory estimate and the resume point are usable before building."""
        config, layout, d = self.config, self.layout, self.config.data
        dp_rank = init_model_parallel(layout)
        data = checked(check_data, config, verify_checksums=self.rank == 0, log=log)
        self.streams = checked(build_streams, data.train, d, dp_size=layout.data, dp_rank=dp_rank)
        self.bits_per_char = data.tokenizer.kind == "byte"
        self.valid = data.valid              # loaded once here, scored at every evaluation
        if isinstance(data.train, list):
            log(mixture_report(self.streams, config.run.steps))
        estimate = checked(check_memory, config, layout, self.device)
        log(f"layout: {layout.describe()}; {config.model.n_layer} layers, d_model {config.model.d_model}, "
            f"variant {config.model.variant}; {self.streams.steps_per_epoch} steps per epoch; memory estimate "
            f"{estimate.describe()}")
        self.resume_from = checked(find_resume_checkpoint, self.run_dir, config.run.resume, log=log)
        self.restart_streams = self.resume_from is not None and checked(check_data_on_resume, self.resume_from,
                                                                        config, log=log)
        self.stop = StopSignal()

    def record_start(self) -> None:
        """Rank 0, once every start-up check has passed: the previous run moved aside (run.overwrite) and
        config.yaml written. Only an accepted start changes the run directory; a refused one (data, model,
        settings) leaves it as it was."""
        if self.rank == 0:
            replace_previous_run(self.config, self.run_dir)
            self.config.save(self.run_dir / "config.yaml")

    def build_engine(self) -> None:
        """The engine for the layout; on resume, the checkpoint loaded into it and changed settings applied."""
        # DeepSpeed and megatron-core load here, after run() has imported DeepSpeed without its autotuner's mlflow
        # (pretrain/library_imports.py), and never for --dry-run.
        from .engines import build_engine
        config = self.config
        try:
            self.engine = build_engine(config, self.layout, config.model.vocab_size, self.device)
            log(f"model: {sum(p.numel() for p in self.engine.module.parameters()):,} parameters on this rank")
            if self.resume_from is not None:
                meta = load_checkpoint(self.resume_from, engine=self.engine, streams=self.streams,
                                       layout=self.layout, log=log, restore_streams=not self.restart_streams)
                self.start_step = meta["step"]
                checked(apply_changed_settings, self.resume_from, config, self.engine, log=log)
                log(f"resumed from {self.resume_from} at step {self.start_step}")
        except USER_ERRORS:
            raise
        except Exception as err:
            raise failure(err, "start-up failed", self.rank, self.run_dir) from err

    def start_tracking(self) -> None:
        config, run_dir = self.config, self.run_dir
        loggers = resolve_loggers(config.run.loggers, config.run.mlflow)
        self.tracker = Tracker(run_dir, run_name=run_dir.name, enabled=self.rank == 0, mlflow="mlflow" in loggers,
                               connect_timeout_s=config.run.mlflow_connect_timeout_s,
                               loggers=[name for name in loggers if name != "mlflow"])
        self.run_id = checked(self.tracker.start, config.flat(), resume=self.resume_from is not None)
        if self.rank == 0 and self.resume_from is None:
            self.tracker.log_artifact(run_dir / "config.yaml")
            self.tracker.log_artifacts(config.data.tokenizer, "tokenizer")

    def throughput_meter(self):
        m, d, config = self.config.model, self.config.data, self.config
        return ThroughputMeter(
            StepShape(m.n_layer, m.d_model, m.d_inner, m.vocab_size, d.tgt_len, d.mem_len,
                      lookahead=variant_traits(m.variant).looks_ahead),
            micro_batch_size=d.micro_batch_size, forward_calls_per_step=self.layout.data * d.micro_batches,
            n_devices=self.world, peak_tflops=resolve_peak_tflops(config.run.peak_tflops or None, self.device,
                                                                  config.parallel.precision),
            recompute=config.parallel.recompute, warmup_steps=2, device=self.device)

    # ------------------------------------------------------------------ one step
    def step(self, step: int) -> bool:
        """Train one optimizer step and do what follows it; True when the run stops here (checkpoint saved)."""
        config, guard = self.config, self.guard
        forget = span_memory_reset(self.streams, config.data)   # every rank decides alike from the loader state
        if forget is not None:                                 # the rows beginning a span (pipelined: each stage
            self.engine.reset_memory(forget)                   # empties them in its own store)
        self.meter.begin()
        result = self.engine.train_step(self.streams.next_step())
        self.meter.end(mem_len=min(config.data.mem_len, (step - 1) * config.data.tgt_len))
        data_counts = data_metrics(self.streams, config.data.train)
        verdict = self.engine.guard.last
        skipped = verdict is not None and verdict.skipped
        metrics = {"loss": result.loss, "ppl": math.exp(result.loss) if result.loss < 100 else float("inf"),
                   "lr": result.lr, "grad_norm": result.grad_norm, **self.meter.interval_metrics(),
                   "tokens_per_s": result.tokens / result.seconds, "step_time_s": result.seconds, **data_counts}
        if skipped or guard.skipped_total:
            metrics["skipped_steps"] = guard.skipped_total + (1 if skipped else 0)
        if skipped:
            log(f"warning: step {step} skipped ({verdict.reason}); weights unchanged "
                f"[{guard.consecutive + 1} in a row, run.max_bad_steps={guard.max_bad_steps}]")
        if not skipped:
            metrics.update(self.maybe_evaluate(step))
        self.tracker.log_metrics(step, metrics)
        if verdict is not None:
            guard.record(step, verdict)        # raises DivergenceError after max_bad_steps in a row
        if not skipped:
            self.confirm()
        if step % config.run.log_interval == 0 or step == self.start_step + 1 or step == config.run.steps:
            shown = {k: v for k, v in metrics.items() if not k.startswith("data/")}   # per source: metrics.jsonl
            log(format_console_line(step, shown, total_steps=config.run.steps))
        stopping = self.should_stop(step)
        self.maybe_save(step, stopping=stopping, skipped=skipped)
        if stopping:
            log(f"stopping at step {step}" + (f" on signal {self.stop.received}" if self.stop.received else "")
                + ": checkpoint saved, exiting cleanly")
        return stopping

    def maybe_evaluate(self, step: int) -> dict:
        """Validation metrics every run.eval_interval steps (the last step's come from ``finish``)."""
        every = self.config.run.eval_interval
        if every and step % every == 0 and step < self.config.run.steps:
            return evaluate_validation(self.engine, self.config, self.valid, bits_per_char=self.bits_per_char) or {}
        return {}

    def should_stop(self, step: int) -> bool:
        """Collective: a stop signal on any rank, or run.exit_after steps run in this process."""
        exit_after = self.config.run.exit_after
        return bool(self.stop.agreed() or (exit_after and step - self.start_step >= exit_after))

    def maybe_save(self, step: int, *, stopping: bool, skipped: bool) -> None:
        """A checkpoint when stopping, every run.save_interval accepted steps, and after the last step (before
        the final evaluation and export). With run.async_save the loop goes on while it is written (one save in
        flight; the one before exit is waited for); every rank learns that a save is over at the same step. One
        extra is kept until the next accepted step confirms the newest (pretrain/divergence.py)."""
        config = self.config
        self.conclude(self.writer.poll())
        interval = config.run.save_interval and step % config.run.save_interval == 0
        if stopping or (interval and not skipped) or step == config.run.steps:
            began = time.perf_counter()
            self.conclude(self.writer.wait())
            waited = time.perf_counter() - began
            start_save(engine=self.engine, streams=self.streams, config=config, step=step, layout=self.layout,
                       tracker_run_id=self.run_id, writer=self.writer)
            if stopping or step == config.run.steps or not config.run.async_save:
                self.conclude(self.writer.wait())
            elif step % config.run.log_interval == 0:
                log(f"checkpoint of step {step}: the loop waited {waited:.2f} s for the previous save and "
                    f"{time.perf_counter() - began - waited:.2f} s for the snapshot; writing in the background")

    def conclude(self, outcome) -> None:
        """A save that is over on every rank: pruning after it (the newest kept unconfirmed), or its failure."""
        if outcome is not None:
            conclude_save(outcome, config=self.config, keep=self.config.run.keep_checkpoints + 1, log=log)
            self.unconfirmed = True

    def confirm(self) -> None:
        """An accepted step confirms the newest checkpoint: the extra one kept for it can go."""
        if self.unconfirmed and self.rank == 0:
            rotate_checkpoints(self.run_dir, self.config.run.keep_checkpoints)
        self.unconfirmed = False

    # ------------------------------------------------------------------ end
    def finish(self) -> None:
        """After the last step: the final validation, the last confirmation, the export."""
        final_eval = evaluate_validation(self.engine, self.config, self.valid, bits_per_char=self.bits_per_char)
        if final_eval:
            self.tracker.log_metrics(self.config.run.steps, final_eval)
            log(f"validation: loss {final_eval['eval_loss']:.4f} | ppl {final_eval['eval_ppl']:.2f}")
        self.confirm()
        out = export_final(self.run_dir)
        log(f"exported {out}")

    def diverged(self, err: BaseException, step: int) -> RunFailed:
        """Divergence (exit code 3): checkpoints written since the trouble began are quarantined, nothing is
        exported, the tracker is tagged."""
        note = ""
        self.writer.wait()          # a save in flight is sealed or removed before anything is moved
        if self.rank == 0 and self.guard.first_bad_step is not None:
            moved = quarantine_checkpoints(self.run_dir, self.guard.first_bad_step - 1)
            if moved:
                note = (f"; checkpoints written since the trouble began moved to "
                        f"{moved[0].parent} ({', '.join(p.name for p in moved)})")
        if dist.is_initialized():
            dist.barrier()
        self.tracker.set_tags({"lamemo.diverged_at_step": step, "lamemo.divergence": str(err)[:4000]})
        return RunFailed(f"{err}; nothing exported{note}; {newest_checkpoint_note(self.run_dir)}", exit_code=3,
                         every_rank=False)
