"""Tensor parallelism (megatron-core on gloo) against the single-device model: per-token nll, memory,
gradients, weight round trips, dropout RNG, and clear errors.

Each multi-process launch costs several seconds of imports, so one launch per TP size runs every check and
writes its results to files; the tests below compare them with the single-device model in this process.
"""
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lamemo_parallel import ConfigError, LaMemoConfig, LaMemoModel
from lamemo_parallel.rng import SplitDropout, split_rng

from helpers import free_port

BATCH, SEG_LEN, MEM_LEN, N_SEG = 2, 4, 6, 4


def make_config(variant, n_head=2, **overrides):
    # its own size: heads of 4 whose count divides by the TP degree; vocabulary 41 needs padding on every degree
    cfg = dict(vocab_size=41, n_layer=2, d_model=16, n_head=n_head, d_head=4, d_inner=24, variant=variant,
               init_std=0.3)
    cfg.update(overrides)
    return LaMemoConfig(**cfg)


def random_state_dict(config, seed):
    torch.manual_seed(seed)
    model = LaMemoModel(config)
    with torch.no_grad():                     # non-zero biases everywhere (output bias, fc biases, LayerNorms)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.state_dict()


def run_segments(model, tokens, *, with_logits=True):
    """Per segment: nll [B, N], logits [B, N, V], the memory after it; and the summed nll (for backward)."""
    memory, nlls, logits, memories, total = None, [], [], [], 0.0
    for s in range(N_SEG):
        window = tokens[:, s * SEG_LEN:(s + 1) * SEG_LEN + 1]
        out = model(window[:, :-1], targets=window[:, 1:], memory=memory, mem_len=MEM_LEN,
                    return_logits=with_logits)
        total = total + out.nll.sum()
        nlls.append(out.nll.detach())
        logits.append(None if out.logits is None else out.logits.detach())
        memories.append(out.memory)
        memory = out.memory
    return nlls, logits, memories, total


# ============================================================================ worker (one process per TP rank)
def _worker(rank, world, port, workdir, cases):
    torch.set_num_threads(1)
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")     # silences megatron's async-allreduce advice
    from megatron.core import parallel_state

    from lamemo_parallel import CheckpointMismatchError
    from lamemo_parallel.megatron_parts import is_split
    from lamemo_parallel.tensor_parallel import TensorParallelLaMemoModel

    workdir = Path(workdir)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
        results = {}
        for name in cases:
            case = torch.load(workdir / f"{name}.pt")
            config = LaMemoConfig.from_dict(case["config"])
            model = TensorParallelLaMemoModel.from_full_state_dict(config, case["state_dict"]).train()
            nlls, logits, memories, total = run_segments(model, case["tokens"])
            total.backward()
            params = dict(model.named_parameters())
            gathered = [model.gather_memory(m) for m in memories]
            results[name] = {
                "nll": nlls, "logits": logits,
                "memory": [m.tensors() for m in gathered],
                "memory_round_trip": all(
                    all(torch.equal(a, b) for a, b in zip(model.shard_memory(g).tensors().values(),
                                                          m.tensors().values(), strict=True))
                    for g, m in zip(gathered, memories, strict=True)),
                "grads": model.to_full_layout({n: p.grad for n, p in params.items()}),
                "replicated_grads": {n: p.grad.clone() for n, p in params.items() if not is_split(p)},
                "state_dict": model.full_state_dict(),
                "local_keys": list(model.state_dict()),
            }
            if name == "v3":
                if rank == 0:                  # a single-device model directory, read back tensor by tensor
                    single = LaMemoModel(config)
                    single.load_state_dict(case["state_dict"])
                    single.save_pretrained(workdir / "export")
                dist.barrier()
                reloaded = TensorParallelLaMemoModel.from_pretrained(workdir / "export")
                results["reloaded_equal"] = all(torch.equal(a, b) for a, b in
                                                zip(reloaded.state_dict().values(), model.state_dict().values()))
                torch.manual_seed(1234)
                results["seeded_init"] = TensorParallelLaMemoModel(config).full_state_dict()
                bad = dict(case["state_dict"])
                bad["layers.0.attn.q_proj.weight"] = bad["layers.0.attn.q_proj.weight"][:-1]
                del bad["output_bias"]
                try:
                    model.load_full_state_dict(bad)
                except CheckpointMismatchError as err:
                    results["mismatch_error"] = str(err)
                try:
                    TensorParallelLaMemoModel(make_config(3, n_head=5))
                except ConfigError as err:
                    results["heads_error"] = str(err)
        if (workdir / "dropout.pt").exists():
            results["dropout"] = _dropout_checks(workdir)
        torch.save(results, workdir / f"rank{rank}.pt")
    finally:                                  # an exception reaches the test through mp.spawn, with its traceback
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _dropout_checks(workdir):
    """With dropout on: capture the output of every dropout module over two segments, for two seeds."""
    from lamemo_parallel.tensor_parallel import TensorParallelLaMemoModel

    case = torch.load(Path(workdir) / "dropout.pt")
    model = TensorParallelLaMemoModel.from_full_state_dict(LaMemoConfig.from_dict(case["config"]),
                                                           case["state_dict"]).train()
    captured = {}

    def hook(name):
        def record(module, inputs, output):
            captured.setdefault(name, []).append((inputs[0].detach().clone(), output.detach().clone()))
        return record

    model.drop.register_forward_hook(hook("replicated.drop"))
    for i, layer in enumerate(model.layers):
        layer.attn.drop.register_forward_hook(hook(f"replicated.{i}.attn.drop"))
        layer.ff.drop_out.register_forward_hook(hook(f"replicated.{i}.ff.drop_out"))
        layer.attn.dropatt.register_forward_hook(hook(f"split.{i}.attn.dropatt"))
        layer.ff.drop_inner.register_forward_hook(hook(f"split.{i}.ff.drop_inner"))

    runs = {}
    for label, seed in (("a", 11), ("b", 11), ("c", 12)):
        captured.clear()
        torch.manual_seed(seed)
        memory, nlls = None, []
        for s in range(2):
            window = case["tokens"][:, s * SEG_LEN:(s + 1) * SEG_LEN + 1]
            out = model(window[:, :-1], targets=window[:, 1:], memory=memory, mem_len=MEM_LEN)
            nlls.append(out.nll.detach())
            memory = out.memory
        runs[label] = {"nll": nlls, "captured": dict(captured), "after": torch.rand(4)}
    return runs


def launch(workdir, world, cases):
    mp.spawn(_worker, args=(world, free_port(), str(workdir), cases), nprocs=world, join=True)
    return [torch.load(workdir / f"rank{r}.pt") for r in range(world)]


# ============================================================================ single-device reference
def write_case(workdir, name, config, seed):
    torch.manual_seed(seed + 100)
    tokens = torch.randint(0, config.vocab_size, (BATCH, N_SEG * SEG_LEN + 1))
    torch.save({"config": config.to_dict(), "state_dict": random_state_dict(config, seed), "tokens": tokens},
               workdir / f"{name}.pt")


def reference(workdir, name):
    case = torch.load(workdir / f"{name}.pt")
    model = LaMemoModel(LaMemoConfig.from_dict(case["config"]))
    model.load_weights(case["state_dict"])
    nlls, logits, memories, total = run_segments(model.train(), case["tokens"])
    total.backward()
    return {"nll": nlls, "logits": logits, "memory": [m.tensors() for m in memories],
            "grads": {n: p.grad for n, p in model.named_parameters()}, "state_dict": case["state_dict"]}


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tp2")
    write_case(workdir, "v0", make_config(0), seed=1)
    write_case(workdir, "v3", make_config(3), seed=2)
    write_case(workdir, "dropout", make_config(3, dropout=0.25, dropatt=0.25), seed=3)
    return workdir, launch(workdir, 2, ["v0", "v3"])


@pytest.fixture(scope="module")
def tp4(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tp4")
    write_case(workdir, "v3_4heads", make_config(3, n_head=4, d_inner=32, pre_lnorm=True), seed=4)
    return workdir, launch(workdir, 4, ["v3_4heads"])


def assert_close(actual, expected, what, rtol=1e-5):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().clamp(min=1e-12)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3g} vs scale {scale:.3g}"


def check_against_single_device(workdir, ranks, name):
    ref = reference(workdir, name)
    for rank, results in enumerate(ranks):
        got = results[name]
        for s in range(N_SEG):
            assert_close(got["nll"][s], ref["nll"][s], f"rank {rank} segment {s} nll")
            assert_close(got["logits"][s], ref["logits"][s], f"rank {rank} segment {s} logits")
            assert got["memory"][s].keys() == ref["memory"][s].keys()
            for key, tensor in ref["memory"][s].items():
                assert_close(got["memory"][s][key], tensor, f"rank {rank} segment {s} memory {key}")
        assert got["memory_round_trip"]
        assert list(got["grads"]) == list(ref["grads"])
        for key, grad in ref["grads"].items():
            assert_close(got["grads"][key], grad, f"rank {rank} grad {key}")
        # exact weight round trip, in the single-device layout and order; local names = single-device names
        assert list(got["state_dict"]) == list(ref["state_dict"]) == got["local_keys"]
        for key, tensor in ref["state_dict"].items():
            assert torch.equal(got["state_dict"][key], tensor), key
    # replicated parameters (LayerNorms, fc2 bias) get the same gradient on every TP rank, bit for bit
    first = ranks[0][name]["replicated_grads"]
    assert any(".norm." in key for key in first) and any("fc2.bias" in key for key in first)
    for results in ranks[1:]:
        for key, grad in results[name]["replicated_grads"].items():
            assert torch.equal(grad, first[key]), key


# ============================================================================ tests
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", ["v0", "v3"])
def test_tp2_matches_single_device(tp2, name):
    workdir, ranks = tp2
    check_against_single_device(workdir, ranks, name)


@pytest.mark.slow
@pytest.mark.distributed
def test_tp4_matches_single_device(tp4):
    workdir, ranks = tp4
    check_against_single_device(workdir, ranks, "v3_4heads")


@pytest.mark.slow
@pytest.mark.distributed
def test_tp_export_and_seeded_init_match_single_device(tp2):
    workdir, ranks = tp2
    exported = LaMemoModel.from_pretrained(workdir / "export")
    case = torch.load(workdir / "v3.pt")
    for key, tensor in case["state_dict"].items():
        assert torch.equal(exported.state_dict()[key], tensor), key
    torch.manual_seed(1234)
    fresh = LaMemoModel(LaMemoConfig.from_dict(case["config"])).state_dict()
    for results in ranks:
        assert results["reloaded_equal"]
        assert list(results["seeded_init"]) == list(fresh)
        for key, tensor in fresh.items():
            assert torch.equal(results["seeded_init"][key], tensor), key


@pytest.mark.slow
@pytest.mark.distributed
def test_tp_errors_are_clear(tp2):
    _, ranks = tp2
    message = ranks[0]["mismatch_error"]
    assert "missing tensors: output_bias" in message
    assert "layers.0.attn.q_proj.weight (checkpoint (7, 16), model (8, 16))" in message
    assert "n_head=5 is not divisible by the tensor-parallel size 2" in ranks[0]["heads_error"]


@pytest.mark.slow
@pytest.mark.distributed
def test_tp_dropout_masks(tp2):
    """Same seed -> identical runs; replicated dropouts agree across TP ranks, split ones differ."""
    _, ranks = tp2
    runs = [r["dropout"] for r in ranks]
    for rank_runs in runs:
        a, b, c = rank_runs["a"], rank_runs["b"], rank_runs["c"]
        assert all(torch.equal(x, y) for x, y in zip(a["nll"], b["nll"], strict=True))
        assert a["captured"].keys() == b["captured"].keys()
        for key in a["captured"]:
            for (_, out_a), (_, out_b) in zip(a["captured"][key], b["captured"][key], strict=True):
                assert torch.equal(out_a, out_b), key
        assert not torch.equal(a["nll"][0], c["nll"][0])
    for run in ("a", "c"):
        first, second = runs[0][run], runs[1][run]
        for s in range(2):
            assert torch.equal(first["nll"][s], second["nll"][s])        # outputs are replicated
        assert torch.equal(first["after"], second["after"])             # the default stream stays in step
        for key, calls in first["captured"].items():
            assert len(calls) == len(second["captured"][key])
            if key.startswith("replicated"):
                for (in0, out0), (in1, out1) in zip(calls, second["captured"][key], strict=True):
                    assert torch.equal(in0, in1) and torch.equal(out0, out1), key
                    assert (out0 == 0).any() and (out0 != 0).any(), key       # dropout really acted
            else:
                differ = 0
                for (in0, out0), (in1, out1) in zip(calls, second["captured"][key], strict=True):
                    both = (in0 != 0) & (in1 != 0)
                    differ += int(((out0 == 0) != (out1 == 0))[both].sum())
                assert differ > 0, key


def test_split_dropout_single_process():
    x = torch.ones(64, 64)
    masks, after = {}, {}
    for rank in (0, 1, 0):
        torch.manual_seed(5)
        masks.setdefault(rank, []).append(SplitDropout(0.5, rank).train()(x) == 0)
        after.setdefault(rank, []).append(torch.rand(8))
    assert torch.equal(masks[0][0], masks[0][1])                      # reproducible
    assert not torch.equal(masks[0][0], masks[1][0])                  # rank-dependent
    assert torch.equal(after[0][0], after[1][0])                      # the replicated stream is unaffected
    assert 0.4 < masks[1][0].float().mean() < 0.6
    assert SplitDropout(0.5, 0).eval()(x) is x
    torch.manual_seed(5)
    with split_rng("cpu", 3):
        torch.rand(3)
    state = torch.get_rng_state()
    torch.manual_seed(5)
    torch.randint(0, 1 << 62, (1,))
    assert torch.equal(torch.get_rng_state(), state)                  # exactly one draw, whatever the body does


def test_layout_check_without_process_group():
    """``sharding.check_layout``: the one place the divisibility rules are written (one ConfigError naming
    every problem); the vocabulary is padded, never a problem."""
    from lamemo_parallel.sharding import check_layout, padded_vocab_size

    with pytest.raises(ConfigError, match="n_head=3 is not divisible by the tensor-parallel size 2"):
        check_layout(make_config(3, n_head=3), 2)
    with pytest.raises(ConfigError, match="d_inner=22 is not divisible by the tensor-parallel size 4"):
        check_layout(make_config(3, n_head=4, d_inner=22), 4)
    with pytest.raises(ConfigError, match="n_layer=2 is fewer than the 3 pipeline stages"):
        check_layout(make_config(3, n_head=4, n_layer=2), 1, 3)
    with pytest.raises(ConfigError, match="positive integer"):
        check_layout(make_config(3), 0)
    check_layout(make_config(3, n_head=4, vocab_size=41), 4)
    assert padded_vocab_size(41, 4) == 44 and padded_vocab_size(40, 4) == 40
