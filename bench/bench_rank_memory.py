#!/usr/bin/env python
"""Per-rank peak memory (RSS) of a real training run, phase by phase: start-up, init, train, eval, save.

    flock /work/bigmem.lock .venv/bin/python bench/bench_rank_memory.py [--tensor 2 --pipeline 2] [--steps 3]

Two real ``torchrun -m pretrain.train``-equivalent launches with the same layout (default 4 gloo ranks, TP 2 x
PP 2): a ~110M-parameter LaMemo (d 1024, 8 layers, d_ff 4096, 16 heads, byte vocabulary) and a tiny one
(d 32, 8 layers, d_ff 64, 2 heads). Each run initialises, trains ``--steps`` steps, evaluates on the validation
split through the parallel model (at step steps - 1, before any save) and saves a checkpoint (then the trainer's
final evaluation and ``final/`` export run: 'after-save'). Every rank records its peak RSS per phase: the kernel's high-water mark (``VmHWM`` in /proc/self/status) read at the end of a phase and reset
(``/proc/self/clear_refs`` = 5) at its start. The table gives, per rank and phase, the big run's peak minus the
tiny run's, as a fraction of the big model's weights + gradients + Adam moments in fp32 (16 bytes / parameter).
Issue 10's acceptance: the worst rank's overall peak (max over phases) minus the tiny run's <= 0.40 x that.
Issue 26: the per-rank estimate that ``pretrain.train --dry-run`` prints for the same big run is printed next to
each rank's absolute peak (``--estimate-only``: the estimate alone, without the launches).

The worker mode (``--worker OUT``, one process per rank under torchrun) wraps the trainer's phase functions
(``pretrain.engines.build_engine``, ``PlainEngine.train_step``, ``pretrain.trainer.evaluate_validation``,
``pretrain.checkpoint.start_save``, ``pretrain.trainer.export_final``) and runs ``pretrain.train.main``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("startup", "init", "train", "eval", "save", "after-save")
BIG = {"model.d_model": 1024, "model.n_layer": 8, "model.d_inner": 4096, "model.n_head": 16}
TINY = {"model.d_model": 32, "model.n_layer": 8, "model.d_inner": 64, "model.n_head": 2}


# ---------------------------------------------------------------------------------------------- worker side
def _high_water_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _reset_high_water() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class PhaseMeter:
    """Peak RSS per phase: the high-water mark is read when a phase ends and reset when the next begins."""

    def __init__(self):
        self.current = "startup"
        self.saved = False
        self.peaks_kib = {name: 0 for name in PHASES}
        _reset_high_water()

    def switch(self, phase: str) -> None:
        self.peaks_kib[self.current] = max(self.peaks_kib[self.current], _high_water_kib())
        _reset_high_water()
        self.current = phase

    def wrap(self, function, phase: str, after: str | None = None):
        """``function`` runs as ``phase``; afterwards the phase it interrupted resumes. Once a save has run,
        everything else counts as 'after-save' (the trainer saves the last step before its final evaluation
        and export, and what the save leaves resident is the save's cost, not theirs)."""
        def wrapped(*args, **kwargs):
            before = self.current
            self.switch(phase if (phase == "save" or not self.saved) else "after-save")
            try:
                return function(*args, **kwargs)
            finally:
                self.saved = self.saved or phase == "save"
                self.switch("after-save" if self.saved else (after or before))
        return wrapped


def worker(out: Path, train_args: list[str]) -> int:
    meter = PhaseMeter()
    import pretrain.checkpoint as checkpoint
    import pretrain.engines as engine_module
    import pretrain.train as train
    import pretrain.trainer as trainer

    build = engine_module.build_engine

    def build_engine(*args, **kwargs):
        engine = build(*args, **kwargs)
        engine.train_step = meter.wrap(engine.train_step, "train")
        return engine

    engine_module.build_engine = meter.wrap(build_engine, "init", after="train")
    trainer.evaluate_validation = meter.wrap(trainer.evaluate_validation, "eval")
    # the trainer calls the name it imported: wrapped there (wrapping only the package's name left the
    # snapshot of an asynchronous save in the "train" phase)
    trainer.start_save = checkpoint.start_save = meter.wrap(checkpoint.start_save, "save")
    trainer.export_final = meter.wrap(trainer.export_final, "save")
    code = train.main(train_args)
    meter.switch("after-save")
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rank{rank}.json").write_text(json.dumps({"peaks_kib": meter.peaks_kib, "code": code}))
    return code


# ---------------------------------------------------------------------------------------------- driver side
def prepare_data(work: Path) -> Path:
    """A byte-level token file of Tiny Shakespeare (the test corpus shipped in tests/data)."""
    import lzma

    from pretrain.data.indexed import preprocess
    from pretrain.data.tokenizer import train_tokenizer
    text = lzma.open(ROOT / "tests" / "data" / "tinyshakespeare" / "input.txt.xz", "rt").read()[:200000]
    (work / "train.txt").write_text(text)
    train_tokenizer("byte", [work / "train.txt"], work / "tok")
    preprocess([work / "train.txt"], work / "tok", work / "train", workers=1)
    return work


def model_parameters(sizes: dict, vocab: int = 257) -> int:
    from lamemo_parallel import LaMemoConfig
    from lamemo_parallel.sharding import sharding_table
    config = LaMemoConfig(vocab_size=vocab, n_layer=sizes["model.n_layer"], d_model=sizes["model.d_model"],
                          n_head=sizes["model.n_head"], d_inner=sizes["model.d_inner"])
    total = 0
    for entry in sharding_table(config).values():
        n = 1
        for s in entry.shape:
            n *= s
        total += n
    return total


def train_args(sizes: dict, args, data: Path, run_dir: Path) -> list[str]:
    """The trainer's command line of one run (the measured launches and the dry run share it)."""
    return ["--config", str(ROOT / "configs" / "tiny-cpu.yaml"), f"data.train={data / 'train'}",
                  f"data.valid={data / 'train'}", f"data.tokenizer={data / 'tok'}", f"run.dir={run_dir}",
                  f"run.steps={args.steps}", "run.mlflow=false", "run.resume=never", f"run.eval_interval={args.steps - 1}",
                  f"run.eval_tokens={args.eval_tokens}", "run.eval_batch_size=2", "data.tgt_len=32",
                  "data.mem_len=32", "data.micro_batch_size=1", "data.micro_batches=2", "model.dropout=0.0",
                  f"parallel.tensor={args.tensor}", f"parallel.pipeline={args.pipeline}",
                  f"parallel.zero_stage={args.zero_stage}", *[f"{k}={v}" for k, v in sizes.items()]]


def launch(sizes: dict, args, data: Path, run_dir: Path, out: Path) -> dict[int, dict]:
    from pretrain.distributed import free_port
    world = args.tensor * args.pipeline * args.data_parallel
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(Path(__file__).resolve()), "--worker", str(out), "--",
           *train_args(sizes, args, data, run_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode:
        raise RuntimeError(f"run failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(world)}


def dry_run_estimate_gib(sizes: dict, args, data: Path, run_dir: Path) -> float:
    """The per-rank estimate that ``pretrain.train --dry-run`` prints for the same run (one process, told the
    world size the launcher would give it)."""
    world = args.tensor * args.pipeline * args.data_parallel
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WORLD_SIZE=str(world))
    result = subprocess.run([sys.executable, "-m", "pretrain.train", "--dry-run", *train_args(sizes, args, data, run_dir)],
                            capture_output=True, text=True, cwd=ROOT, env=env)
    found = re.search(r"memory estimate: ([0-9.]+) GiB per rank", result.stdout)
    if result.returncode or not found:
        raise RuntimeError(f"dry run failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return float(found.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--tensor", type=int, default=2)
    p.add_argument("--pipeline", type=int, default=2)
    p.add_argument("--data-parallel", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--eval-tokens", type=int, default=512)
    p.add_argument("--estimate-only", action="store_true",
                   help="print only --dry-run's per-rank estimate for the big run (no launch)")
    args, rest = p.parse_known_args()
    if args.worker:
        return worker(Path(args.worker), [a for a in rest if a != "--"])

    params = model_parameters(BIG)
    budget_kib = 16 * params / 1024
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = prepare_data(tmp)
        estimate = dry_run_estimate_gib(BIG, args, data, tmp / "big-run")
        layout = f"(TP, PP, DP) = ({args.tensor}, {args.pipeline}, {args.data_parallel}), ZeRO {args.zero_stage}"
        if args.estimate_only:
            print(f"{layout}: --dry-run estimate {estimate:.2f} GiB per rank")
            return 0
        tiny = launch(TINY, args, data, tmp / "tiny-run", tmp / "tiny")
        big = launch(BIG, args, data, tmp / "big-run", tmp / "big")
    print(f"{layout}; big model {params:,} parameters, 16 B/param = {budget_kib / 1024 ** 2:.2f} GiB; "
          f"{args.steps} steps, eval {args.eval_tokens} tokens, one save")
    print("peak RSS of the big run minus the tiny run, per phase, as a fraction of 16 B x parameters "
          "(MiB in brackets: big / tiny)")
    print("| rank | " + " | ".join(PHASES) + " | overall |")
    print("|---" * (len(PHASES) + 2) + "|")
    worst = 0.0
    for rank in sorted(big):
        cells = []
        for phase in PHASES:
            b, t = big[rank]["peaks_kib"][phase], tiny[rank]["peaks_kib"][phase]
            cells.append(f"{(b - t) / budget_kib:.3f} ({b / 1024:.0f} / {t / 1024:.0f})")
        b, t = max(big[rank]["peaks_kib"].values()), max(tiny[rank]["peaks_kib"].values())
        ratio = (b - t) / budget_kib
        worst = max(worst, ratio)
        print(f"| {rank} | " + " | ".join(cells) + f" | **{ratio:.3f}** ({b / 1024:.0f} / {t / 1024:.0f}) |")
    print(f"worst rank overall: {worst:.3f} x (acceptance <= 0.40)")
    # Issue 26: the dry run's per-rank estimate against each rank's absolute peak (VmHWM over all phases).
    peaks = {rank: max(big[rank]["peaks_kib"].values()) / 1024 ** 2 for rank in big}
    ratios = [estimate / peak for peak in peaks.values()]
    print(f"--dry-run estimate {estimate:.2f} GiB per rank; measured peak per rank (GiB): "
          + ", ".join(f"{peaks[r]:.2f}" for r in sorted(peaks))
          + f"; estimate / peak {min(ratios):.2f}-{max(ratios):.2f} (acceptance 0.75-1.25)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
