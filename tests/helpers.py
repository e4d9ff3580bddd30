"""Plain helpers shared by the test folders (``from helpers import ...``; fixtures live in conftest.py).

``tests/`` is on ``sys.path`` through ``pythonpath`` in pyproject.toml, so every test module can import this one.
"""

from __future__ import annotations

import contextlib
import io

import importlib
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from pretrain.data.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
WIKITEXT2 = DATA / "wikitext-2"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt.xz"
TINY_CONFIG = ROOT / "configs" / "tiny-cpu.yaml"

# Published WikiText-2 numbers (pytorch word_language_model counts: words + one <eos> per line).
WT2_TOKENS = {"train": 2_088_628, "valid": 217_646, "test": 245_569}
WT2_VOCAB = 33_278


def shakespeare_text(limit: int | None = None) -> str:
    """Tiny Shakespeare (1.1 MB), or its first ``limit`` characters."""
    text = lzma.open(SHAKESPEARE, "rt", encoding="utf-8").read()
    return text if limit is None else text[:limit]


def concat_documents(tokenizer: Tokenizer, texts: list[str]) -> list[int]:
    """What a token file of these documents must hold: each document's ids ending with <eos>."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode_document(text))
    return ids


def load_tool(name: str) -> ModuleType:
    """The module behind ``tools/<name>.py`` and its installed command: ``pretrain.cli.<name>``."""
    return importlib.import_module(f"pretrain.cli.{name}")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (rendezvous, servers)."""
    from pretrain.distributed import free_port as _free_port
    return _free_port()


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: this checkout first on the path, one thread per process."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)


# The tiny models' few sizes. Tests whose sizes are part of what they check (divisible head counts for tensor
# parallelism, the paper's configs, exact FLOP counts) say so where they build their own.
#: The tiny model of the tests that need "some LaMemo model" (2 layers, d_model 16, 2 heads of 8, d_inner 32).
TINY_MODEL = dict(n_layer=2, d_model=16, n_head=2, d_inner=32)
#: The model-maths tests' size (against docs/method.md's transcription, the fused path, the tables): d_inner 24
#: (not a multiple of d_model, so a transposed feed-forward weight cannot fit) and a wide initialisation, so the
#: attention is far from uniform and a wrong term shows in the logits.
MATH_MODEL = dict(TINY_MODEL, d_inner=24, init_std=0.3)


def tiny_config(vocab_size: int, size: dict = TINY_MODEL, **overrides):
    """The one tiny-model factory (also the ``tiny_config`` fixture of tests/conftest.py): ``size`` (one of the
    sizes above) with ``vocab_size`` and any overrides (variant, lengths, or the size a test is about)."""
    from lamemo_parallel import LaMemoConfig
    return LaMemoConfig(**{**size, "vocab_size": vocab_size, **overrides})


def tiny_model(vocab_size: int, size: dict = MATH_MODEL, *, seed: int = 0, perturb: float = 0.1, **overrides):
    """``LaMemoModel(tiny_config(...))`` in eval mode, initialised from ``seed``; every parameter then moved by
    ``perturb`` x N(0, 1), so the biases (initialised to 0) and LayerNorms (to 1) matter in what a test compares."""
    import torch

    from lamemo_parallel import LaMemoModel
    torch.manual_seed(seed)
    model = LaMemoModel(tiny_config(vocab_size, size, **overrides)).eval()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn_like(p))
    return model


BASE_STEPS = 5


def base_overrides(corpus: Path, run_dir: Path) -> list[str]:
    """The trainer tests' tiny run on the ``corpus`` fixture: 2 layers, d_model 16, 4 heads, segments of 8
    tokens with a memory of 8, 2 micro-batches of 2 streams, dropout off, ``BASE_STEPS`` steps."""
    return [f"data.train={corpus / 'train'}", "data.valid=", f"data.tokenizer={corpus / 'tok'}", f"run.dir={run_dir}",
            f"run.steps={BASE_STEPS}", "data.tgt_len=8", "data.mem_len=8", "data.micro_batch_size=2",
            "data.micro_batches=2", "model.n_layer=2", "model.d_model=16", "model.n_head=4", "model.d_inner=32",
            "model.dropout=0.0", "optim.lr=0.003", "optim.clip_grad=0.5", "run.mlflow=false", "run.log_interval=1"]


def launch(nproc: int, overrides: list[str], timeout: float = 300, env_extra: dict[str, str] | None = None,
           config: Path = TINY_CONFIG, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """One real run of ``python -m pretrain.train`` with ``nproc`` processes (gloo on CPU): under ``torchrun``
    for several, and for one process the trainer alone, as a user starts it (it gives itself a 127.0.0.1
    rendezvous, pretrain/distributed.py); that saves the launcher's interpreter and imports (seconds a launch).
    ``prefix``: a command that runs it (``SMALL_SHM``)."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                 "--master-addr=127.0.0.1", f"--master-port={free_port()}"] if nproc > 1 else [sys.executable])
    cmd = [*prefix, *launcher, "-m", "pretrain.train", "--config", str(config), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(**(env_extra or {})),
                          timeout=timeout, cwd=ROOT)


def launcher_cmd(nproc: int, overrides: list[str]) -> list[str]:
    """The command line of ``launcher``."""
    return [sys.executable, "-m", "pretrain.launch", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", "-m", "pretrain.train", "--config", str(TINY_CONFIG), *overrides]


def launcher(nproc: int, overrides: list[str], env_extra: dict | None = None,
             timeout: float = 400) -> subprocess.CompletedProcess:
    """One run of the project's launcher, ``python -m pretrain.launch`` (torchrun that forwards SIGTERM and
    reports a failed trainer in one line), with ``nproc`` trainers on the tiny config (gloo on CPU)."""
    return subprocess.run(launcher_cmd(nproc, overrides), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=subprocess_env(**(env_extra or {})))


def run_main(main, argv: list) -> tuple[int, str, str]:
    """A command's ``main(argv)`` in this process, as its console script runs it: (status, stdout, stderr).
    Cheaper than a subprocess (no interpreter, no imports) for tests of a command's messages and exit codes."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(a) for a in argv])
    return status, out.getvalue(), err.getvalue()


#: A ``launch`` prefix: the run sees a /dev/shm of 64 kB (its own mount namespace; needs root), too small for an
#: asynchronous save's host copy.
SMALL_SHM = ("unshare", "--mount", "--", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs /dev/shm && exec "$@"', "sh")


def mount_tmpfs(path: Path, size_bytes: int) -> bool:
    """A size-limited tmpfs at ``path`` (a full disk for save tests; needs root); False where mounting is not
    allowed. The caller unmounts it (``umount``)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    return done.returncode == 0


def check_full_disk_stop(result: subprocess.CompletedProcess, run_dir: Path, reference: dict[int, float]) -> None:
    """A run whose step-4 save found the disk full (a tmpfs that holds one checkpoint): it stopped after
    start-up (exit 1, docs/reliability.md) with one error line and no traceback, naming the failed checkpoint,
    the cause and the newest complete one (step 2, still valid); its step-2 loss is ``reference``'s."""
    from pretrain.checkpoint import validate
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(ROOT / "pretrain") not in result.stderr, result.stderr[-4000:]
    assert "step_00000004" in errors[0] and "No space left on device" in errors[0]
    assert "the newest complete one is" in errors[0] and "step_00000002" in errors[0]
    assert not (run_dir / "checkpoints" / "step_00000004").exists()
    validate(run_dir / "checkpoints" / "step_00000002")
    assert losses(run_dir)[2] == reference[2]


def one_error(result: subprocess.CompletedProcess) -> str:
    """The trainer's single ``error:`` line of a failed launch (the launcher's own summary line aside), and no
    traceback anywhere."""
    lines = [x for x in result.stderr.splitlines() if x.startswith("error: ") and "trainer rank" not in x]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a resumed run appends, so a later line for the same step wins."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def read_losses(run_dir: Path) -> list[float]:
    """Every logged loss of metrics.jsonl in order (a resumed run's repeated steps included)."""
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def tensorboard_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> step -> value, read back from the event files with TensorBoard's own EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    return {tag: {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)}
            for tag in events.Tags()["tensors"] if not tag.startswith("config")}


def jsonl_values(run_dir: Path) -> dict[str, dict[int, float]]:
    """key -> step -> value of every metric in metrics.jsonl (a later record of the same step wins)."""
    out: dict[str, dict[int, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key not in ("step", "time"):
                out.setdefault(key, {})[record["step"]] = float(value)
    return out


EVAL_TOKENS, EVAL_STREAMS = 300, 2


def eval_overrides(corpus: Path) -> list[str]:
    """Evaluate through the parallel model during the run (steps 2 and 4, where a clobbered training memory
    would change the later losses) and at the end: ``EVAL_STREAMS`` streams per data-parallel rank."""
    return [f"data.valid={corpus / 'train'}", f"run.eval_tokens={EVAL_TOKENS}", f"run.eval_batch_size={EVAL_STREAMS}",
            "run.eval_interval=2"]


def assert_eval_matches_export(run_dir: Path, corpus: Path, config, dp: int) -> None:
    """The run's last evaluation loss equals the single-device evaluation of its export (batch = streams per
    rank x data-parallel size) to 1e-5 relative."""
    import pytest
    import torch

    from lamemo_parallel import LaMemoModel
    from pretrain.data.indexed import load_tokens
    from lamemo_parallel.inference import evaluate_tokens
    records = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, config.run.steps]
    tokens = torch.from_numpy(load_tokens(corpus / "train").astype("int64"))[:EVAL_TOKENS + 1]
    mem_len = config.data.eval_mem_len if config.data.eval_mem_len is not None else config.data.mem_len
    single = evaluate_tokens(LaMemoModel.from_pretrained(Path(run_dir) / "final"), tokens, tgt_len=config.data.tgt_len,
                             mem_len=mem_len, batch_size=EVAL_STREAMS * dp)
    assert evals[-1]["eval_tokens"] == single.n_tokens
    assert evals[-1]["eval_loss"] == pytest.approx(single.loss, rel=1e-5)


class PicklePayload:
    """A pickle that runs ``touch marker`` when unpickled with ``weights_only=False`` (the safe-loading tests
    plant it in checkpoint files and check that the marker never appears)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)
