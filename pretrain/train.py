"""Entry point: ``python -m pretrain.train --config CONFIG [section.key=value ...]``.

One process directly, or N processes under torchrun / srun (data parallel = world / (tensor x pipeline)).
Every optimizer step appends one JSON object to ``<run.dir>/metrics.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lamemo_parallel import ConfigError

from .config import TrainConfig, TrainConfigError, load_config
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
    from .data.tokenizer import load_tokenizer
    d = config.data
    if not d.tokenizer:
        raise TrainConfigError("data.tokenizer is not set (the directory written by tools/train_tokenizer.py)")
    if not d.train:
        raise TrainConfigError("data.train is not set (a prefix written by tools/preprocess_data.py)")
    tokenizer = load_tokenizer(d.tokenizer)
    if config.model.vocab_size == 0:
        config.model.vocab_size = tokenizer.vocab_size
    elif config.model.vocab_size != tokenizer.vocab_size:
        raise TrainConfigError(f"model.vocab_size={config.model.vocab_size} does not match the tokenizer in "
                               f"{d.tokenizer} ({tokenizer.vocab_size} entries)")
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
    """Validation loss of the current weights with streaming memory (rank 0 computes; all ranks gather)."""
    if not config.data.valid:
        return None
    from .data.indexed import load_tokens
    from .evaluation import evaluate_tokens
    model = engine.single_device_model()        # collective: every rank takes part in the gather
    result = None
    if dist.get_rank() == 0:
        tokens = torch.from_numpy(load_tokens(config.data.valid).astype("int64"))
        if config.run.eval_tokens:
            tokens = tokens[:config.run.eval_tokens + 1]
        mem_len = config.data.eval_mem_len if config.data.eval_mem_len is not None else config.data.mem_len
        r = evaluate_tokens(model.to(engine.device), tokens, tgt_len=config.data.tgt_len, mem_len=mem_len,
                            batch_size=1, device=engine.device)
        result = {"eval_loss": r.loss, "eval_ppl": r.perplexity, "eval_bits_per_token": r.bits_per_token,
                  "eval_tokens": r.n_tokens}
    dist.barrier()
    return result


def export_final(engine, config: TrainConfig, run_dir: Path) -> Path:
    """The final weights as a from_pretrained directory with the tokenizer beside them."""
    model = engine.single_device_model()
    out = run_dir / "final"
    if dist.get_rank() == 0:
        model.save_pretrained(out)
        shutil.copytree(config.data.tokenizer, out / "tokenizer", dirs_exist_ok=True)
    dist.barrier()
    return out


def set_cpu_threads(device: torch.device) -> None:
    """One process per core share on CPU: oversubscribed OpenMP threads make every op wait for a
    descheduled thread (measured: 200x slower steps on 2 cores). OMP_NUM_THREADS, when set, wins."""
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


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

    from .engine import Engine
    engine = Engine(config, layout, config.model.vocab_size, device)
    log(f"model: {sum(p.numel() for p in engine.model.parameters()):,} parameters on this rank")
    metrics_path = run_dir / "metrics.jsonl"
    for step in range(1, config.run.steps + 1):
        result = engine.train_step(streams.next_step())
        if not math.isfinite(result.loss):
            raise FloatingPointError(f"loss became {result.loss} at step {step}")
        record = {"step": step, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                  "tokens_per_s": result.tokens / result.seconds, "step_time_s": result.seconds}
        if config.run.eval_interval and step % config.run.eval_interval == 0 and step < config.run.steps:
            record.update(evaluate_validation(engine, config) or {})
        if rank == 0:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if step % config.run.log_interval == 0 or step == 1 or step == config.run.steps:
                log(f"step {step:>6} | loss {result.loss:.4f} | lr {result.lr:.3e} | grad norm "
                    f"{result.grad_norm:.3f} | {record['tokens_per_s']:.0f} tok/s")
    final_eval = evaluate_validation(engine, config)
    if rank == 0 and final_eval:
        with metrics_path.open("a") as f:
            f.write(json.dumps({"step": config.run.steps, **final_eval}) + "\n")
        log(f"validation: loss {final_eval['eval_loss']:.4f} | ppl {final_eval['eval_ppl']:.2f}")
    out = export_final(engine, config, run_dir)
    log(f"exported {out}")
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
    except (TrainConfigError, DataError, ConfigError, FileNotFoundError) as err:
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
