"""The trainer's configuration: typed, documented sections loaded from YAML plus dotted overrides.

    python -m pretrain.train --config configs/tiny-cpu.yaml parallel.tensor=2 run.dir=runs/x optim.lr=1e-3

Every key is validated on load (unknown keys, wrong types and impossible values stop with one message), and
the resolved configuration is what gets logged, checkpointed and exported.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class TrainConfigError(ValueError):
    """A configuration problem, reported before any compute."""


@dataclass
class ModelSection:
    """Architecture (see lamemo_parallel.LaMemoConfig). ``vocab_size: 0`` takes the tokenizer's size."""

    variant: int = 3
    n_layer: int = 4
    d_model: int = 256
    n_head: int = 8
    d_head: int | None = None
    d_inner: int = 1024
    pre_lnorm: bool = False
    dropout: float = 0.1
    dropatt: float = 0.0
    clamp_len: int = -1
    init_std: float = 0.02
    vocab_size: int = 0


@dataclass
class DataSection:
    """Token files (prefixes of preprocessed .bin/.idx files) and the segment-recurrent batching."""

    train: str = ""
    valid: str = ""
    tokenizer: str = ""
    """Directory of the tokenizer the data was preprocessed with; saved with every run and export."""
    tgt_len: int = 128
    """N: tokens per segment."""
    mem_len: int = 128
    """M: memory length during training."""
    eval_mem_len: int | None = None
    """Memory length for evaluation (default: mem_len)."""
    micro_batch_size: int = 8
    """Streams per micro-batch on each data-parallel rank."""
    micro_batches: int = 1
    """Micro-batches per optimizer step (gradient accumulation; pipeline micro-batches)."""
    roll_seed: int | None = None
    """Per-epoch random roll of the token stream as in Transformer-XL (None: no roll)."""


@dataclass
class OptimSection:
    name: str = "adam"
    """adam or adamw (apex's fused kernels when importable on GPU, torch otherwise)."""
    lr: float = 2.5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    """cosine (the paper's: from lr to min_lr over run.steps, after warm-up) or constant."""
    min_lr: float = 0.0
    clip_grad: float = 0.25
    """Global gradient-norm clip (0 disables). The paper uses 0.25 on the true gradient."""


@dataclass
class ParallelSection:
    tensor: int = 1
    pipeline: int = 1
    zero_stage: int = 0
    precision: str = "fp32"
    """fp32, bf16, or fp16 (GPU only, dynamic loss scaling). Z-bar stays float32 in every mode."""
    activation_checkpointing: bool = False
    pipeline_partition: list[int] | None = None
    """Layers per pipeline stage (default: split evenly)."""


@dataclass
class RunSection:
    dir: str = "runs/default"
    steps: int = 100
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 0
    """Evaluate on data.valid every this many steps (0: only at the end)."""
    eval_tokens: int = 0
    """Score at most this many validation tokens (0: the whole split)."""
    eval_batch_size: int = 1
    """Evaluation streams per data-parallel rank: the split is cut into eval_batch_size x DP contiguous streams,
    each with its own memory (Transformer-XL's evaluation); every token is scored once, except the at most
    eval_batch_size x DP - 1 that do not fill the streams evenly."""
    save_interval: int = 0
    """Save a checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 3
    exit_after: int = 0
    """Stop (after saving a checkpoint) once this process has run this many steps (0: run to run.steps);
    for time-sliced jobs and resume tests."""
    resume: str = "auto"
    """auto (newest complete checkpoint in run.dir, if any), never, or a checkpoint directory."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    peak_tflops: float = 0.0
    """Dense peak of one device in TFLOP/s for MFU (0: the default for the device kind)."""
    mlflow: bool = True
    """Log to MLflow on rank 0 (MLFLOW_TRACKING_URI, or a SQLite store in run.dir)."""


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, object]:
        """Dotted key -> value (for MLflow params and console)."""
        out = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out

    def save(self, path: str | Path) -> None:
        data = self.to_dict()
        data["optim"]["betas"] = list(data["optim"]["betas"])
        Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


# ---------------------------------------------------------------------------------------------- loading
def _coerce(value, annotation, key: str):
    """Check / convert one value against its dataclass annotation (from YAML or a command-line string)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise TrainConfigError(f"{key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise TrainConfigError(f"{key} must be an integer, got {value!r}")
        try:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int):
                raise ValueError
            return value
        except (ValueError, yaml.YAMLError):
            raise TrainConfigError(f"{key} must be an integer, got {value!r}") from None
    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise TrainConfigError(f"{key} must be a number, got {value!r}") from None
    if annotation is str:
        return str(value)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise TrainConfigError(f"{key} must be a list, got {value!r}")
        item_type = args[0] if args else object
        items = [_coerce(v, item_type, key) for v in value]
        return tuple(items) if origin is tuple else items
    return value


def _apply(section_obj, values: dict, section: str) -> None:
    hints = typing.get_type_hints(type(section_obj))
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise TrainConfigError(f"unknown config key '{section}.{key}' (known: {known})")
        setattr(section_obj, key, _coerce(value, hints[key], f"{section}.{key}"))


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """YAML file (optional) then ``section.key=value`` overrides, then validation."""
    config = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TrainConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise TrainConfigError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise TrainConfigError(f"{path} must hold a mapping of sections")
        for section, values in data.items():
            if not hasattr(config, section) or not dataclasses.is_dataclass(getattr(config, section)):
                raise TrainConfigError(f"unknown config section '{section}' in {path}")
            if not isinstance(values, dict):
                raise TrainConfigError(f"section '{section}' in {path} must be a mapping")
            _apply(getattr(config, section), values, section)
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise TrainConfigError(f"override '{item}' must look like section.key=value")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        if not hasattr(config, section) or not dataclasses.is_dataclass(getattr(config, section)):
            raise TrainConfigError(f"unknown config section '{section}' in override '{item}'")
        _apply(getattr(config, section), {key: value}, section)
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Checks that need no process group (layout checks against the world size live in pretrain.layout)."""
    m, d, o, p, r = config.model, config.data, config.optim, config.parallel, config.run
    checks = [
        (m.variant in (0, 3, 31, 32, 33), f"model.variant must be one of 0, 3, 31, 32, 33, got {m.variant}"),
        (m.n_layer > 0 and m.d_model > 0 and m.n_head > 0 and m.d_inner > 0, "model sizes must be positive"),
        (d.tgt_len > 0, f"data.tgt_len must be positive, got {d.tgt_len}"),
        (d.mem_len >= 0, f"data.mem_len must be >= 0, got {d.mem_len}"),
        (not (m.variant == 33 and 0 < d.mem_len < d.tgt_len),
         "model.variant 33 needs data.mem_len >= data.tgt_len"),
        (d.micro_batch_size > 0 and d.micro_batches > 0, "data.micro_batch_size and data.micro_batches must be > 0"),
        (o.name in ("adam", "adamw"), f"optim.name must be adam or adamw, got {o.name!r}"),
        (o.schedule in ("cosine", "constant"), f"optim.schedule must be cosine or constant, got {o.schedule!r}"),
        (o.lr > 0 and o.clip_grad >= 0 and o.warmup_steps >= 0, "optim.lr must be > 0, clip_grad and warmup >= 0"),
        (p.tensor > 0 and p.pipeline > 0, "parallel.tensor and parallel.pipeline must be >= 1"),
        (p.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}"),
        (p.precision in ("fp32", "bf16", "fp16"), f"parallel.precision must be fp32, bf16 or fp16, got {p.precision!r}"),
        (r.steps > 0, f"run.steps must be positive, got {r.steps}"),
        (r.eval_batch_size > 0, f"run.eval_batch_size must be positive, got {r.eval_batch_size}"),
        (r.device in ("auto", "cpu", "cuda"), f"run.device must be auto, cpu or cuda, got {r.device!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise TrainConfigError(message)
