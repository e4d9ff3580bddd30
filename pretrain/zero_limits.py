"""ZeRO's buffer and live-parameter limits, scaled to the rank's share of the model.

DeepSpeed's defaults are absolute numbers sized for billion-parameter models (a reduce bucket of 5e8 elements,
up to 1e9 live ZeRO-3 parameters, parameters kept gathered while they are reused within 1e9 elements): for a
model whose rank holds fewer parameters than that, every limit is larger than the model, so ZeRO-3 keeps every
parameter it gathered and its gradient bucket holds the whole gradient, and a rank's peak holds far more than
its 1/D share. Here each limit is a fraction of P, the parameters this rank's pipeline stage and tensor slice
holds before ZeRO partitions them (``pretrain.preflight.parameters_per_stage``), clamped between a floor (so a
tiny model does not run thousands of tiny collectives) and DeepSpeed's own default (so a large model gets what
DeepSpeed tunes for). A ``parallel.*`` key set above 0 replaces its default.
"""
from __future__ import annotations

# (parallel key, DeepSpeed's zero_optimization key, fraction of P, floor, ceiling); D = data-parallel size.
#   buckets: P / 32, so a rank's gradient reduction / parameter all-gather runs in ~32 pieces, never a large
#   fraction of an extra copy of the model (bench/RESULTS.md: with P / 8 the (1,1,4) ZeRO-3 peak held 0.53 x
#   the training state); live parameters and reuse distance: a quarter of the rank's own share, P / (4 D);
#   prefetch: P / 32; persistence (parameters small enough never to partition): P / 1000.
_LIMITS = (
    ("reduce_bucket_size", "reduce_bucket_size", 1 / 32, 1_000_000, 500_000_000),
    ("allgather_bucket_size", "allgather_bucket_size", 1 / 32, 1_000_000, 500_000_000),
    ("stage3_max_live_parameters", "stage3_max_live_parameters", None, 1_000_000, 1_000_000_000),
    ("stage3_max_reuse_distance", "stage3_max_reuse_distance", None, 1_000_000, 1_000_000_000),
    ("stage3_prefetch_bucket_size", "stage3_prefetch_bucket_size", 1 / 32, 500_000, 50_000_000),
    ("stage3_param_persistence_threshold", "stage3_param_persistence_threshold", 1 / 1000, 1_000, 100_000),
)
#: The ``parallel.*`` keys this module sizes (0 = scaled to the rank's share).
LIMIT_KEYS = tuple(key for key, *_ in _LIMITS)


def zero_limits(parallel, rank_parameters: int, data_parallel: int, stage: int) -> dict[str, int]:
    """DeepSpeed ``zero_optimization`` keys for a rank holding ``rank_parameters`` before ZeRO partitions them
    over ``data_parallel`` ranks: the buckets from stage 1 on, ZeRO-3's limits at stage 3 only."""
    out = {}
    for key, ds_key, fraction, floor, ceiling in _LIMITS:
        if key.startswith("stage3_") and stage != 3:
            continue
        if stage < 1:
            continue
        share = rank_parameters * fraction if fraction is not None else rank_parameters / (4 * max(data_parallel, 1))
        chosen = getattr(parallel, key)
        out[ds_key] = int(chosen) if chosen > 0 else int(min(max(share, floor), ceiling))
    return out
