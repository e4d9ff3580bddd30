"""The trainer's configuration: typed, documented sections loaded from YAML plus dotted overrides.

    python -m pretrain.train --config configs/tiny-cpu.yaml parallel.tensor=2 run.dir=runs/x optim.lr=1e-3

Every key is validated on load (unknown keys, wrong types and impossible values stop with one message), and
the resolved configuration is what gets logged, checkpointed and exported.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lamemo_parallel.config import RECOMPUTE_MODES, LaMemoConfig, check_variant, variant_traits

from .data.errors import DataError
from .data.sources import DEFAULT_SPAN_LEN, parse_sources
from .zero_limits import LIMIT_KEYS


class TrainConfigError(ValueError):
    """A configuration problem, reported before any compute."""


# The model section is LaMemoConfig's fields, minus those the trainer sets elsewhere, with the training
# defaults that differ from the model library's stated once here.
MODEL_KEYS_ELSEWHERE = ("tgt_len", "mem_len", "layer_norm_eps", "extra")
"""LaMemoConfig fields that are not ``model.*`` keys: the segment and memory lengths are ``data.tgt_len`` /
``data.mem_len``; ``layer_norm_eps`` and ``extra`` keep the model library's values."""
MODEL_TRAINING_DEFAULTS = {
    "dropout": (0.1, "Dropout on embeddings, residual branches and the final hidden states (training only; "
                     "the model library's default is 0)."),
    "vocab_size": (0, "Vocabulary size; 0 takes the tokenizer's size (a non-zero value is checked against the "
                      "tokenizer)."),
}
"""``model.*`` key -> (training default, description) where the trainer's default differs from LaMemoConfig's."""


def _model_section() -> type:
    hints = typing.get_type_hints(LaMemoConfig)
    specs = []
    for f in dataclasses.fields(LaMemoConfig):
        if f.name in MODEL_KEYS_ELSEWHERE:
            continue
        default, doc = MODEL_TRAINING_DEFAULTS.get(f.name, (f.default, None))
        specs.append((f.name, hints[f.name], field(default=default, metadata={"doc": doc} if doc else {})))
    cls = dataclasses.make_dataclass("ModelSection", specs, namespace={
        "__doc__": "Architecture (see lamemo_parallel.LaMemoConfig). ``vocab_size: 0`` takes the tokenizer's size."})
    cls.__module__ = __name__
    return cls


ModelSection = _model_section()


@dataclass
class DataSection:
    """Token files (prefixes of preprocessed .bin/.idx files) and the segment-recurrent batching."""

    train: str | list = ""
    """Prefix of the preprocessed training token files (``<prefix>.bin`` / ``.idx`` / ``.meta.json``), or a
    mixture: a list of sources ``{name, path, weight}`` (``name`` defaults to the file stem, weights need not sum
    to 1, ``path`` may be a list or a glob of shard prefixes read in order as one source); docs/data.md."""
    valid: str | list = ""
    """Prefix of the preprocessed validation token files (empty: no validation), or a list of sources as for
    ``train`` (weights optional, unused): each is scored on its own (``valid/<name>/loss``)."""
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
    verify: str = "auto"
    """sha256 of the token files against their meta.json at start-up (rank 0): ``auto`` when they hold at most
    ``verify_max_gb`` together (size and index checks otherwise), ``checksum`` always, ``size`` never
    (docs/data.md, tools/verify_data.py)."""
    verify_max_gb: float = 4.0
    """Largest total size of the token files (GB) that ``verify: auto`` still checksums."""
    span_len: int = DEFAULT_SPAN_LEN
    """Mixtures: tokens each stream reads from one source before the next span (rounded up to whole segments of
    tgt_len); shorter follows the weights more closely over a short window, longer breaks the context less
    often (docs/data.md)."""
    streams: int | None = None
    """The global stream count (streams read per optimizer step by the whole job); when set, ``micro_batches`` is
    derived from it as streams / (data-parallel size x micro_batch_size), so a restart on another number of
    nodes keeps every stream with its position and memory (docs/slurm.md). None: micro_batches as given."""
    span_memory: str = "keep"
    """Mixtures: the memory at a span boundary (where a stream may switch source): ``keep`` (the default: the
    memory already crosses every document boundary inside a source, Transformer-XL's practice) or ``reset``
    (empty it before every step whose segments begin new spans; all streams switch at the same steps). Needs a
    list of sources in ``train``: one token file has no spans (docs/data.md)."""


@dataclass
class OptimSection:
    """The optimizer (Adam / AdamW) and its learning-rate schedule."""

    name: str = "adam"
    """adam or adamw (apex's fused kernels when importable on GPU, torch otherwise)."""
    lr: float = 2.5e-4
    """Peak learning rate (after warm-up)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's (beta1, beta2)."""
    eps: float = 1e-8
    """Adam's epsilon."""
    weight_decay: float = 0.0
    """Weight decay (decoupled with adamw, L2 in the gradient with adam)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to lr over this many optimizer steps."""
    schedule: str = "cosine"
    """cosine (the paper's: from lr to min_lr over run.steps, after warm-up) or constant."""
    min_lr: float = 0.0
    """The learning rate the cosine schedule ends at."""
    clip_grad: float = 0.25
    """Global gradient-norm clip (0 disables). The paper uses 0.25 on the true gradient."""


@dataclass
class ParallelSection:
    """How the model is split over devices (tensor, pipeline, data parallel with ZeRO) and its precision."""

    tensor: int = 1
    """Tensor-parallel ranks (megatron-core): heads and vocabulary split across them."""
    pipeline: int = 1
    """Pipeline stages (DeepSpeed pipeline): layers split across them."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0-3): how optimizer state, gradients and weights are sharded over data-parallel ranks."""
    precision: str = "fp32"
    """fp32, bf16, or fp16 (GPU only, dynamic loss scaling). Z-bar stays float32 in every mode."""
    recompute: str = "none"
    """What the backward pass recomputes instead of keeping (less memory, more compute): none; attention
    (selective, as Megatron's: each layer keeps its linear layers' outputs and recomputes the attention scores,
    softmax, look-ahead and interpolation, the N x (M+N) and M x N tensors that dominate LaMemo's activations);
    full (whole layers). With attention, losses and gradients are bitwise those of none. The deprecated
    ``parallel.activation_checkpointing: true`` maps onto full (false onto none)."""
    attention_backend: str = "auto"
    """The attention's softmax part: auto (flex on CUDA, eager on CPU), eager (plain torch, the reference) or
    flex (torch's FlexAttention, fused; CUDA for training). See lamemo_parallel/attention.py."""
    overlap_comm: bool = True
    """Overlap ZeRO's gradient reduction (and ZeRO-3's parameter all-gathers) with the backward / forward
    compute, bucket by bucket (DeepSpeed ``overlap_comm`` + ``contiguous_gradients``; Megatron's
    overlap_grad_reduce / overlap_param_gather). Applies on GPUs with zero_stage >= 1 (bf16 runs as stage 1 at
    least). Tensor parallelism overlaps its input-gradient all-reduce with the weight-gradient matmul by itself
    (megatron-core), given CUDA_DEVICE_MAX_CONNECTIONS=1 in the environment (the SLURM launch sets it)."""
    reduce_bucket_size: int = 0
    """Elements per ZeRO gradient-reduction bucket: smaller buckets start communicating earlier in the backward
    and hold less. 0: P / 32, P the parameters this rank holds before ZeRO (its pipeline stage and tensor
    slice), clamped to [1e6, 5e8] (pretrain/zero_limits.py; DeepSpeed's own default, 5e8, exceeds most ranks'
    whole share). Passed on every device from ZeRO stage 1 on."""
    allgather_bucket_size: int = 0
    """Elements per ZeRO parameter all-gather bucket (ZeRO 1/2 after the step). 0: as reduce_bucket_size."""
    pipeline_partition: list[int] | None = None
    """Layers per pipeline stage (default: split evenly)."""
    stage3_max_live_parameters: int = 0
    """ZeRO-3: at most this many gathered (full) parameters held at once. 0: a quarter of this rank's share,
    P / (4 D) (P the parameters of its stage and tensor slice, D the data-parallel ranks), clamped to [1e6, 1e9]
    (DeepSpeed's default 1e9 lets a rank gather the whole model and keep it)."""
    stage3_prefetch_bucket_size: int = 0
    """ZeRO-3: elements of parameters gathered ahead of their use. 0: P / 32, clamped to [5e5, 5e7]."""
    stage3_param_persistence_threshold: int = 0
    """ZeRO-3: parameters with fewer elements stay whole on every rank (not partitioned; saves tiny
    collectives). 0: P / 1000, clamped to [1e3, 1e5]."""
    stage3_max_reuse_distance: int = 0
    """ZeRO-3: a gathered parameter is kept (not released) when it is used again within this many elements of
    parameters. 0: P / (4 D), clamped to [1e6, 1e9]."""


@dataclass
class RunSection:
    """The run: its directory, length, logging, evaluation, checkpoints, tracking and divergence guard."""

    dir: str = "runs/default"
    """The run directory: checkpoints, logs, metrics.jsonl, the embedded MLflow store and the export."""
    steps: int = 100
    """Optimizer steps of the whole run (also the length of the cosine schedule)."""
    seed: int = 1234
    """Seed of the initialisation and of dropout."""
    log_interval: int = 10
    """Log loss, learning rate and throughput every this many steps (console, metrics.jsonl, MLflow)."""
    eval_interval: int = 0
    """Evaluate on data.valid every this many steps (0: only at the end)."""
    eval_tokens: int = 0
    """Score at most this many validation tokens of each validation source (0: the whole split)."""
    eval_batch_size: int = 1
    """Evaluation streams per data-parallel rank: the split is cut into eval_batch_size x DP contiguous streams,
    each with its own memory (Transformer-XL's evaluation); every token is scored once, except the at most
    eval_batch_size x DP - 1 that do not fill the streams evenly."""
    save_interval: int = 0
    """Save a checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 3
    """How many of the newest complete checkpoints are kept; older ones are deleted."""
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
    mlflow_connect_timeout_s: float = 60.0
    """How long start-up keeps retrying an unreachable MLflow server before stopping with one line."""
    overwrite: bool = False
    """With ``resume: never`` in a directory that holds a run: move that run aside to
    ``<dir>.replaced-<time>`` and start fresh (without it such a start is refused)."""
    max_bad_steps: int = 3
    """Stop after this many consecutive skipped updates (non-finite loss / gradient, or a loss spike)."""
    spike_factor: float = 3.0
    """A step whose loss exceeds this factor times the median of the last ``spike_window`` accepted losses
    is skipped like a non-finite one (0 disables spike detection)."""
    spike_window: int = 50
    """How many of the last accepted losses the spike test takes the median of."""
    memory_check: bool = True
    """Refuse at start-up a layout whose estimated memory per rank exceeds what the device has
    (pretrain/preflight.py documents the estimate)."""
    profile_steps: list[int] = field(default_factory=list)
    """``[first, last]``: record optimizer steps first..last (inclusive) with torch.profiler on every rank into
    ``run.dir/profile/rank<R>/`` (chrome traces for Perfetto / TensorBoard; a CUDA memory snapshot on GPU);
    ``[]``: off (docs/tracking.md)."""
    loggers: list[str] = field(default_factory=lambda: ["mlflow"])
    """Where rank 0 sends metrics.jsonl's scalars and the resolved config: any of mlflow, tensorboard (event files
    in run.dir/tensorboard/, needs the [tensorboard] extra), wandb (files in run.dir, needs the [wandb] extra;
    WANDB_MODE / WANDB_PROJECT as usual). ``run.mlflow: false`` takes mlflow out of the list."""
    data_changed: str = "refuse"
    """What resuming does when data.train / data.valid differ from the checkpoint's data (sha256, tokenizer,
    size; pretrain/data/identity.py): ``refuse`` (stop before step 1, naming the data), or
    ``restart_streams`` (new data: positions from zero, memory emptied, one logged line)."""
    async_save: bool = True
    """Write checkpoints in the background: the step loop waits only while each rank's state is taken
    (``run.async_snapshot``), then trains on while a writer writes, hashes and seals the checkpoint (one save in
    flight; the final and the signal-driven save are waited for). False: the loop waits for the whole save
    (docs/checkpoints.md)."""
    async_snapshot: str = "auto"
    """How an asynchronous save takes a consistent state: ``host_copy`` (copied to host memory at the save, written
    whenever: one checkpoint share of extra host memory per rank), ``live`` (no copy: written from the training
    state during the next step's forward and backward, and that step's optimizer update waits until it is; no extra
    memory, but a save slower than a step holds training), or ``auto``: host_copy on a GPU, live on CPU
    (docs/checkpoints.md)."""

    def snapshot_kind(self, cuda: bool) -> str:
        """``async_snapshot`` resolved for a run on a GPU (``cuda``) or on CPU: ``host_copy`` or ``live``."""
        if self.async_snapshot != "auto":
            return self.async_snapshot
        return "host_copy" if cuda else "live"


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

    def to_yaml(self) -> str:
        data = self.to_dict()
        data["optim"]["betas"] = list(data["optim"]["betas"])
        return yaml.safe_dump(data, sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


SECTIONS = "model, data, optim, parallel, run"
LOGGERS = ("mlflow", "tensorboard", "wandb")     # run.loggers (pretrain/tracking)
SPAN_MEMORY = ("keep", "reset")                 # data.span_memory (pretrain/data/mixture.py)


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
        if str in inner and len(inner) > 1:      # str | list: a list stays a list, from YAML or the command line
            if isinstance(value, str):
                parsed = _yaml_or_none(value)
                value = parsed if isinstance(parsed, list) else value
            return value if isinstance(value, list) else _coerce(value, str, key)
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
        given = value
        try:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int):
                raise ValueError
            return value
        except (ValueError, yaml.YAMLError):
            raise TrainConfigError(f"{key} must be an integer, got {given!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise TrainConfigError(f"{key} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TrainConfigError(f"{key} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise TrainConfigError(f"{key} must be a finite number, got {value!r}")
        return number
    if annotation is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list, tuple)):
            raise TrainConfigError(f"{key} must be a string, got {value!r}")
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


def _yaml_or_none(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


#: Keys that were renamed: (section, old key) -> (new key, the old value mapped onto the new key's).
DEPRECATED_KEYS = {
    ("parallel", "activation_checkpointing"):
        ("recompute", lambda value: "full" if _coerce(value, bool, "parallel.activation_checkpointing") else "none"),
}


def _apply(section_obj, values: dict, section: str) -> None:
    hints = typing.get_type_hints(type(section_obj))
    for key, value in values.items():
        if (section, key) in DEPRECATED_KEYS:
            old_key, (key, convert) = key, DEPRECATED_KEYS[section, key]
            value = convert(value)
            print(f"note: {section}.{old_key} is deprecated, read as {section}.{key}={value}", file=sys.stderr)
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f"did you mean '{section}.{close[0]}'? " if close else ""
            known = ", ".join(sorted(hints))
            raise TrainConfigError(f"unknown config key '{section}.{key}' ({hint}known: {known})")
        setattr(section_obj, key, _coerce(value, hints[key], f"{section}.{key}"))


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """YAML file (optional) then ``section.key=value`` overrides, then validation."""
    config = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TrainConfigError(f"config file not found: {path}" + (" (it is a directory)" if path.is_dir() else ""))
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as err:
            raise TrainConfigError(f"{path} is not a UTF-8 text file (byte {err.start}: {err.reason}); "
                                   f"--config takes a YAML file") from None
        except OSError as err:
            raise TrainConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
        except yaml.YAMLError as err:
            first = " ".join(str(err).split())          # the parser's message spans several lines
            raise TrainConfigError(f"{path} is not valid YAML: {first}") from None
        if not isinstance(data, dict):
            raise TrainConfigError(f"{path} must hold a mapping of sections ({SECTIONS}), not a "
                                   f"{type(data).__name__}")
        for section, values in data.items():
            if not hasattr(config, section) or not dataclasses.is_dataclass(getattr(config, section)):
                raise TrainConfigError(f"unknown config section '{section}' in {path} (sections: {SECTIONS})")
            if values is None:
                continue                    # an empty section keeps its defaults
            if not isinstance(values, dict):
                raise TrainConfigError(f"section '{section}' in {path} must be a mapping")
            _apply(getattr(config, section), values, section)
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise TrainConfigError(f"override '{item}' must look like section.key=value")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        if not hasattr(config, section) or not dataclasses.is_dataclass(getattr(config, section)):
            raise TrainConfigError(f"unknown config section '{section}' in override '{item}' (sections: {SECTIONS})")
        _apply(getattr(config, section), {key: value}, section)
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Every value's range (checks that need no process group, files or devices; the layout against the world
    size lives in pretrain.layout, files and memory in pretrain.preflight). The first problem is raised."""
    m, d, o, p, r = config.model, config.data, config.optim, config.parallel, config.run
    checks = [
        (check_variant(m.variant) is None, f"model.{check_variant(m.variant)}"),
        *[(getattr(m, k) > 0, f"model.{k} must be >= 1, got {getattr(m, k)}")
          for k in ("n_layer", "d_model", "n_head", "d_inner")],
        (m.d_head is None or m.d_head > 0, f"model.d_head must be null (d_model / n_head) or >= 1, got {m.d_head}"),
        (m.d_head is not None or m.d_model % m.n_head == 0,
         f"model.d_model={m.d_model} is not divisible by model.n_head={m.n_head} (or set model.d_head)"),
        (0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}"),
        (0.0 <= m.dropatt < 1.0, f"model.dropatt must be in [0, 1), got {m.dropatt}"),
        (m.clamp_len >= -1, f"model.clamp_len must be -1 (no clamping) or >= 0, got {m.clamp_len}"),
        (m.init_std > 0, f"model.init_std must be > 0, got {m.init_std}"),
        (m.vocab_size >= 0, f"model.vocab_size must be 0 (the tokenizer's) or >= 1, got {m.vocab_size}"),
        (d.tgt_len > 0, f"data.tgt_len must be >= 1, got {d.tgt_len}"),
        (d.mem_len >= 0, f"data.mem_len must be >= 0, got {d.mem_len}"),
        (d.eval_mem_len is None or d.eval_mem_len >= 0,
         f"data.eval_mem_len must be null (data.mem_len) or >= 0, got {d.eval_mem_len}"),
        (check_variant(m.variant) is not None or not (variant_traits(m.variant).full_look_ahead
                                                      and 0 < d.mem_len < d.tgt_len),
         f"model.variant {m.variant} (full look-ahead) needs data.mem_len >= data.tgt_len"),
        (d.micro_batch_size > 0, f"data.micro_batch_size must be >= 1, got {d.micro_batch_size}"),
        (d.micro_batches > 0, f"data.micro_batches must be >= 1, got {d.micro_batches}"),
        (d.streams is None or d.streams > 0, f"data.streams must be null or >= 1, got {d.streams}"),
        (d.roll_seed is None or d.roll_seed >= 0, f"data.roll_seed must be null or >= 0, got {d.roll_seed}"),
        (d.verify in ("auto", "checksum", "size"), f"data.verify must be auto, checksum or size, got {d.verify!r}"),
        (d.span_memory in SPAN_MEMORY, f"data.span_memory must be keep or reset, got {d.span_memory!r}"),
        (d.span_memory == "keep" or not isinstance(d.train, str) or not d.train,
         "data.span_memory=reset needs a mixture (data.train as a list of sources): one token file is read "
         "without spans, so there is no span boundary to reset the memory at"),
        (d.verify_max_gb >= 0, f"data.verify_max_gb must be >= 0, got {d.verify_max_gb}"),
        (o.name in ("adam", "adamw"), f"optim.name must be adam or adamw, got {o.name!r}"),
        (o.lr > 0, f"optim.lr must be > 0, got {o.lr}"),
        (len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas),
         f"optim.betas must be two numbers in [0, 1), e.g. [0.9, 0.999], got {list(o.betas)}"),
        (o.eps > 0, f"optim.eps must be > 0, got {o.eps}"),
        (o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}"),
        (o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}"),
        (o.warmup_steps <= r.steps, f"optim.warmup_steps={o.warmup_steps} is more than run.steps={r.steps}"),
        (o.schedule in ("cosine", "constant"), f"optim.schedule must be cosine or constant, got {o.schedule!r}"),
        (0 <= o.min_lr <= o.lr, f"optim.min_lr must be in [0, optim.lr={o.lr}], got {o.min_lr}"),
        (o.clip_grad >= 0, f"optim.clip_grad must be >= 0 (0 disables clipping), got {o.clip_grad}"),
        (p.tensor > 0, f"parallel.tensor must be >= 1, got {p.tensor}"),
        (p.pipeline > 0, f"parallel.pipeline must be >= 1, got {p.pipeline}"),
        (p.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}"),
        (p.precision in ("fp32", "bf16", "fp16"), f"parallel.precision must be fp32, bf16 or fp16, got {p.precision!r}"),
        (p.recompute in RECOMPUTE_MODES,
         f"parallel.recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {p.recompute!r}"),
        (p.attention_backend in ("auto", "eager", "flex"),
         f"parallel.attention_backend must be auto, eager or flex, got {p.attention_backend!r}"),
        *[(getattr(p, k) >= 0, f"parallel.{k} must be >= 0 (0: scaled to the rank's share), got {getattr(p, k)}")
          for k in LIMIT_KEYS],
        (r.dir.strip() != "", "run.dir must be a directory path"),
        (r.steps > 0, f"run.steps must be >= 1, got {r.steps}"),
        (r.eval_batch_size > 0, f"run.eval_batch_size must be >= 1, got {r.eval_batch_size}"),
        (r.seed >= 0, f"run.seed must be >= 0, got {r.seed}"),
        (r.log_interval >= 1, f"run.log_interval must be >= 1, got {r.log_interval}"),
        (r.eval_interval >= 0, f"run.eval_interval must be >= 0 (0: only at the end), got {r.eval_interval}"),
        (r.eval_tokens >= 0, f"run.eval_tokens must be >= 0 (0: the whole split), got {r.eval_tokens}"),
        (r.save_interval >= 0, f"run.save_interval must be >= 0 (0: only at the end), got {r.save_interval}"),
        (r.keep_checkpoints >= 1, f"run.keep_checkpoints must be >= 1, got {r.keep_checkpoints}"),
        (r.exit_after >= 0, f"run.exit_after must be >= 0, got {r.exit_after}"),
        (r.resume.strip() != "", "run.resume must be auto, never or a checkpoint directory"),
        (r.device in ("auto", "cpu", "cuda"), f"run.device must be auto, cpu or cuda, got {r.device!r}"),
        (r.peak_tflops >= 0, f"run.peak_tflops must be >= 0 (0: the device's default), got {r.peak_tflops}"),
        (r.mlflow_connect_timeout_s >= 0, f"run.mlflow_connect_timeout_s must be >= 0, got {r.mlflow_connect_timeout_s}"),
        (r.max_bad_steps >= 1, f"run.max_bad_steps must be >= 1, got {r.max_bad_steps}"),
        (r.spike_factor == 0 or r.spike_factor > 1,
         f"run.spike_factor must be 0 (off) or > 1, got {r.spike_factor}"),
        (r.spike_window >= 1, f"run.spike_window must be >= 1, got {r.spike_window}"),
        (r.async_snapshot in ("auto", "host_copy", "live"),
         f"run.async_snapshot must be auto, host_copy or live, got {r.async_snapshot!r}"),
        (r.data_changed in ("refuse", "restart_streams"),
         f"run.data_changed must be refuse or restart_streams, got {r.data_changed!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise TrainConfigError(message)
    if r.profile_steps and not (len(r.profile_steps) == 2 and 1 <= r.profile_steps[0] <= r.profile_steps[1]):
        raise TrainConfigError(f"run.profile_steps must be [] (off) or [first, last] with 1 <= first <= last, got "
                               f"{list(r.profile_steps)}")
    unknown = [name for name in r.loggers if name not in LOGGERS]
    if unknown or len(set(r.loggers)) != len(r.loggers):
        raise TrainConfigError(f"run.loggers must name each of {', '.join(LOGGERS)} at most once, got {list(r.loggers)}")
    if d.span_len < 1:
        raise TrainConfigError(f"data.span_len must be >= 1, got {d.span_len}")
    for key, value, weighted in (("data.train", d.train, True), ("data.valid", d.valid, False)):
        try:
            parse_sources(value, key, weights_required=weighted)
        except DataError as err:
            raise TrainConfigError(str(err)) from None
    if p.pipeline_partition is not None and any(n < 1 for n in p.pipeline_partition):
        raise TrainConfigError(f"parallel.pipeline_partition entries must be >= 1, got {p.pipeline_partition}")


def model_config(config: TrainConfig, vocab_size: int) -> LaMemoConfig:
    """The model's config: every ``model.*`` key (``ModelSection`` is LaMemoConfig's fields, so a new field
    passes through untouched), the resolved ``vocab_size``, and the lengths from the data section."""
    return LaMemoConfig(**{**dataclasses.asdict(config.model), "vocab_size": vocab_size,
                           "tgt_len": config.data.tgt_len, "mem_len": config.data.mem_len})
