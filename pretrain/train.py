"""Entry point: ``python -m pretrain.train --config CONFIG [section.key=value ...]``.

One process directly, or N processes under torchrun / srun (data parallel = world / (tensor x pipeline)).
Every optimizer step appends one JSON object to ``<run.dir>/metrics.jsonl``.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lamemo_parallel import ConfigError
from lamemo_parallel.config import variant_traits
from lamemo_parallel.flops import StepShape

from .cli_args import OneLineParser
from .config import TrainConfig, TrainConfigError, load_config
from .checkpoint import CheckpointError
from .data.errors import DataError
from .distributed import init_distributed
from .layout import Layout, resolve_layout
from .preflight import agree


def log(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def resolve_device(config: TrainConfig) -> torch.device:
    wanted = config.run.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise TrainConfigError("run.device=cuda but no GPU is visible")
    return torch.device("cuda" if (wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available())) else "cpu")


def init_model_parallel(layout: Layout) -> int:
    """megatron-core's process groups (tensor, pipeline, data); returns this rank's data-parallel rank."""
    if layout.tensor == 1 and layout.pipeline == 1:
        return dist.get_rank()
    from megatron.core import parallel_state
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=layout.tensor,
                                                 pipeline_model_parallel_size=layout.pipeline)
    return parallel_state.get_data_parallel_rank()


def evaluate_validation(engine, config: TrainConfig) -> dict | None:
    """Validation loss of the current weights with streaming memory, through the parallel model: every stage
    and TP rank takes part, each data-parallel rank scores its own ``run.eval_batch_size`` streams (the
    single-device evaluation with batch size eval_batch_size x DP), and the sums are all-reduced over the
    data-parallel group. The result is the same on every rank."""
    if not config.data.valid:
        return None
    from .data.indexed import load_tokens
    from .evaluation import EvalResult, rank_streams
    tokens = torch.from_numpy(load_tokens(config.data.valid).astype("int64"))
    if config.run.eval_tokens:
        tokens = tokens[:config.run.eval_tokens + 1]
    mem_len = config.data.eval_mem_len if config.data.eval_mem_len is not None else config.data.mem_len
    dp_size = engine.layout.data
    streams = rank_streams(tokens, config.run.eval_batch_size, dp_size, engine.dp_rank)
    local = engine.evaluate(streams, tgt_len=config.data.tgt_len, mem_len=mem_len)
    sums = torch.tensor([local.nll_sum, float(local.n_tokens)], dtype=torch.float64, device=engine.device)
    if dp_size > 1:
        dist.all_reduce(sums, group=engine.dp_group)
    r = EvalResult(nll_sum=sums[0].item(), n_tokens=int(sums[1].item()))
    return {"eval_loss": r.loss, "eval_ppl": r.perplexity, "eval_bits_per_token": r.bits_per_token,
            "eval_tokens": r.n_tokens}


def export_final(run_dir: Path) -> Path:
    """``run_dir/final``: the newest checkpoint (the last step's, saved just before) exported offline from its
    shards by rank 0, as ``tools/export_checkpoint.py`` does. The other ranks do not wait for it (no
    barrier to time out on a long export)."""
    from .checkpoint.export import export_checkpoint
    out = run_dir / "final"
    if dist.get_rank() == 0:
        export_checkpoint(run_dir, out, overwrite=True)
    return out


def set_cpu_threads(device: torch.device) -> None:
    """One process per core share on CPU: oversubscribed OpenMP threads make every op wait for a
    descheduled thread (measured: 200x slower steps on 2 cores). OMP_NUM_THREADS, when set, wins."""
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


class StopSignal:
    """SIGUSR1 / SIGTERM / a first Ctrl-C (SIGINT) ask for a checkpoint and a clean exit (so a scheduler can
    requeue the job); a second Ctrl-C stops at once. Ranks agree on stopping through a tiny all-reduce after
    each step."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            print("interrupt: saving a checkpoint at the end of this step (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
        self.received = signum

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


class RunFailed(RuntimeError):
    """A failure after start-up, already worded for the user (names the newest complete checkpoint).
    ``exit_code``: 3 divergence, 1 anything else."""

    def __init__(self, message: str, exit_code: int = 1, every_rank: bool = True):
        super().__init__(message)
        self.exit_code = exit_code
        self.every_rank = every_rank     # False: every rank knows it (a collective decision), rank 0 says it


def newest_checkpoint_note(run_dir: Path) -> str:
    """Where the run can continue from. Not collective (a failing rank may be alone): the newest checkpoint with
    a completion marker; resuming verifies it and falls back past a damaged one."""
    from .checkpoint import complete_checkpoints
    try:
        found = complete_checkpoints(run_dir)
    except OSError:                        # the note must never hide the original failure
        found = []
    ckpt = found[0] if found else None
    if ckpt is None:
        return f"no complete checkpoint in {run_dir / 'checkpoints'}"
    return f"newest complete checkpoint: {ckpt} (the same command resumes from it)"


def failure(err: BaseException, what: str, rank: int, run_dir: Path) -> RunFailed:
    """An unexpected exception as one line; its traceback goes to ``<run.dir>/error-rank<R>.log``."""
    import traceback
    trace = run_dir / f"error-rank{rank}.log"
    try:
        trace.write_text(traceback.format_exc())
        where = f"traceback in {trace}"
    except OSError:
        where = "traceback not saved"
    return RunFailed(f"{what} on rank {rank}: {type(err).__name__}: {' '.join(str(err).split())[:500]} "
                     f"({where}); {newest_checkpoint_note(run_dir)}")


def claim_run_dir(config: TrainConfig, run_dir: Path, lock) -> None:
    """Rank 0: take the run directory's lock and apply the reuse rules (run.resume=never / run.overwrite)."""
    from .run_lock import has_previous_run, move_previous_run_aside
    try:
        lock.acquire(log=log)
    except OSError as err:
        raise TrainConfigError(f"run.dir={run_dir} cannot be used as the run directory ({err.strerror}: "
                               f"{err.filename})") from None
    if config.run.resume != "never":
        return
    previous = has_previous_run(run_dir)
    if not previous:
        return
    if not config.run.overwrite:
        raise TrainConfigError(f"run.dir={run_dir} already holds a run ({', '.join(previous)}) and "
                               f"run.resume=never: set run.overwrite=true to move it aside and start fresh, "
                               f"run.resume=auto to continue it, or choose another run.dir")
    moved = move_previous_run_aside(run_dir)
    log(f"run.overwrite: moved the previous run in {run_dir} to {moved}")


def checked(action, *args, **kwargs):
    """Run a start-up check on every rank; a problem on any rank stops all of them with one message."""
    from .run_lock import RunLockError
    from .tracking import TrackingError
    result, problem = None, None
    try:
        result = action(*args, **kwargs)
    except (TrainConfigError, DataError, ConfigError, CheckpointError, RunLockError, TrackingError,
            OSError) as err:
        problem = str(err)
    agree(problem)
    return result


def dry_run(config: TrainConfig) -> int:
    """--dry-run: every start-up check and the report, no process group, no engine, nothing written."""
    from .data.streams import SegmentStreams
    from .preflight import check_data, check_memory, dry_run_report, estimate_memory
    device = resolve_device(config)
    layout = resolve_layout(config, int(os.environ.get("WORLD_SIZE", "1")), cuda=device.type == "cuda")
    data = check_data(config, verify_checksums=False)
    d = config.data
    streams = SegmentStreams(data.train, tgt_len=d.tgt_len, dp_size=layout.data, dp_rank=0,
                             micro_batches=d.micro_batches, micro_batch_size=d.micro_batch_size,
                             roll_seed=d.roll_seed)
    estimate = estimate_memory(config, layout)
    if int(os.environ.get("RANK", "0")) == 0:
        print(dry_run_report(config, layout, estimate, streams.steps_per_epoch, device), flush=True)
    check_memory(config, layout, device)
    return 0


def run(config: TrainConfig) -> Path:
    from .deepspeed_import import import_deepspeed
    from .run_lock import RunLock
    import_deepspeed(tracking=config.run.mlflow)
    device = resolve_device(config)
    set_cpu_threads(device)
    rank, world = init_distributed(device)
    layout = resolve_layout(config, world, cuda=device.type == "cuda")
    run_dir = Path(config.run.dir)
    lock = RunLock(run_dir)          # held by global rank 0 for the trainer's life (pretrain/run_lock.py)
    try:
        checked(lambda: claim_run_dir(config, run_dir, lock) if rank == 0 else None)
        return _run(config, device, rank, world, layout, run_dir)
    finally:
        lock.release()


def _run(config: TrainConfig, device, rank: int, world: int, layout: Layout, run_dir: Path) -> Path:
    from .data.streams import SegmentStreams
    from .preflight import check_data, check_memory
    dp_rank = init_model_parallel(layout)
    data = checked(check_data, config, verify_checksums=rank == 0, log=log)
    d = config.data
    streams = checked(SegmentStreams, data.train, tgt_len=d.tgt_len, dp_size=layout.data, dp_rank=dp_rank,
                      micro_batches=d.micro_batches, micro_batch_size=d.micro_batch_size, roll_seed=d.roll_seed)
    estimate = checked(check_memory, config, layout, device)
    log(f"layout: {layout.describe()}; {config.model.n_layer} layers, d_model {config.model.d_model}, "
        f"variant {config.model.variant}; {streams.steps_per_epoch} steps per epoch; memory estimate "
        f"{estimate.describe()}")

    from .checkpoint import find_resume_checkpoint, load_checkpoint, save_checkpoint
    resume_from = checked(find_resume_checkpoint, run_dir, config.run.resume, log=log)
    checked(lambda: config.save(run_dir / "config.yaml") if rank == 0 else None)
    stop = StopSignal()

    from .divergence import DivergenceError, prune_checkpoints, quarantine_checkpoints
    from .engines import build_engine
    from .resume_settings import apply_changed_settings
    from .run_lock import rewind_metrics
    from .throughput import ThroughputMeter, format_console_line, resolve_peak_tflops
    from .tracking import Tracker
    start_step, run_id = 0, None
    try:
        engine = build_engine(config, layout, config.model.vocab_size, device)
        log(f"model: {sum(p.numel() for p in engine.module.parameters()):,} parameters on this rank")
        if resume_from is not None:
            meta = load_checkpoint(resume_from, engine=engine, streams=streams, layout=layout, log=log)
            start_step = meta["step"]
            checked(apply_changed_settings, resume_from, config, engine, log=log)
            log(f"resumed from {resume_from} at step {start_step}")
    except (TrainConfigError, DataError, ConfigError, CheckpointError):
        raise
    except Exception as err:
        raise failure(err, "start-up failed", rank, run_dir) from err
    if rank == 0:
        rewound = rewind_metrics(run_dir, start_step)
        if rewound:
            log(f"metrics.jsonl: {rewound} record(s) past step {start_step} (trained again now) moved to "
                f"metrics.rewound.jsonl")

    tracker = Tracker(run_dir, run_name=run_dir.name, enabled=rank == 0, mlflow=config.run.mlflow,
                      connect_timeout_s=config.run.mlflow_connect_timeout_s)
    run_id = checked(tracker.start, config.flat(), resume=resume_from is not None)
    if rank == 0 and resume_from is None:
        tracker.log_artifact(run_dir / "config.yaml")
        tracker.log_artifacts(config.data.tokenizer, "tokenizer")
    m = config.model
    meter = ThroughputMeter(
        StepShape(m.n_layer, m.d_model, m.d_inner, m.vocab_size, config.data.tgt_len, config.data.mem_len,
                  lookahead=variant_traits(m.variant).looks_ahead),
        micro_batch_size=config.data.micro_batch_size, forward_calls_per_step=layout.data * config.data.micro_batches,
        n_devices=world, peak_tflops=resolve_peak_tflops(config.run.peak_tflops or None, device,
                                                         config.parallel.precision),
        recompute=config.parallel.activation_checkpointing, warmup_steps=2, device=device)
    keep = config.run.keep_checkpoints
    guard = engine.guard.guard
    unconfirmed = False        # the newest checkpoint's update has not yet been followed by an accepted step

    def checkpoint(step):
        nonlocal unconfirmed
        # One extra is kept until the next accepted step confirms the newest (pretrain/divergence.py).
        save_checkpoint(engine=engine, streams=streams, config=config, step=step, layout=layout,
                        tracker_run_id=run_id, keep=keep + 1, log=log)
        unconfirmed = True

    def confirm():
        nonlocal unconfirmed
        if unconfirmed and rank == 0:
            prune_checkpoints(run_dir, keep)
        unconfirmed = False

    status, step = "FINISHED", start_step
    try:
        for step in range(start_step + 1, config.run.steps + 1):
            meter.begin()
            result = engine.train_step(streams.next_step())
            meter.end(mem_len=min(config.data.mem_len, (step - 1) * config.data.tgt_len))
            verdict = engine.guard.last
            skipped = verdict is not None and verdict.skipped
            metrics = {"loss": result.loss, "ppl": math.exp(result.loss) if result.loss < 100 else float("inf"), "lr": result.lr, "grad_norm": result.grad_norm,
                       **meter.interval_metrics(), "tokens_per_s": result.tokens / result.seconds,
                       "step_time_s": result.seconds}
            if skipped or guard.skipped_total:
                metrics["skipped_steps"] = guard.skipped_total + (1 if skipped else 0)
            if skipped:
                log(f"warning: step {step} skipped ({verdict.reason}); weights unchanged "
                    f"[{guard.consecutive + 1} in a row, run.max_bad_steps={guard.max_bad_steps}]")
            if not skipped and config.run.eval_interval and step % config.run.eval_interval == 0 \
                    and step < config.run.steps:
                metrics.update(evaluate_validation(engine, config) or {})
            tracker.log_metrics(step, metrics)
            if verdict is not None:
                guard.record(step, verdict)        # raises DivergenceError after max_bad_steps in a row
            if not skipped:
                confirm()
            if step % config.run.log_interval == 0 or step == start_step + 1 or step == config.run.steps:
                log(format_console_line(step, metrics, total_steps=config.run.steps))
            ran = step - start_step
            stopping = stop.agreed() or (config.run.exit_after and ran >= config.run.exit_after)
            interval = config.run.save_interval and step % config.run.save_interval == 0
            if stopping or (interval and not skipped) or step == config.run.steps:
                checkpoint(step)           # the last step's checkpoint comes before evaluation and export
            if stopping:
                status = "KILLED"
                log(f"stopping at step {step}" + (f" on signal {stop.received}" if stop.received else "")
                    + ": checkpoint saved, exiting cleanly")
                return run_dir
        final_eval = evaluate_validation(engine, config)
        if final_eval:
            tracker.log_metrics(config.run.steps, final_eval)
            log(f"validation: loss {final_eval['eval_loss']:.4f} | ppl {final_eval['eval_ppl']:.2f}")
        confirm()
        out = export_final(run_dir)
        log(f"exported {out}")
    except DivergenceError as err:
        status = "FAILED"
        note = ""
        if rank == 0 and guard.first_bad_step is not None:
            moved = quarantine_checkpoints(run_dir, guard.first_bad_step - 1)
            if moved:
                note = (f"; checkpoints written since the trouble began moved to "
                        f"{moved[0].parent} ({', '.join(p.name for p in moved)})")
        if dist.is_initialized():
            dist.barrier()
        tracker.set_tags({"lamemo.diverged_at_step": step, "lamemo.divergence": str(err)[:4000]})
        raise RunFailed(f"{err}; nothing exported{note}; {newest_checkpoint_note(run_dir)}", exit_code=3,
                        every_rank=False) from None
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    except CheckpointError as err:      # a failed save, agreed by every rank; its message names what is left
        status = "FAILED"
        raise RunFailed(f"at step {step}: {err}", every_rank=False) from None
    except Exception as err:
        status = "FAILED"
        raise failure(err, f"training failed at step {step}", rank, run_dir) from err
    finally:
        tracker.finish(status)
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m pretrain.train", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file (see configs/)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything, print the resolved config, parameters and memory per rank, the "
                             "layout and steps per epoch, then exit (nothing is built or written)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. parallel.tensor=2")
    args = parser.parse_args(argv)
    code = 0
    try:
        config = load_config(args.config, args.overrides)
        if args.dry_run:
            return dry_run(config)
        run(config)
    except (TrainConfigError, DataError, ConfigError, CheckpointError, OSError) as err:
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        if rank == 0:
            print(f"error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        code = 2
    except RunFailed as err:          # after start-up: printed by every rank that saw it
        if err.every_rank or not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        code = err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; " + "the newest complete checkpoint is kept", file=sys.stderr, flush=True)
        code = 130
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
