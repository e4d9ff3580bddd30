"""The shipped mixture example end to end (a tiny version of configs/mixture-cpu.yaml on data prepared by
tools/prepare_mixture_example.py): train, per-source metrics in metrics.jsonl and MLflow, per-source evaluation
that the export reproduces, bitwise resume; and the start-up refusals of bad source lists."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, losses, subprocess_env
from pretrain.cli.prepare_mixture_example import main as prepare_main
from pretrain.train import main as train_main

CONFIG = ROOT / "configs" / "mixture-cpu.yaml"
STEPS = 6
NAMES = ("wikitext2", "shakespeare")


@pytest.fixture(scope="module")
def mixture_data(tmp_path_factory) -> Path:
    """The example's data from the real tool, cut to 40,000 characters a text and a 600-piece BPE."""
    out = tmp_path_factory.mktemp("mixture-data")
    assert prepare_main(["--out-dir", str(out), "--limit-chars", "40000", "--vocab-size", "600",
                         "--workers", "1"]) == 0
    return out


def train(overrides: list[str]) -> subprocess.CompletedProcess:
    """One process of ``python -m pretrain.train`` on the example config (no launcher: its exit code is ours)."""
    return subprocess.run([sys.executable, "-m", "pretrain.train", "--config", str(CONFIG), *overrides],
                          capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=600)


def data_overrides(data: Path, *, train_weights=(3, 1)) -> list[str]:
    train = ", ".join(f"{{name: {n}, path: {data / n / 'train'}, weight: {w}}}" for n, w in zip(NAMES, train_weights))
    valid = ", ".join(f"{{name: {n}, path: {data / n / 'valid'}}}" for n in NAMES)
    return [f"data.train=[{train}]", f"data.valid=[{valid}]", f"data.tokenizer={data / 'tokenizer'}"]


def tiny(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*data_overrides(data), f"run.dir={run_dir}", f"run.steps={STEPS}", "data.tgt_len=8", "data.mem_len=8",
            "data.micro_batch_size=2", "data.span_len=16", "model.n_layer=2", "model.d_model=16", "model.n_head=4",
            "model.d_inner=32", "model.dropout=0.1", "run.eval_tokens=200", "run.eval_interval=0",
            "run.save_interval=0", "run.log_interval=1", "optim.warmup_steps=0", *extra]


def records(run_dir: Path) -> dict[int, dict]:
    """step -> the merged records of that step (a resumed run's later lines win)."""
    out: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.setdefault(record["step"], {}).update(record)
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_mixture_example_trains_evaluates_per_source_resumes_bitwise_and_exports(mixture_data, tmp_path):
    straight = train(tiny(mixture_data, tmp_path / "straight", "run.mlflow=true"))
    assert straight.returncode == 0, straight.stderr[-4000:]
    assert "source shakespeare:" in straight.stdout and "expected share 0.250" in straight.stdout
    recs = records(tmp_path / "straight")
    for step in range(1, STEPS + 1):                   # every step: all streams' target tokens, per source
        tokens = [recs[step][f"data/tokens/{n}"] for n in NAMES]
        assert sum(tokens) == step * 2 * 8
    last = recs[STEPS]
    assert all(last[f"data/tokens/{n}"] > 0 and last[f"data/epoch/{n}"] > 0 for n in NAMES)   # spans of 16: both read
    for n in NAMES:
        assert last[f"valid/{n}/ppl"] == pytest.approx(torch.tensor(last[f"valid/{n}/loss"]).exp().item(), rel=1e-6)
    assert last["valid/loss"] == last["eval_loss"]
    from lamemo_parallel import LaMemoModel
    from lamemo_parallel.inference import evaluate_tokens
    from pretrain.data.indexed import load_tokens
    model = LaMemoModel.from_pretrained(tmp_path / "straight" / "final")
    results = [evaluate_tokens(model, torch.from_numpy(load_tokens(mixture_data / n / "valid").astype("int64"))[:201],
                               tgt_len=8, mem_len=8) for n in NAMES]
    for n, r in zip(NAMES, results):
        assert r.loss == pytest.approx(last[f"valid/{n}/loss"], rel=1e-5)
    total = sum(r.nll_sum for r in results) / sum(r.n_tokens for r in results)
    assert last["valid/loss"] == pytest.approx(total, rel=1e-5)      # token-weighted over the sources
    from mlflow.tracking import MlflowClient
    from pretrain.tracking import RUN_ID_FILE, embedded_tracking_uri
    client = MlflowClient(embedded_tracking_uri(tmp_path / "straight"))
    run_id = (tmp_path / "straight" / RUN_ID_FILE).read_text().strip()
    logged = client.get_run(run_id).data.metrics
    for key in ("valid/loss", "valid/wikitext2/loss", "valid/shakespeare/ppl", "data/tokens/wikitext2",
                "data/epoch/shakespeare"):
        assert logged[key] == pytest.approx(last[key]), key

    first = train(tiny(mixture_data, tmp_path / "resumed", "run.exit_after=3", "run.mlflow=false"))
    assert first.returncode == 0 and "stopping at step 3" in first.stdout, first.stderr[-4000:]
    second = train(tiny(mixture_data, tmp_path / "resumed", "run.mlflow=false"))
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr[-4000:]
    again = records(tmp_path / "resumed")
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")           # bitwise
    for step in range(1, STEPS + 1):
        assert all(again[step][f"data/tokens/{n}"] == recs[step][f"data/tokens/{n}"] for n in NAMES)
    assert again[STEPS]["valid/loss"] == last["valid/loss"]

    reweighted = train(tiny(mixture_data, tmp_path / "resumed", "run.mlflow=false", "run.steps=8")
                        + [data_overrides(mixture_data, train_weights=(1, 1))[0]])
    assert reweighted.returncode == 2 and "Traceback" not in reweighted.stderr
    error = [line for line in reweighted.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and re.search(r"wikitext2 \(.*\): weight 3.0 -> 1.0", error[0]), reweighted.stderr[-2000:]
    assert "run.data_changed=restart_streams" in error[0]


@pytest.mark.parametrize("case", ["missing", "tokenizer", "negative", "text", "zero", "duplicate", "short"])
def test_bad_sources_stop_before_step_one_with_one_line(mixture_data, tmp_path, capsys, case):
    """Each bad input of the issue's item 5: one ``error:`` line, exit 2, nothing written (the --dry-run runs the
    same start-up checks without building anything; the missing source also through a real launch below)."""
    data = mixture_data
    entries = {
        "missing": f"[{{name: a, path: {data / 'nowhere'}, weight: 1}}, {{name: b, path: {data / 'shakespeare/train'}, weight: 1}}]",
        "negative": f"[{{path: {data / 'wikitext2/train'}, weight: -1}}, {{path: {data / 'shakespeare/train'}, weight: 1}}]",
        "text": f"[{{path: {data / 'wikitext2/train'}, weight: much}}, {{path: {data / 'shakespeare/train'}, weight: 1}}]",
        "zero": f"[{{name: a, path: {data / 'wikitext2/train'}, weight: 0}}, {{name: b, path: {data / 'shakespeare/train'}, weight: 0}}]",
        "duplicate": f"[{{path: {data / 'wikitext2/train'}, weight: 1}}, {{path: {data / 'shakespeare/train'}, weight: 1}}]",
        "short": f"[{{name: a, path: {data / 'wikitext2/train'}, weight: 1}}, {{name: b, path: {data / 'shakespeare/train'}, weight: 1}}]",
    }
    expected = {"missing": "source 'a'.*meta.json is missing", "tokenizer": "source 'b'.*another tokenizer",
                "negative": r"weight must be >= 0", "text": "weight must be a number", "zero": "all weights are zero",
                "duplicate": "two sources are named 'train'", "short": "source 'a' is too short"}
    if case == "tokenizer":
        from pretrain.data.indexed import preprocess
        from pretrain.data.tokenizer import train_tokenizer
        train_tokenizer("byte", [], tmp_path / "byte")
        preprocess([data / "shakespeare" / "train.txt"], tmp_path / "byte", tmp_path / "bytes", workers=1,
                   progress=False)
        entries[case] = f"[{{name: a, path: {data / 'wikitext2/train'}, weight: 1}}, {{name: b, path: {tmp_path / 'bytes'}, weight: 1}}]"
    span = ["data.span_len=4096"] if case == "short" else []
    code = train_main(["--config", str(CONFIG), "--dry-run", f"data.train={entries[case]}",
                       f"data.tokenizer={data / 'tokenizer'}", "data.valid=", f"run.dir={tmp_path / 'run'}", *span])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: data.train"), err
    assert re.search(expected[case], err[0]), err[0]
    assert not (tmp_path / "run").exists()
    if case == "missing":                      # the real start-up: exit 2, one line, no metrics or checkpoint
        result = train([f"data.train={entries[case]}", f"data.tokenizer={data / 'tokenizer'}", "data.valid=",
                            f"run.dir={tmp_path / 'run'}", "run.mlflow=false"])
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
        assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_dry_run_prints_each_source_with_share_and_epochs(mixture_data, tmp_path, capsys):
    code = train_main(["--config", str(CONFIG), "--dry-run", *data_overrides(mixture_data), "run.steps=1000",
                       f"run.dir={tmp_path / 'run'}"])
    out = capsys.readouterr().out
    assert code == 0 and not (tmp_path / "run").exists()
    assert "mixture: 2 sources, spans of 512 tokens (data.span_len 512), 8 streams, 512,000 target tokens" in out
    from pretrain.data.indexed import load_tokens
    for name, share in zip(NAMES, (0.75, 0.25)):
        tokens = len(load_tokens(mixture_data / name / "train"))
        epochs = 512_000 * share / ((tokens - 1) // 512 * 512)
        assert (f"source {name}: {tokens:,} tokens, weight {3 if name == 'wikitext2' else 1}, expected share "
                f"{share:.3f}, {epochs:.2f} epochs in this run") in out


@pytest.mark.slow
@pytest.mark.distributed
def test_span_memory_reset_empties_the_memory_where_spans_begin_and_resumes_bitwise(mixture_data, tmp_path):
    """tgt_len 8 and span_len 32: steps 1 and 5 begin new spans. With data.span_memory=reset, step 5's loss is the
    loss of its segments with an empty memory under the weights after step 4 (the exported step-4 checkpoint);
    with keep (the default) steps 1-4 are bitwise the same and step 5 differs. A reset run stopped after step 4
    (so the reset happens in the resumed process, on the restored memory) is bitwise equal to the straight one."""
    from lamemo_parallel import LaMemoModel
    from pretrain.checkpoint.export import export_checkpoint
    from pretrain.checkpoint.format import CHECKPOINTS, step_tag
    from pretrain.config import load_config
    from pretrain.data.mixture import build_streams
    from pretrain.preflight import check_data
    settings = ("model.dropout=0", "optim.schedule=constant", "optim.lr=0.01", "data.span_len=32", "run.steps=5",
                "run.mlflow=false")       # a large lr: after 4 steps the attention uses the memory visibly
    reset = tiny(mixture_data, tmp_path / "reset", *settings, "data.span_memory=reset", "run.save_interval=4")
    for overrides in (reset, tiny(mixture_data, tmp_path / "keep", *settings)):
        done = train(overrides)
        assert done.returncode == 0, done.stderr[-4000:]
    kept, emptied = losses(tmp_path / "keep"), losses(tmp_path / "reset")
    assert [kept[s] for s in range(1, 5)] == [emptied[s] for s in range(1, 5)]     # the same until the boundary

    export_checkpoint(tmp_path / "reset" / CHECKPOINTS / step_tag(4), tmp_path / "step4")
    model = LaMemoModel.from_pretrained(tmp_path / "step4").eval()
    config = load_config(CONFIG, reset)
    streams = build_streams(check_data(config, verify_checksums=False, log=lambda _: None).train, config.data,
                            dp_size=1, dp_rank=0)
    for _ in range(4):
        streams.next_step()
    assert streams.new_span_rows() == [[True, True]]                # every row of the one micro-batch
    [(inputs, targets)] = streams.next_step()                       # step 5's segments, one micro-batch
    with torch.no_grad():
        empty = model(inputs, targets=targets, memory=None).nll.float().mean().item()
    assert emptied[5] == pytest.approx(empty, rel=1e-6)           # (the parallel model matches it to ~1e-7 here)
    assert abs(kept[5] - empty) > 1e-5 * empty                      # keep: ~4e-5 away, the memory counts

    first = train(tiny(mixture_data, tmp_path / "resumed", *settings, "data.span_memory=reset", "run.exit_after=4"))
    assert first.returncode == 0 and "stopping at step 4" in first.stdout, first.stderr[-4000:]
    second = train(tiny(mixture_data, tmp_path / "resumed", *settings, "data.span_memory=reset"))
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr[-4000:]
    assert losses(tmp_path / "resumed") == emptied                  # bitwise
