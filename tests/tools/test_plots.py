"""tools/plot_runs.py and tools/attention_utilization.py write valid PNGs of the requested size (and the
attention CSV holds a correct distance histogram)."""
from __future__ import annotations

import csv
import json
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, tiny_config

from lamemo_parallel import LaMemoModel
from pretrain.cli import attention_utilization, plot_runs
from pretrain.tracking import Tracker

SIZE = ["--width", "6", "--height", "4", "--dpi", "50"]       # 300 x 200 pixels


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature and that it decodes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    from PIL import Image
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        image.load()
        assert image.size == (width, height)
    return width, height


def write_metrics(run_dir: Path, losses: dict[int, float], extra: dict | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step, loss in losses.items():
            f.write(json.dumps({"step": step, "time": 1000.0 + step, "loss": loss, **(extra or {})}) + "\n")


def test_plot_runs_from_metrics_jsonl(tmp_path, capsys):
    write_metrics(tmp_path / "lamemo", {s: 5.0 / s for s in range(1, 41)})
    write_metrics(tmp_path / "xl", {s: 5.5 / s for s in range(1, 41)}, {"eval_ppl": 30.0})
    out = tmp_path / "plots" / "loss.png"
    assert plot_runs.main([str(tmp_path / "lamemo"), str(tmp_path / "xl" / "metrics.jsonl"), "--out", str(out),
                           "--smooth", "5", "--logy", *SIZE]) == 0
    assert png_size(out) == (300, 200)
    assert "lamemo: loss 0.1250 at step 40" in capsys.readouterr().out
    two = tmp_path / "two.png"
    assert plot_runs.main([str(tmp_path / "lamemo"), str(tmp_path / "xl"), "--metric", "loss", "--metric",
                           "eval_ppl", "--x", "time", "--label", "LaMemo", "--label", "XL", "--out", str(two),
                           "--width", "5", "--dpi", "40"]) == 0
    assert png_size(two) == (200, 360)                  # default height: 4.5 in per panel


def test_plot_runs_resumed_steps_keep_the_latest_value(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 4, "lo')   # crash mid-write
    run = plot_runs.read_jsonl(path, "r")
    assert {s: v for s, (_, v) in run.series["loss"].items()} == {1: 3.0, 2: 1.5, 3: 1.0}


@pytest.mark.slow
def test_plot_runs_from_mlflow_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir, run_name="tiny", enabled=True)
    tracker.start({"model.variant": 3}, resume=False)
    for step in range(1, 6):
        tracker.log_metrics(step, {"loss": 4.0 - 0.5 * step})
    tracker.finish()
    (run_dir / "metrics.jsonl").unlink()               # so that only MLflow can answer
    out = tmp_path / "mlflow.png"
    assert plot_runs.main([str(run_dir), "--source", "mlflow", "--out", str(out), *SIZE]) == 0
    assert png_size(out) == (300, 200)
    uri = f"sqlite:///{run_dir.resolve()}/mlflow.db"
    by_name = tmp_path / "by-name.png"
    assert plot_runs.main(["tiny", "--tracking-uri", uri, "--out", str(by_name), *SIZE]) == 0
    assert png_size(by_name) == (300, 200)


def test_plot_runs_errors(tmp_path, capsys):
    write_metrics(tmp_path / "a", {1: 1.0})
    assert plot_runs.main([str(tmp_path / "a"), "--metric", "nope", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: no run has metric 'nope' (available: loss)"]
    assert plot_runs.main([str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------- attention
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    for name, variant in (("lamemo", 3), ("xl", 0)):
        config = tiny_config(40, variant=variant, tgt_len=6, mem_len=6)
        LaMemoModel(config).save_pretrained(root / name)
    ids = root / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 40, 61))
    return root


def test_attention_utilization_png_and_csv(models, tmp_path, capsys):
    out = tmp_path / "att.png"
    argv = [str(models / "lamemo"), str(models / "xl"), "--ids", str(models / "ids.npy"), "--out", str(out),
            "--per-layer", "--no-progress", "--json", *SIZE]
    assert attention_utilization.main(argv) == 0
    assert png_size(out) == (300, 200)
    summary = json.loads(capsys.readouterr().out)
    assert [m["model"] for m in summary["models"]] == ["lamemo", "xl"]
    assert all(0 < m["memory_share"] < 1 and m["tokens"] == 60 for m in summary["models"])
    rows = list(csv.DictReader(open(tmp_path / "att.csv")))
    assert set(rows[0]) == {"model", "kind", "layer", "distance", "mean_weight", "count"}
    kinds = {(r["model"], r["kind"]) for r in rows}
    assert kinds == {("lamemo", "causal"), ("lamemo", "lookahead"), ("xl", "causal")}
    # Each (query, head) spreads a weight of 1 over its keys: per layer, sum(mean * count) = queries * heads.
    mass = defaultdict(float)
    for r in rows:
        if r["kind"] == "causal":
            mass[(r["model"], r["layer"])] += float(r["mean_weight"]) * int(r["count"])
    assert all(value == pytest.approx(60 * 2 * (2 if layer == "all" else 1), rel=1e-6)
               for (_, layer), value in mass.items())
    distances = [int(r["distance"]) for r in rows if r["kind"] == "causal"]
    assert min(distances) == 0 and max(distances) == 6 + 6 - 1
    ahead = [int(r["distance"]) for r in rows if r["kind"] == "lookahead"]
    assert min(ahead) == 1 and max(ahead) == 6


def test_attention_histogram_by_distance():
    """Hand-made weights: 2 current rows after 1 memory row; query t sits at absolute position 1 + t."""
    result = attention_utilization.Utilization("m", 1, [attention_utilization.Histogram()], [])
    probs = torch.tensor([[[[0.25, 0.75, 0.0],          # t=0: key 0 at distance 1, key 1 at distance 0
                            [0.5, 0.25, 0.25]]]])       # t=1: distances 2, 1, 0
    attention_utilization._add_causal(result, 0, probs)
    assert list(result.causal[0].rows()) == [(0, 0.5, 2), (1, 0.25, 2), (2, 0.5, 1)]
    assert result.memory_mass == pytest.approx(0.75) and result.memory_queries == 2
    assert result.distance_mass == pytest.approx(0.25 + 1.0 + 0.25)


def test_attention_utilization_errors_and_text_input(models, tmp_path, capsys):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([1, 2, 99]))
    assert attention_utilization.main([str(models / "xl"), "--ids", str(bad), "--out",
                                       str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: token id 99 is outside the vocabulary")
    assert attention_utilization.main([str(tmp_path / "nope"), "--ids", str(bad), "--out",
                                       str(tmp_path / "a.png")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    # --text goes through the model's tokenizer (here a byte tokenizer: a model with 257 ids).
    from pretrain.data.tokenizer import ByteTokenizer
    model_dir = tmp_path / "bytes"
    LaMemoModel(tiny_config(257, n_layer=1, tgt_len=8)).save_pretrained(model_dir)
    ByteTokenizer().save(model_dir / "tokenizer")
    text = tmp_path / "t.txt"
    text.write_text("look-ahead memory\nrefreshes the memory states\n")
    assert attention_utilization.main([str(model_dir), "--text", str(text), "--out", str(tmp_path / "t.png"),
                                       "--csv", str(tmp_path / "t.csv"), "--no-progress", *SIZE]) == 0
    assert png_size(tmp_path / "t.png") == (300, 200) and (tmp_path / "t.csv").is_file()


def test_tools_run_as_scripts(tmp_path):
    """``python tools/X.py`` from the repository root: usage errors exit 2 with one error line."""
    result = subprocess.run([sys.executable, "tools/plot_runs.py", str(tmp_path / "none"), "--out",
                             str(tmp_path / "x.png")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
