"""Throughput, model / hardware FLOP utilisation and peak memory of the training loop, and the console line.

    meter = ThroughputMeter(shape, micro_batch_size=8, forward_calls_per_step=dp * micro_batches,
                            n_devices=world_size, peak_tflops=resolve_peak_tflops(cfg.run.peak_tflops, device,
                                                                                 cfg.parallel.precision),
                            recompute=cfg.parallel.recompute, warmup_steps=2, device=device)
    for step in ...:
        meter.begin()
        ... one optimizer step ...
        meter.end(mem_len=memory_rows_present)
        if step % log_interval == 0:
            print(format_console_line(step, {"loss": ..., "lr": ..., **meter.interval_metrics()},
                                      total_steps=cfg.run.steps))

FLOPs come from :mod:`lamemo_parallel.flops` (docs/method.md §6): model FLOPs (MFU) are 3 forward passes per step,
hardware FLOPs (HFU) add what ``parallel.recompute`` runs again (the layer stack's forward, or the attention cores). The first
``warmup_steps`` steps the meter sees (after every start or resume: allocator warm-up, autotuning, compile)
are excluded from every average.

Metric names (also the MLflow keys the trainer logs):

=================  =========================================================================================
``tokens_per_s``   target tokens per second, all data-parallel ranks together
``step_time_s``    seconds per optimizer step
``tflops``         model TFLOP/s per device
``mfu``            model FLOP utilisation, fraction of ``peak_tflops`` (absent when the peak is unknown)
``hfu``            hardware FLOP utilisation (counts activation recompute, whole-layer or selective)
``peak_mem_gib``   CUDA ``max_memory_allocated`` of this process, or its peak RSS on CPU, GiB
=================  =========================================================================================
"""
from __future__ import annotations

import dataclasses
import math
import resource
import sys
import time
from contextlib import contextmanager

import torch

from lamemo_parallel.flops import StepShape, training_flops

from .durations import format_duration  # noqa: F401  (re-exported: callers import it from here)

GIB = float(1 << 30)

#: Dense (no sparsity) peak TFLOP/s of one device by name fragment, for (bf16/fp16 tensor cores, fp32).
#: Looked up in order: more specific names first ("A100" before "A10"). Set ``run.peak_tflops`` to override.
DENSE_PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("GB200", 2500.0, 80.0),
    ("B200", 2250.0, 80.0),
    ("GH200", 989.4, 66.9),
    ("H200", 989.4, 66.9),
    ("H100 PCIE", 756.5, 51.2),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.4, 66.9),
    ("H800", 989.4, 66.9),
    ("A100", 312.0, 19.5),
    ("A800", 312.0, 19.5),
    ("L40S", 362.1, 91.6),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 30.3),
    ("A40", 149.7, 37.4),
    ("A30", 165.0, 10.3),
    ("A10", 125.0, 31.2),
    ("V100", 125.0, 15.7),
)


def dense_peak_tflops(device_name: str, precision: str = "bf16") -> float | None:
    """The dense peak of a GPU from its name (``torch.cuda.get_device_name()``), or None if unknown."""
    name = device_name.upper()
    for fragment, half, single in DENSE_PEAK_TFLOPS:
        if fragment in name:
            return single if precision == "fp32" else half
    return None


def resolve_peak_tflops(configured: float | None, device: torch.device | str | None = None,
                        precision: str = "bf16") -> float | None:
    """``configured`` when > 0, else the table's value for the CUDA device, else None (no MFU/HFU)."""
    if configured:
        if configured < 0:
            raise ValueError(f"peak_tflops must be >= 0, got {configured}")
        return float(configured)
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return dense_peak_tflops(torch.cuda.get_device_name(device), precision)
    return None


def peak_memory_gib(device: torch.device | str | None = None) -> float:
    """Peak memory of this process: CUDA max_memory_allocated on a GPU, peak resident set size on CPU."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / GIB if sys.platform == "darwin" else rss * 1024 / GIB    # bytes on macOS, KiB on Linux


@dataclasses.dataclass
class _Totals:
    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0
    model_flops: float = 0.0
    hardware_flops: float = 0.0

    def add(self, seconds: float, tokens: int, model_flops: float, hardware_flops: float) -> None:
        self.steps += 1
        self.seconds += seconds
        self.tokens += tokens
        self.model_flops += model_flops
        self.hardware_flops += hardware_flops


class ThroughputMeter:
    """Times optimizer steps and turns them into tokens/s, TFLOP/s, MFU, HFU and peak memory.

    Args:
        shape: the model and segment shape (``mem_len`` = the memory present once it is full; ``end`` can
            pass the memory of a step whose memory is still filling).
        micro_batch_size: sequences of one forward call (a FLOP count detail: the positional projection
            W_R runs once per call, whatever the batch).
        forward_calls_per_step: forward calls of one optimizer step over the whole job: data-parallel size x
            micro-batches (tensor / pipeline ranks share a call, so they do not multiply it).
        n_devices: devices sharing the work (the world size); TFLOP/s, MFU and HFU are per device.
        peak_tflops: dense peak of one device; None or 0 leaves out MFU and HFU.
        recompute: ``parallel.recompute`` (none / attention / full): what the hardware FLOPs add.
        warmup_steps: the first steps the meter sees are left out of every average.
        device: where peak memory is read (CUDA device) and what is synchronised before reading the clock.
    """

    def __init__(self, shape: StepShape, *, micro_batch_size: int, forward_calls_per_step: int = 1,
                 n_devices: int = 1, peak_tflops: float | None = None, recompute: str = "none",
                 warmup_steps: int = 2, device: torch.device | str | None = None, synchronize: bool = True,
                 clock=time.perf_counter):
        if micro_batch_size <= 0 or forward_calls_per_step <= 0 or n_devices <= 0:
            raise ValueError("micro_batch_size, forward_calls_per_step and n_devices must be positive")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.shape = shape
        self.micro_batch_size = micro_batch_size
        self.forward_calls_per_step = forward_calls_per_step
        self.n_devices = n_devices
        self.peak_tflops = float(peak_tflops) if peak_tflops else None
        self.recompute = recompute
        self.warmup_steps = warmup_steps
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.synchronize = synchronize
        self._clock = clock
        self._started: float | None = None
        self.steps_seen = 0
        self._interval = _Totals()
        self._total = _Totals()

    # ------------------------------------------------------------------ FLOP counts
    @property
    def tokens_per_step(self) -> int:
        return self.forward_calls_per_step * self.micro_batch_size * self.shape.seg_len

    def step_flops(self, mem_len: int | None = None) -> tuple[float, float]:
        """(model FLOPs, hardware FLOPs) of one optimizer step over all devices."""
        shape = self.shape if mem_len is None else dataclasses.replace(self.shape, mem_len=mem_len)
        calls = self.forward_calls_per_step
        model = calls * training_flops(shape, batch_size=self.micro_batch_size)
        hardware = calls * training_flops(shape, recompute=self.recompute, batch_size=self.micro_batch_size)
        return float(model), float(hardware)

    # ------------------------------------------------------------------ timing
    def _sync(self) -> None:
        if self.synchronize and self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(self.device)

    def begin(self) -> None:
        """Mark the start of an optimizer step."""
        self._sync()
        self._started = self._clock()

    def end(self, *, mem_len: int | None = None) -> float:
        """Mark the end of the step started by :meth:`begin`; returns its seconds."""
        if self._started is None:
            raise RuntimeError("ThroughputMeter.end() without begin()")
        self._sync()
        seconds = self._clock() - self._started
        self._started = None
        self.record(seconds, mem_len=mem_len)
        return seconds

    @contextmanager
    def measure(self, *, mem_len: int | None = None):
        """``with meter.measure(): step()`` — begin/end around the block."""
        self.begin()
        yield
        self.end(mem_len=mem_len)

    def record(self, seconds: float, *, mem_len: int | None = None) -> None:
        """Account one optimizer step timed elsewhere. Warm-up steps only count as seen."""
        self.steps_seen += 1
        if self.steps_seen <= self.warmup_steps:
            return
        model, hardware = self.step_flops(mem_len)
        for totals in (self._interval, self._total):
            totals.add(max(seconds, 0.0), self.tokens_per_step, model, hardware)

    @property
    def in_warmup(self) -> bool:
        return self.steps_seen <= self.warmup_steps

    # ------------------------------------------------------------------ figures
    def _figures(self, totals: _Totals) -> dict[str, float]:
        out: dict[str, float] = {}
        if totals.steps and totals.seconds > 0:
            per_device = 1.0 / (totals.seconds * self.n_devices)
            out["tokens_per_s"] = totals.tokens / totals.seconds
            out["step_time_s"] = totals.seconds / totals.steps
            out["tflops"] = totals.model_flops * per_device / 1e12
            if self.peak_tflops:
                out["mfu"] = totals.model_flops * per_device / (self.peak_tflops * 1e12)
                out["hfu"] = totals.hardware_flops * per_device / (self.peak_tflops * 1e12)
        out["peak_mem_gib"] = peak_memory_gib(self.device)
        return out

    def interval_metrics(self) -> dict[str, float]:
        """Averages over the steps since the last call (warm-up left out), then starts a new interval.
        Only ``peak_mem_gib`` while every step of the interval was a warm-up step."""
        figures = self._figures(self._interval)
        self._interval = _Totals()
        return figures

    def summary(self) -> dict[str, float]:
        """Averages over every non-warm-up step so far."""
        return self._figures(self._total)


# ---------------------------------------------------------------------------------------------- console
def _si(value: float) -> str:
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.1f}{suffix}"
    return f"{value:.0f}"


def _number(value: float) -> str:
    if value != value or math.isinf(value):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.3e}"
    return f"{value:.4g}"


# (key, how it is shown); keys may also carry a "train/" prefix.
_KNOWN: tuple[tuple[str, object], ...] = (
    ("loss", lambda v: f"loss {v:.4f}"),
    ("ppl", lambda v: f"ppl {v:.2f}"),
    ("bpc", lambda v: f"bpc {v:.4f}"),
    ("lr", lambda v: f"lr {v:.3e}"),
    ("grad_norm", lambda v: f"grad {v:.3f}"),
    ("tokens_per_s", lambda v: f"{_si(v)} tok/s"),
    ("tflops", lambda v: f"{v:.2f} TFLOP/s" if v >= 0.01 else f"{v * 1e3:.2f} GFLOP/s"),
    ("mfu", lambda v: f"MFU {100 * v:.1f}%"),
    ("hfu", lambda v: f"HFU {100 * v:.1f}%"),
    ("peak_mem_gib", lambda v: f"mem {v:.2f} GiB"),
    ("step_time_s", lambda v: f"{v:.3f} s/step"),
)


def format_console_line(step: int, metrics: dict, *, total_steps: int | None = None) -> str:
    """One line per log interval with the figures the trainer logs to MLflow, e.g.

    ``step 120/1000 | loss 3.2100 | ppl 24.78 | lr 2.500e-04 | grad 0.530 | 12.3k tok/s | 1.23 TFLOP/s |
    MFU 41.2% | HFU 54.9% | mem 1.20 GiB | 0.123 s/step | ETA 0:01:48``

    Known keys (optionally prefixed ``train/``) come in a fixed order; any other numeric key follows as
    ``key value`` (e.g. ``eval_ppl 22.1``); missing figures (throughput during warm-up) are left out. The
    ETA needs ``total_steps`` and ``step_time_s``.
    """
    values = {}
    for key, value in metrics.items():
        if value is None or isinstance(value, str):
            continue
        try:
            values[key[6:] if key.startswith("train/") else key] = float(value)
        except (TypeError, ValueError):
            continue
    width = len(str(total_steps)) if total_steps else 0
    parts = [f"step {step:>{width}d}/{total_steps}" if total_steps else f"step {step}"]
    for key, show in _KNOWN:
        if key in values:
            parts.append(show(values.pop(key)))
    for key in sorted(values):
        parts.append(f"{key} {_number(values[key])}")
    step_time = metrics.get("step_time_s", metrics.get("train/step_time_s"))
    if total_steps and step_time is not None:
        parts.append(f"ETA {format_duration((total_steps - step) * float(step_time))}")
    return " | ".join(parts)
