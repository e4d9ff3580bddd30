"""The README's main job: a small, real LaMemo pretraining on CPU, end to end, with no download.

    python -m pretrain.demo [--steps 300] [--workdir runs] [section.key=value ...]

1. Demo corpus: the Python standard library's own source files (present wherever Python is), split into
   train / valid / test text (pretrain.data.demo_corpus).
2. A sentencepiece BPE tokenizer trained on the train split.
3. Preprocessing into memory-mapped token files.
4. Training with configs/tiny-cpu.yaml (DeepSpeed engine, MLflow tracking into a local SQLite store).
5. Export of the newest checkpoint to a single-device directory and evaluation of it on the test split.
Steps 1-3 are skipped when their outputs already exist.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from .cli_args import OneLineParser, positive_int
from .data.demo_corpus import write_demo_corpus
from .data.errors import DataError
from .data.indexed import load_tokens, preprocess
from .data.tokenizer import tokenizer_description, train_tokenizer
from .progress import progress

ROOT = Path(__file__).resolve().parents[1]


def prepare_data(data_dir: Path, vocab_size: int) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    texts = write_demo_corpus(data_dir / "text")
    tokenizer_dir = data_dir / "tokenizer"
    if tokenizer_description(tokenizer_dir) is None:
        print(f"[demo] training a {vocab_size}-piece BPE tokenizer on {texts['train']}", flush=True)
        train_tokenizer("bpe", [texts["train"]], tokenizer_dir, vocab_size=vocab_size)
    for split in ("train", "valid", "test"):
        print(f"[demo] preprocessing {split}", flush=True)
        preprocess([texts[split]], tokenizer_dir, data_dir / split, workers=2)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m pretrain.demo", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs", help="where data and the run go (default: runs/)")
    parser.add_argument("--steps", type=positive_int, default=1500, help="optimizer steps (default 1500: a few minutes)")
    parser.add_argument("--vocab-size", type=positive_int, default=2048)
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides for the trainer")
    args = parser.parse_args(argv)

    # torch, the trainer and the model load once the arguments are read: --help and a bad argument answer at once
    import torch
    from lamemo_parallel import LaMemoModel
    from lamemo_parallel.inference import evaluate_tokens
    from .checkpoint.export import export_checkpoint
    from .config import TrainConfigError, load_config
    from .trainer import run
    workdir = Path(args.workdir)
    data_dir = workdir / "demo-data"
    try:
        prepare_data(data_dir, args.vocab_size)
        overrides = [f"data.train={data_dir / 'train'}", f"data.valid={data_dir / 'valid'}",
                     f"data.tokenizer={data_dir / 'tokenizer'}", f"run.dir={workdir / 'demo'}",
                     f"run.steps={args.steps}", "run.log_interval=50", "run.eval_tokens=20000",
                     # a somewhat larger model than configs/tiny-cpu.yaml's (which is sized for 4 processes)
                     "model.d_model=128", "model.n_head=4", "model.d_inner=512", "data.tgt_len=64",
                     "data.mem_len=64", "model.dropout=0.1",
                     f"run.save_interval={max(args.steps // 2, 1)}", *args.overrides]
        config = load_config(ROOT / "configs" / "tiny-cpu.yaml", overrides)
        run_dir = run(config)
    except (TrainConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    export = run_dir / "export"
    export_checkpoint(run_dir, export, overwrite=True, show_progress=True)       # the newest checkpoint -> single-device format
    print(f"[demo] exported the newest checkpoint of {run_dir} to {export}", flush=True)
    model = LaMemoModel.from_pretrained(export)
    tokens = torch.from_numpy(load_tokens(data_dir / "test").astype("int64"))[:20001]
    result = evaluate_tokens(model, tokens, tgt_len=config.data.tgt_len, mem_len=config.data.mem_len,
                             progress=functools.partial(progress, desc="evaluate", unit="segment"))
    print(f"[demo] exported model {export}: test loss {result.loss:.4f} nats/token, perplexity "
          f"{result.perplexity:.2f} over {result.n_tokens} tokens", flush=True)
    print(f"[demo] metrics: {run_dir / 'metrics.jsonl'}; sample with: python tools/generate.py {export} "
          f"--prompt 'def main(' --max-new-tokens 60 --top-p 0.9", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
