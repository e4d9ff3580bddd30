"""Checks before compute: everything about a run that can be checked without training is checked here, on
every rank, before the engine is built, so a bad input costs seconds and never a half-done run.

* the token files (train and validation): finished, not truncated, made with *this* tokenizer (fingerprint in
  their ``meta.json``), ids inside the vocabulary, sha256 against ``meta.json`` (policy in docs/data.md:
  ``data.verify``), long enough for the stream layout and the evaluation;
* the memory per rank (:func:`estimate_memory`) against what the device has (:func:`available_memory`);
* ranks agree (:func:`agree`): a problem found on any rank stops every rank with the same message.

``python -m pretrain.train --dry-run`` prints :func:`dry_run_report` and exits without building anything.
"""
from __future__ import annotations

import math

import os
from dataclasses import dataclass

import psutil
import torch
import yaml

from lamemo_parallel.config import variant_traits
from lamemo_parallel.sharding import sharding_table

from .config import TrainConfig, TrainConfigError, model_config
from .data.errors import DataError
from .data.indexed import _paths, load_tokens
from .data.sources import Source, expand_prefixes, load_sources, parse_sources
from .data.tokenizer import check_vocab_matches, load_tokenizer
from .distributed import first_problem
from .layout import Layout, split_layers
from .zero_limits import zero_limits

GiB = 1024 ** 3
FRAMEWORK_BYTES = int(0.6 * GiB)
"""What torch + DeepSpeed + megatron-core take per process before any tensor (measured: 0.45 GiB RSS on CPU)."""


# ---------------------------------------------------------------------------------------------- data
@dataclass
class RunData:
    tokenizer: object
    train: object          # numpy memmap of the training split, or a list of Source for a mixture
    valid: list | None     # the validation split as a list of Source (a prefix is one source), or None


def token_file_bytes(prefix: str) -> int:
    return sum(p.stat().st_size for p in _paths(prefix)[:2] if p.is_file())


def checksum_wanted(config: TrainConfig, prefixes: list[str]) -> bool:
    """``data.verify``: checksum / size / auto (sha256 only when all token files together are small)."""
    d = config.data
    if d.verify != "auto":
        return d.verify == "checksum"
    return sum(token_file_bytes(p) for p in prefixes) <= d.verify_max_gb * GiB


def check_data(config: TrainConfig, *, verify_checksums: bool, log=print) -> RunData:
    """Tokenizer and both splits, checked as described in the module docstring; raises DataError /
    TrainConfigError naming the file and the problem."""
    d = config.data
    if not d.tokenizer:
        raise TrainConfigError("data.tokenizer is not set (the directory written by tools/train_tokenizer.py)")
    if not d.train:
        raise TrainConfigError("data.train is not set (a prefix written by tools/preprocess_data.py)")
    try:
        tokenizer = load_tokenizer(d.tokenizer)
    except (DataError, OSError) as err:
        raise DataError(f"data.tokenizer={d.tokenizer}: {err}") from None
    if config.model.vocab_size == 0:
        config.model.vocab_size = tokenizer.vocab_size
    try:
        check_vocab_matches(tokenizer, config.model.vocab_size)
    except ValueError as err:
        raise TrainConfigError(f"model.vocab_size={config.model.vocab_size}: {err}") from None
    prefixes = [p for key, value in (("data.train", d.train), ("data.valid", d.valid))
                for spec in parse_sources(value, key, weights_required=False) for p in expand_prefixes(spec, key)]
    checksum = verify_checksums and checksum_wanted(config, prefixes)
    if verify_checksums and not checksum and d.verify == "auto":
        log(f"note: token files larger than data.verify_max_gb={d.verify_max_gb:g} GiB: sizes and index checked, "
            f"sha256 not (run tools/verify_data.py, or set data.verify=checksum)")

    def load(key: str, prefix: str):
        tokens = load_tokens(prefix, verify="checksum" if checksum else "size", tokenizer=tokenizer)
        if len(tokens) < 2:
            raise TrainConfigError(f"{key}={prefix} holds {len(tokens)} token(s); at least 2 are needed")
        scored = tokens if key == "data.train" or not config.run.eval_tokens else tokens[:config.run.eval_tokens + 1]
        top = int(scored.max())
        if top >= config.model.vocab_size:
            raise TrainConfigError(f"{key}={prefix} holds token id {top}, outside the vocabulary of "
                                   f"{config.model.vocab_size}: was it preprocessed with another tokenizer?")
        return tokens

    split = {}
    for key, value in (("data.train", d.train), ("data.valid", d.valid)):
        if isinstance(value, list):         # a mixture: a list of Source (pretrain/data/sources.py)
            specs = parse_sources(value, key, weights_required=key == "data.train")
            split[key] = load_sources(specs, key, load=lambda prefix, key=key: load(key, prefix))
        elif value:
            try:
                split[key] = load(key, value)
            except (DataError, OSError) as err:
                raise DataError(f"{key}={value}: {err}") from None
            if key == "data.valid":         # scored per source like a list (one source named after the stem)
                spec, = parse_sources(value, key, weights_required=False)
                split[key] = [Source(spec.name, 1.0, split[key], (value,))]
    return RunData(tokenizer=tokenizer, train=split["data.train"], valid=split.get("data.valid"))


# ---------------------------------------------------------------------------------------------- memory
@dataclass
class MemoryEstimate:
    """Bytes per rank on the busiest pipeline stage (see :func:`estimate_memory` for the formula)."""

    parameters: int          # parameters held by this rank (before ZeRO-3 partitioning)
    weights: int
    gradients: int
    optimizer: int
    activations: int
    memory_store: int
    framework: int
    zero_buffers: int = 0    # ZeRO's gradient bucket, ZeRO-3's gathered (live + prefetched) parameters
    checkpoint_copy: int = 0  # an asynchronous save's host copy, where host memory is the device's (CPU, host_copy)

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.memory_store
                + self.framework + self.zero_buffers + self.checkpoint_copy)

    def describe(self) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / GiB:.2f}" for name in
                          ("weights", "gradients", "optimizer", "activations", "memory_store", "zero_buffers",
                           "checkpoint_copy", "framework"))
        return f"{self.total / GiB:.2f} GiB per rank ({parts} GiB)"


def parameters_per_stage(config: TrainConfig, layout: Layout, vocab_size: int | None = None) -> list[int]:
    """Parameters one tensor-parallel rank of each pipeline stage holds, read off the sharding table (the tied
    embedding and the global biases counted on every stage that keeps a copy). Nothing is built: constructing
    the model, even on the meta device, costs seconds of imports in every process of every launch.
    ``vocab_size``: the resolved vocabulary (default ``model.vocab_size``)."""
    stages = split_layers(config.model.n_layer, layout.pipeline, config.parallel.pipeline_partition)
    vocab_size = config.model.vocab_size if vocab_size is None else vocab_size
    table = sharding_table(model_config(config, vocab_size), layout.tensor, stages)
    return [sum(math.prod(entry.local_shape(layout.tensor)) for entry in table.values() if s in entry.stages)
            for s in range(len(stages))]


def estimate_memory(config: TrainConfig, layout: Layout, *, cuda: bool = False) -> MemoryEstimate:
    """Bytes one rank needs, for the busiest pipeline stage. P = its parameters (:func:`parameters_per_stage`),
    w = bytes per weight (4 fp32, 2 bf16/fp16), D = data-parallel size, b = micro_batch_size, N = tgt_len,
    M = mem_len, d = d_model, H = n_head, V = vocab, L = layers on the stage, T = tensor-parallel size:

    * weights P*w (/D with ZeRO-3); gradients P*4 (/D with ZeRO-2/3); Adam moments 8*P plus an fp32 master
      copy 4*P in bf16/fp16 and under ZeRO-3 (/D with ZeRO-1/2/3);
    * activations of one micro-batch and layer, after Korthikanti et al. (2022) with q = N query rows (N + M
      for look-ahead variants, whose memory rows attend to the new tokens) and k = M + N keys:
      b*(34*q*d + 5*H*q*k)*w/2 / T; times L (``parallel.recompute``: attention keeps L x the first term and
      one layer's second; full keeps only the layer inputs b*q*d*w per layer plus one whole layer); times the
      micro-batches in flight (1, or min(pipeline, micro_batches) on the first stage under 1F1B); plus the logits b*N*V*4*3 / T (values, softmax, gradient) on the last stage;
    * the memory store: per micro-batch slot and layer M*b*(2*d*w + 4*H) (embedding FIFO, C-bar, Z-bar fp32);
    * the end-of-interval evaluation instead of the activations when it needs more: b_e = run.eval_batch_size
      streams, M_e = eval_mem_len: b_e*(4*q_e*d + 2*H*q_e*(M_e + N))*4 / T for one layer's scores plus its
      memory store L*M_e*b_e*(2*d*w + 4*H) / T;
    * ZeRO's buffers (``pretrain.zero_limits``): the gradient bucket min(reduce_bucket_size, P)*4 from stage 1,
      and at stage 3 the gathered parameters min(stage3_max_live_parameters + stage3_prefetch_bucket_size, P)*w;
    * with ``run.async_save`` and a ``host_copy`` snapshot on CPU (``cuda`` False: the host memory is the device's;
      ``run.async_snapshot``, ``live`` by default there, copies nothing), the save's host copy of the rank's
      checkpoint share, weights + optimizer + memory store as above (an upper bound: the writer lets
      each file's copy go once written; measured (1,1,4) ZeRO-3, ~110M: 0.13 x the whole training state against
      0.25 counted); on a GPU the copy is in host memory beside the device's and is not counted;
    * a fixed FRAMEWORK_BYTES per process.

    It is an estimate (allocator fragmentation and temporary buffers are not counted); its job is to refuse
    what cannot fit by a wide margin (a tgt_len of 100k, a 7B model on one rank), not to plan to the byte."""
    m, d, p = config.model, config.data, config.parallel
    w = 4 if p.precision == "fp32" else 2
    D, T, b, N, M = layout.data, layout.tensor, d.micro_batch_size, d.tgt_len, d.mem_len
    lookahead = variant_traits(m.variant).looks_ahead
    q, k = (N + M if lookahead else N), M + N
    stages = split_layers(m.n_layer, layout.pipeline, p.pipeline_partition)
    params = parameters_per_stage(config, layout)
    host_copy_on_cpu = config.run.async_save and not cuda and config.run.snapshot_kind(cuda) == "host_copy"
    best = None
    for s, layers in enumerate(stages):
        P, L = params[s], len(layers)
        weights = P * w // (D if p.zero_stage == 3 else 1)
        grads = P * 4 // (D if p.zero_stage >= 2 else 1)
        # An fp32 master copy in bf16/fp16, and under ZeRO-3 in fp32 too (its optimizer steps a flat fp32 clone of
        # the rank's partition, not the partitioned parameters themselves).
        master = 4 if (w == 2 or p.zero_stage == 3) else 0
        optim = P * (8 + master) // (D if p.zero_stage >= 1 else 1)
        linear = b * 34 * q * m.d_model * w // 2 // T           # what selective recompute keeps of a layer
        scores = b * 5 * m.n_head * q * k * w // 2 // T         # what it recomputes (one layer at a time)
        if p.recompute == "full":
            acts = L * b * q * m.d_model * w + linear + scores
        elif p.recompute == "attention":
            acts = L * linear + scores
        else:
            acts = L * (linear + scores)
        in_flight = min(layout.pipeline - s, d.micro_batches) if layout.pipeline > 1 else 1
        acts *= in_flight
        if s == len(stages) - 1:
            acts += b * N * m.vocab_size * 4 * 3 // T
        store = d.micro_batches * L * M * b * (2 * m.d_model * w + 4 * m.n_head) // T
        # Evaluation (no gradients, one layer's scores at a time) with its own, possibly longer, memory.
        Me = d.eval_mem_len if d.eval_mem_len is not None else M
        if config.run.eval_tokens:                   # the memory never holds more than was scored
            Me = min(Me, config.run.eval_tokens)
        be, qe = config.run.eval_batch_size, (N + Me if lookahead else N)
        evaluation = (be * (4 * qe * m.d_model + 2 * m.n_head * qe * (Me + N)) * 4 // T
                      + L * Me * be * (2 * m.d_model * w + 4 * m.n_head) // T) if d.valid else 0
        acts = max(acts, evaluation)
        limits = zero_limits(p, P, D, p.zero_stage)
        buffers = (min(limits.get("reduce_bucket_size", 0), P) * 4
                   + min(limits.get("stage3_max_live_parameters", 0) + limits.get("stage3_prefetch_bucket_size", 0),
                         P) * w)
        copy = weights + optim + store if host_copy_on_cpu else 0
        estimate = MemoryEstimate(P, weights, grads, optim, acts, store, FRAMEWORK_BYTES, buffers, copy)
        if best is None or estimate.total > best.total:
            best = estimate
    return best


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what) one rank may use: the GPU's free memory, or on CPU the host's available memory shared by
    the ranks of this node (LOCAL_WORLD_SIZE)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of GPU {torch.cuda.current_device()}"
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    available = psutil.virtual_memory().available
    return int(available // local), f"available host memory / {local} rank(s) on this node"


def check_memory(config: TrainConfig, layout: Layout, device: torch.device) -> MemoryEstimate:
    estimate = estimate_memory(config, layout, cuda=device.type == "cuda")
    if config.run.memory_check:
        have, what = available_memory(device)
        if estimate.total > have:
            raise TrainConfigError(
                f"this run would need about {estimate.describe()}, more than the {have / GiB:.2f} GiB "
                f"({what}): reduce data.tgt_len / data.mem_len / data.eval_mem_len / data.micro_batch_size or the model, use more "
                f"parallel.tensor / parallel.pipeline / parallel.zero_stage, or set run.memory_check=false")
    return estimate


# ---------------------------------------------------------------------------------------------- agreement
def agree(problem: str | None) -> None:
    """Collective: raise TrainConfigError on every rank when any rank found a problem (the lowest rank's
    message, prefixed with its rank when it was not seen everywhere: ``distributed.first_problem``)."""
    message = first_problem(problem, name_rank=True)
    if message:
        raise TrainConfigError(message)


def dry_run_report(config: TrainConfig, layout: Layout, estimate: MemoryEstimate, steps_per_epoch: int,
                   device: torch.device) -> str:
    data = config.to_dict()
    data["optim"]["betas"] = list(data["optim"]["betas"])
    params = parameters_per_stage(config, layout)
    have, what = available_memory(device)
    lines = ["resolved config:", yaml.safe_dump(data, sort_keys=False).rstrip(),
             f"layout: {layout.describe()}",
             "parameters per rank: " + ", ".join(f"stage {s}: {n:,}" for s, n in enumerate(params)),
             f"memory estimate: {estimate.describe()}; {have / GiB:.2f} GiB available ({what})",
             f"steps per epoch: {steps_per_epoch} (run.steps {config.run.steps})"]
    return "\n".join(lines)
