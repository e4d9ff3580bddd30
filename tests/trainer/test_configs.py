"""Every shipped config loads and validates; the paper's configs have the paper's sizes (docs/method.md §7)."""
import dataclasses

import pytest
import torch

from lamemo_parallel import LaMemoConfig, LaMemoModel
from pretrain.config import MODEL_KEYS_ELSEWHERE, ModelSection, TrainConfigError, load_config, model_config
from pretrain.layout import resolve_layout

from helpers import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_its_layout_resolves(path):
    config = load_config(path)
    p = config.parallel
    world = p.tensor * p.pipeline * 2
    layout = resolve_layout(config, world, cuda=p.precision == "fp16" or world > 8)
    assert layout.data == 2


def parameter_count(path, vocab_size):
    config = load_config(path)
    with torch.device("meta"):
        return LaMemoModel(model_config(config, vocab_size)).num_parameters()


def test_paper_base_models_have_the_paper_sizes():
    root = CONFIGS[0].parent
    wt103 = parameter_count(root / "wt103-lamemo-base.yaml", 267_735)
    assert abs(wt103 - 151.1e6) < 0.1e6                          # the paper's 151.1 M
    assert parameter_count(root / "wt103-xl-base.yaml", 267_735) == wt103 - 410   # one [10, 41] bias fewer
    enwik8 = parameter_count(root / "enwik8-lamemo-base.yaml", 257)
    assert abs(enwik8 - 41e6) < 1e6
    assert parameter_count(root / "text8-lamemo-base.yaml", 257) == enwik8
    for name in ("wt103-lamemo-base", "enwik8-lamemo-base", "text8-lamemo-base"):
        c = load_config(root / f"{name}.yaml")
        assert (c.optim.lr, c.optim.clip_grad, c.optim.schedule, c.optim.warmup_steps) == (2.5e-4, 0.25, "cosine", 0)
        assert c.data.tgt_len == c.data.mem_len and c.model.dropout == 0.1 and c.model.dropatt == 0.0


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_model_config_passes_every_model_key_through(path):
    """``model_config`` is LaMemoConfig built from every ``model.*`` key plus the data lengths: the model
    section holds LaMemoConfig's fields but those set elsewhere, so a new field needs no mapping."""
    config = load_config(path)
    model = model_config(config, 321)
    section = {f.name for f in dataclasses.fields(ModelSection)}
    assert section | set(MODEL_KEYS_ELSEWHERE) == {f.name for f in dataclasses.fields(LaMemoConfig)}
    for name in section - {"vocab_size", "d_head"}:
        assert getattr(model, name) == getattr(config.model, name), name
    assert model.d_head == (config.model.d_head or config.model.d_model // config.model.n_head)
    assert (model.vocab_size, model.tgt_len, model.mem_len) == (321, config.data.tgt_len, config.data.mem_len)
    assert (model.layer_norm_eps, model.extra) == (LaMemoConfig.layer_norm_eps, {})    # the library's own


def test_recompute_and_its_deprecated_switch(capsys, tmp_path):
    """parallel.recompute takes none / attention / full; the old parallel.activation_checkpointing still works
    (from a file, as an old run's saved config holds it, and as an override), read as full / none with a
    one-line note; anything else is refused naming the key."""
    assert load_config(None, ["parallel.recompute=attention"]).parallel.recompute == "attention"
    assert load_config(None, []).parallel.recompute == "none"
    assert load_config(None, ["parallel.activation_checkpointing=true"]).parallel.recompute == "full"
    note = capsys.readouterr().err.strip().splitlines()
    assert note == ["note: parallel.activation_checkpointing is deprecated, read as parallel.recompute=full"]
    old = tmp_path / "old.yaml"
    old.write_text("parallel:\n  activation_checkpointing: false\n")
    assert load_config(old).parallel.recompute == "none"
    with pytest.raises(TrainConfigError, match="parallel.recompute must be one of none, attention, full"):
        load_config(None, ["parallel.recompute=selective"])
    with pytest.raises(TrainConfigError, match="parallel.activation_checkpointing must be"):
        load_config(None, ["parallel.activation_checkpointing=maybe"])


def test_zero_limits_scale_with_the_rank_share():
    """ZeRO's buckets and ZeRO-3's live-parameter limits are fractions of the rank's parameters P (before ZeRO),
    clamped, on every device; a key set above 0 wins; ZeRO-3's keys only at stage 3, nothing at stage 0."""
    from pretrain.engines import deepspeed_config
    from pretrain.layout import Layout
    from pretrain.zero_limits import zero_limits
    layout = Layout(world_size=4, tensor=1, pipeline=1, data=4)
    config = load_config(None, ["parallel.zero_stage=3", "run.device=cpu", "parallel.stage3_prefetch_bucket_size=123"])
    zero = deepspeed_config(config, layout, rank_parameters=109_000_000)["zero_optimization"]
    assert zero == {"stage": 3, "reduce_bucket_size": 3_406_250, "allgather_bucket_size": 3_406_250,
                    "stage3_max_live_parameters": 6_812_500, "stage3_max_reuse_distance": 6_812_500,
                    "stage3_prefetch_bucket_size": 123, "stage3_param_persistence_threshold": 100_000}
    huge = zero_limits(config.parallel, 7_000_000_000 // 8, 8, 3)     # 7B over TP 8: a rank's stage
    assert (huge["reduce_bucket_size"], huge["stage3_max_live_parameters"]) == (27_343_750, 27_343_750)
    assert zero_limits(config.parallel, 20_000_000_000, 2, 3)["reduce_bucket_size"] == 500_000_000
    assert zero_limits(config.parallel, 1000, 2, 3)["reduce_bucket_size"] == 1_000_000      # the floor
    stage1 = zero_limits(config.parallel, 109_000_000, 4, 1)
    assert sorted(stage1) == ["allgather_bucket_size", "reduce_bucket_size"]
    assert zero_limits(config.parallel, 109_000_000, 4, 0) == {}
    with pytest.raises(TrainConfigError, match="parallel.stage3_max_live_parameters must be >= 0"):
        load_config(None, ["parallel.stage3_max_live_parameters=-1"])


def test_memory_estimate_follows_recompute_and_zero_buffers():
    """--dry-run's estimate: selective recompute keeps less than none and more than whole layers; ZeRO-3 counts
    its gradient bucket and gathered parameters (pretrain/zero_limits.py) and the fp32 clone its optimizer steps."""
    from pretrain.layout import Layout
    from pretrain.preflight import estimate_memory
    sizes = ["model.vocab_size=257", "data.tgt_len=64", "data.mem_len=64"]
    acts = {mode: estimate_memory(load_config(None, sizes + [f"parallel.recompute={mode}"]),
                                  Layout(1, 1, 1, 1)).activations for mode in ("none", "attention", "full")}
    assert acts["full"] < acts["attention"] < acts["none"]
    zero3 = estimate_memory(load_config(None, sizes + ["parallel.zero_stage=3"]), Layout(4, 1, 1, 4))
    zero0 = estimate_memory(load_config(None, sizes), Layout(4, 1, 1, 4))
    assert zero0.zero_buffers == 0 < zero3.zero_buffers < zero3.parameters * 4
    assert zero3.optimizer == zero3.parameters * 12 // 4
    # an asynchronous save's host copy of the rank's share counts where host memory is the device's (CPU) and the
    # snapshot is a host copy; CPU's default snapshot (live) copies nothing, nor does a synchronous save
    zero3_host_copy = estimate_memory(load_config(None, sizes + ["parallel.zero_stage=3",
                                                                 "run.async_snapshot=host_copy"]), Layout(4, 1, 1, 4))
    assert zero3_host_copy.checkpoint_copy == zero3.weights + zero3.optimizer + zero3.memory_store > 0
    on_gpu = estimate_memory(load_config(None, sizes + ["parallel.zero_stage=3"]), Layout(4, 1, 1, 4), cuda=True)
    synchronous = estimate_memory(load_config(None, sizes + ["parallel.zero_stage=3", "run.async_save=false"]),
                                  Layout(4, 1, 1, 4))
    assert on_gpu.checkpoint_copy == synchronous.checkpoint_copy == zero3.checkpoint_copy == 0
    assert on_gpu.total == synchronous.total == zero3.total == zero3_host_copy.total - zero3_host_copy.checkpoint_copy
