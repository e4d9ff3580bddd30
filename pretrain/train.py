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
from lamemo_parallel.flops import StepShape

from .config import TrainConfig, TrainConfigError, load_config
from .checkpoint import CheckpointError
from .data.errors import DataError
from .distributed import init_distributed
from .layout import Layout, resolve_layout


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


def load_training_data(config: TrainConfig, layout: Layout, dp_rank: int):
    """Tokenizer, vocabulary check and the segment-recurrent streams; every problem stops before compute."""
    from .data.indexed import load_tokens
    from .data.streams import SegmentStreams
    from .data.tokenizer import check_vocab_matches, load_tokenizer
    d = config.data
    if not d.tokenizer:
        raise TrainConfigError("data.tokenizer is not set (the directory written by tools/train_tokenizer.py)")
    if not d.train:
        raise TrainConfigError("data.train is not set (a prefix written by tools/preprocess_data.py)")
    tokenizer = load_tokenizer(d.tokenizer)
    if config.model.vocab_size == 0:
        config.model.vocab_size = tokenizer.vocab_size
    check_vocab_matches(tokenizer, config.model.vocab_size)
    tokens = load_tokens(d.train)
    top = int(tokens.max()) if len(tokens) else -1
    if top >= tokenizer.vocab_size:
        raise TrainConfigError(f"{d.train} holds token id {top}, outside the tokenizer's vocabulary of "
                               f"{tokenizer.vocab_size}: was it preprocessed with another tokenizer?")
    streams = SegmentStreams(tokens, tgt_len=d.tgt_len, dp_size=layout.data, dp_rank=dp_rank,
                             micro_batches=d.micro_batches, micro_batch_size=d.micro_batch_size,
                             roll_seed=d.roll_seed)
    return tokenizer, streams


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
    """``run_dir/final``: the newest checkpoint (the last step's, saved just before) in the single-device format.
    Its weights were already merged when it was saved, so nothing is gathered again."""
    from .export import export_checkpoint
    out = run_dir / "final"
    if dist.get_rank() == 0:
        export_checkpoint(run_dir, out)
    dist.barrier()
    return out


def set_cpu_threads(device: torch.device) -> None:
    """One process per core share on CPU: oversubscribed OpenMP threads make every op wait for a
    descheduled thread (measured: 200x slower steps on 2 cores). OMP_NUM_THREADS, when set, wins."""
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


class StopSignal:
    """SIGUSR1 / SIGTERM ask for a checkpoint and a clean exit (so a scheduler can requeue the job).
    Ranks agree on stopping through a tiny all-reduce after each step."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def run(config: TrainConfig) -> Path:
    device = resolve_device(config)
    set_cpu_threads(device)
    rank, world = init_distributed(device)
    layout = resolve_layout(config, world, cuda=device.type == "cuda")
    dp_rank = init_model_parallel(layout)
    tokenizer, streams = load_training_data(config, layout, dp_rank)
    run_dir = Path(config.run.dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.yaml")
    log(f"layout: {layout.describe()}; {config.model.n_layer} layers, d_model {config.model.d_model}, "
        f"variant {config.model.variant}; {streams.steps_per_epoch} steps per epoch")
    stop = StopSignal()

    from .checkpoint import find_resume_checkpoint, load_checkpoint, save_checkpoint
    from .engine import build_engine
    from .throughput import ThroughputMeter, format_console_line, resolve_peak_tflops
    from .tracking import Tracker
    engine = build_engine(config, layout, config.model.vocab_size, device)
    log(f"model: {sum(p.numel() for p in engine.model.parameters()):,} parameters on this rank")

    start_step, run_id = 0, None
    resume_from = find_resume_checkpoint(run_dir, config.run.resume, log=log)
    if resume_from is not None:
        meta = load_checkpoint(resume_from, engine=engine, streams=streams, layout=layout, log=log)
        start_step = meta["step"]
        log(f"resumed from {resume_from} at step {start_step}")

    tracker = Tracker(run_dir, run_name=run_dir.name, enabled=rank == 0, mlflow=config.run.mlflow)
    run_id = tracker.start(config.flat(), resume=resume_from is not None)
    if rank == 0 and resume_from is None:
        tracker.log_artifact(run_dir / "config.yaml")
        tracker.log_artifacts(config.data.tokenizer, "tokenizer")
    m = config.model
    meter = ThroughputMeter(
        StepShape(m.n_layer, m.d_model, m.d_inner, m.vocab_size, config.data.tgt_len, config.data.mem_len,
                  lookahead=m.variant != 0),
        micro_batch_size=config.data.micro_batch_size, forward_calls_per_step=layout.data * config.data.micro_batches,
        n_devices=world, peak_tflops=resolve_peak_tflops(config.run.peak_tflops or None, device,
                                                         config.parallel.precision),
        recompute=config.parallel.activation_checkpointing, warmup_steps=2, device=device)

    def checkpoint(step):
        save_checkpoint(engine=engine, streams=streams, config=config, step=step, layout=layout,
                        tracker_run_id=run_id, keep=config.run.keep_checkpoints, log=log)

    status, step = "FINISHED", start_step
    try:
        for step in range(start_step + 1, config.run.steps + 1):
            meter.begin()
            result = engine.train_step(streams.next_step())
            meter.end(mem_len=min(config.data.mem_len, (step - 1) * config.data.tgt_len))
            if not math.isfinite(result.loss):
                raise FloatingPointError(f"loss became {result.loss} at step {step}")
            metrics = {"loss": result.loss, "ppl": math.exp(min(result.loss, 700.0)), "lr": result.lr,
                       "grad_norm": result.grad_norm, **meter.interval_metrics(),
                       "tokens_per_s": result.tokens / result.seconds, "step_time_s": result.seconds}
            if config.run.eval_interval and step % config.run.eval_interval == 0 and step < config.run.steps:
                metrics.update(evaluate_validation(engine, config) or {})
            tracker.log_metrics(step, metrics)
            if step % config.run.log_interval == 0 or step == start_step + 1 or step == config.run.steps:
                log(format_console_line(step, metrics, total_steps=config.run.steps))
            ran = step - start_step
            stopping = stop.agreed() or (config.run.exit_after and ran >= config.run.exit_after)
            if stopping or (config.run.save_interval and step % config.run.save_interval == 0):
                checkpoint(step)
            if stopping:
                status = "KILLED"
                log(f"stopping at step {step}" + (f" on signal {stop.received}" if stop.received else "")
                    + ": checkpoint saved, exiting cleanly")
                return run_dir
        final_eval = evaluate_validation(engine, config)
        if final_eval:
            tracker.log_metrics(config.run.steps, final_eval)
            log(f"validation: loss {final_eval['eval_loss']:.4f} | ppl {final_eval['eval_ppl']:.2f}")
        if start_step < config.run.steps and not (config.run.save_interval
                                                  and config.run.steps % config.run.save_interval == 0):
            checkpoint(config.run.steps)
        out = export_final(run_dir)
        log(f"exported {out}")
    except BaseException:
        status = "FAILED"
        raise
    finally:
        tracker.finish(status)
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. parallel.tensor=2")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        run(config)
    except (TrainConfigError, DataError, ConfigError, CheckpointError, FileNotFoundError) as err:
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 2
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
