"""The fused (FlexAttention) attention path against the eager reference: forward on CPU (FlexAttention's
unfused implementation), forward and backward in bf16 / fp32 on CUDA (the compiled kernel)."""
import pytest
import torch

from helpers import tiny_model

# every variant, and M = N, M < N, M > N for LaMemo (each CPU case costs a few seconds of unfused FlexAttention)
CASES = [(0, 4, 7), (3, 5, 5), (3, 5, 3), (3, 4, 7), (31, 4, 7), (32, 5, 5), (33, 4, 7)]


def make_model(variant, *, d_head=8, seed=0, device="cpu"):
    return tiny_model(37, d_model=2 * d_head, d_head=d_head, variant=variant, seed=seed).to(device)


def run(model, tokens, seg_len, mem_len, backend):
    model.attention_backend = backend
    memory, outs = None, []
    for s in range(tokens.shape[1] // seg_len):
        x = tokens[:, s * seg_len:(s + 1) * seg_len]
        out = model(x, targets=tokens[:, s * seg_len + 1:(s + 1) * seg_len + 1], memory=memory, mem_len=mem_len,
                    return_logits=True)
        outs.append(out)
        memory = out.memory
    return outs


def assert_same(fused, eager, rtol, atol):
    """Segment by segment the same logits and memory; the two sides must hold the same segments and tensors."""
    assert len(fused) == len(eager) > 0, f"{len(fused)} segments against {len(eager)}"
    for f, e in zip(fused, eager, strict=True):
        torch.testing.assert_close(f.logits, e.logits, rtol=rtol, atol=atol)
        assert f.memory.tensors().keys() == e.memory.tensors().keys()
        for name, t in e.memory.tensors().items():
            torch.testing.assert_close(f.memory.tensors()[name], t, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("variant,seg_len,mem_len", CASES)
@torch.no_grad()
def test_fused_forward_equals_eager_on_cpu(variant, seg_len, mem_len):
    model = make_model(variant)
    tokens = torch.randint(0, 37, (2, 3 * seg_len + 1))
    assert_same(run(model, tokens, seg_len, mem_len, "flex"), run(model, tokens, seg_len, mem_len, "eager"),
                rtol=1e-5, atol=1e-5)


def test_backend_choice_and_clear_errors():
    model = make_model(3)
    with pytest.raises(ValueError, match="attention backend"):
        model.attention_backend = "triton"
    model.attention_backend = "flex"
    assert all(layer.attn.backend == "flex" for layer in model.layers)
    tokens = torch.randint(0, 37, (1, 6))
    with pytest.raises(RuntimeError, match="no backward pass on CPU"):
        model.train()(tokens, targets=tokens)
    # Probabilities are an eager feature: asking for them runs the eager path whatever the backend.
    out = model.eval()(tokens, return_attention=True)
    assert "causal" in out.attentions[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled FlexAttention kernel needs CUDA")
@pytest.mark.parametrize("variant", [0, 3, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_eager_on_cuda_forward_and_backward(variant, dtype):
    model = make_model(variant, d_head=16, device="cuda").to(dtype).train()
    tokens = torch.randint(0, 37, (2, 3 * 32 + 1), device="cuda")
    results = {}
    for backend in ("eager", "flex"):
        model.zero_grad(set_to_none=True)
        outs = run(model, tokens, 32, 32, backend)
        sum(o.nll.float().mean() for o in outs).backward()
        results[backend] = (outs, {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None})
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for f, e in zip(results["flex"][0], results["eager"][0], strict=True):
        torch.testing.assert_close(f.nll.float(), e.nll.float(), **tol)
    for name, g in results["eager"][1].items():
        torch.testing.assert_close(results["flex"][1][name], g, **(tol if dtype == torch.float32 else
                                                                 dict(rtol=5e-2, atol=5e-2)), msg=name)


# ---------------------------------------------------------------------------------------------- bench/gpu_check
def test_gpu_check_script_runs_on_cpu_with_a_tiny_model(tmp_path, root):
    """The python behind bench/gpu_check.sh: a tiny model on CPU fills the report's tables; the shell script
    parses and, without CUDA, stops with one clear line."""
    import importlib.util
    import subprocess
    import sys

    spec = importlib.util.spec_from_file_location("gpu_check", root / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    report = tmp_path / "gpu.md"
    assert gpu_check.main(["--tiny", "--device", "cpu", "--backend", "eager", "--dtype", "fp32", "--seg-len", "6",
                           "--mem-len", "6", "--batch", "2", "--steps", "2", "--warmup", "1",
                           "--out", str(report)]) == 0
    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith(("| 3", "| 0"))]
    assert len(rows) == 4                                   # two timing rows, two equality rows
    timing = [float(r.split("|")[5].replace(",", "")) for r in rows[:2]]
    assert all(t > 0 for t in timing)                       # tokens / s
    assert all(r.split("|")[2].strip() == "0.00e+00" for r in rows[2:])   # eager against itself
    assert subprocess.run(["bash", "-n", str(root / "bench" / "gpu_check.sh")]).returncode == 0
    if not torch.cuda.is_available():
        done = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh"), str(tmp_path / "x.md")],
                              env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.strip().startswith("error: no CUDA device")


# ---------------------------------------------------------------------------------------------- trainer keys
def test_attention_backend_and_overlap_config_keys(root):
    from pretrain.config import TrainConfigError, load_config
    from pretrain.engines import attention_backend, deepspeed_config
    from pretrain.layout import Layout

    layout = Layout(world_size=2, tensor=1, pipeline=1, data=2)
    gpu = load_config(root / "configs" / "tiny-cpu.yaml", ["run.device=cuda", "parallel.zero_stage=2",
                                                           "parallel.reduce_bucket_size=1000"])
    zero = deepspeed_config(gpu, layout)["zero_optimization"]
    assert zero == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 1000,
                    "allgather_bucket_size": 1_000_000}       # the floor of pretrain/zero_limits.py (no P given)
    bf16 = load_config(root / "configs" / "tiny-cpu.yaml", ["run.device=cuda", "parallel.precision=bf16",
                                                            "parallel.overlap_comm=false"])
    assert deepspeed_config(bf16, layout)["zero_optimization"]["stage"] == 1          # bf16 runs as stage 1
    assert deepspeed_config(bf16, layout)["zero_optimization"]["overlap_comm"] is False
    cpu = load_config(root / "configs" / "tiny-cpu.yaml", ["run.device=cpu", "parallel.zero_stage=2"])
    assert deepspeed_config(cpu, layout)["zero_optimization"] == {      # buckets, but no side streams on CPU
        "stage": 2, "reduce_bucket_size": 1_000_000, "allgather_bucket_size": 1_000_000}
    assert attention_backend("auto", torch.device("cpu")) == "eager"
    assert attention_backend("auto", torch.device("cuda")) == "flex"
    assert attention_backend("eager", torch.device("cuda")) == "eager"
    with pytest.raises(TrainConfigError, match="attention_backend"):
        load_config(root / "configs" / "tiny-cpu.yaml", ["parallel.attention_backend=triton"])
