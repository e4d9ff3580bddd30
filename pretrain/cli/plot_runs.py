"""Curves of several training runs in one PNG (e.g. LaMemo against Transformer-XL).

    python tools/plot_runs.py runs/wt103-lamemo runs/wt103-xl --out loss.png
    python tools/plot_runs.py runs/a runs/b --metric loss --metric eval/ppl --smooth 20 --logy --out cmp.png
    python tools/plot_runs.py 3f2a...c1 wt103-xl --tracking-uri http://mlflow:5000 --out loss.png

A RUN is
  * a run directory: its ``metrics.jsonl`` (written by pretrain.tracking), or with ``--source mlflow`` (or no
    metrics.jsonl) its MLflow run (``mlflow_run_id``; the embedded ``mlflow.db`` unless --tracking-uri /
    MLFLOW_TRACKING_URI names a server);
  * a metrics.jsonl file;
  * an MLflow run id or run name (in --experiment) at --tracking-uri / MLFLOW_TRACKING_URI.

One panel per --metric (default: loss), one line per run. A step logged twice (a resumed run replaying the
steps after its last checkpoint) keeps its latest value.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.cli_args import OneLineParser, positive_float, positive_int
from pretrain.tracking import EMBEDDED_DB, METRICS_FILE, RUN_ID_FILE, embedded_tracking_uri


class PlotError(Exception):
    """A problem reported as one ``error:`` line (exit code 2)."""


@dataclass
class RunCurves:
    label: str
    source: str
    # metric -> {step: (time_s, value)}
    series: dict[str, dict[int, tuple[float, float]]] = field(default_factory=dict)
    available: list[str] = field(default_factory=list)     # every metric the run has (for error messages)

    def add(self, key: str, step: int, time_s: float, value: float) -> None:
        self.series.setdefault(key, {})[int(step)] = (float(time_s), float(value))


# ---------------------------------------------------------------------------------------------- reading
def read_jsonl(path: Path, label: str) -> RunCurves:
    run = RunCurves(label=label, source=str(path))
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise PlotError(f"cannot read {path}: {err}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if number == len(lines):
                continue                  # a line cut short by a crash mid-write
            raise PlotError(f"{path}:{number} is not a metrics record (JSON with a 'step')") from None
        time_s = float(record.get("time", 0.0) or 0.0)
        for key, value in record.items():
            if key in ("step", "time"):
                continue
            try:
                run.add(key, step, time_s, float(value))
            except (TypeError, ValueError):
                continue
    return run


def _client(tracking_uri: str):
    try:      # mlflow: only for runs read from a tracking server or store, and it may be absent
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise PlotError("reading MLflow runs needs mlflow-skinny (pip install mlflow-skinny)") from None
    return MlflowClient(tracking_uri=tracking_uri)


def read_mlflow(tracking_uri: str, run_ref: str, experiment: str, label: str | None,
                metrics: list[str]) -> RunCurves:
    client = _client(tracking_uri)
    from mlflow.exceptions import MlflowException     # present: _client has imported mlflow
    try:
        run = None
        if re.fullmatch(r"[0-9a-f]{32}", run_ref):
            try:
                run = client.get_run(run_ref)
            except MlflowException:
                run = None
        if run is None:
            if "'" in run_ref:
                raise PlotError(f"run name {run_ref!r} contains a quote; give the run id instead")
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise PlotError(f"no MLflow run {run_ref!r} at {tracking_uri} (no experiment {experiment!r})")
            found = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run_ref}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
            if not found:
                raise PlotError(f"no MLflow run with id or name {run_ref!r} in experiment {experiment!r} "
                                f"at {tracking_uri}")
            run = found[0]
        curves = RunCurves(label=label or run.info.run_name or run.info.run_id,
                           source=f"{tracking_uri} run {run.info.run_id}")
        for key in metrics:
            if key not in run.data.metrics:
                continue
            history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.timestamp, m.step))
            for m in history:                       # later timestamps overwrite: a resumed run's replay wins
                curves.add(key, m.step, m.timestamp / 1000.0, m.value)
        curves.available = sorted(run.data.metrics)
        return curves
    except MlflowException as err:
        raise PlotError(f"MLflow at {tracking_uri}: {err.message}") from None


def load_run(ref: str, *, label: str | None, source: str, tracking_uri: str | None, experiment: str,
             metrics: list[str]) -> RunCurves:
    path = Path(ref)
    env_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if path.is_file():
        if source == "mlflow":
            raise PlotError(f"{ref} is a file; --source mlflow needs a run directory, run id or run name")
        return read_jsonl(path, label or (path.parent.name if path.name == METRICS_FILE else path.stem))
    if path.is_dir():
        jsonl, run_id_file = path / METRICS_FILE, path / RUN_ID_FILE
        if source in ("auto", "jsonl") and jsonl.is_file():
            return read_jsonl(jsonl, label or path.resolve().name)
        if source in ("auto", "mlflow") and run_id_file.is_file():
            uri = env_uri or (embedded_tracking_uri(path) if (path / EMBEDDED_DB).is_file() else None)
            if uri is None:
                raise PlotError(f"{ref} logged to an MLflow server: give --tracking-uri or MLFLOW_TRACKING_URI")
            return read_mlflow(uri, run_id_file.read_text().strip(), experiment, label or path.resolve().name,
                               metrics)
        wanted = {"jsonl": METRICS_FILE, "mlflow": RUN_ID_FILE}.get(source, f"{METRICS_FILE} or {RUN_ID_FILE}")
        raise PlotError(f"{ref} has no {wanted}")
    if source == "jsonl":
        raise PlotError(f"{ref} is not a file or directory")
    if not env_uri:
        raise PlotError(f"{ref} is not a file or directory; to read an MLflow run by id or name give "
                        f"--tracking-uri or MLFLOW_TRACKING_URI")
    return read_mlflow(env_uri, ref, experiment, label, metrics)


# ---------------------------------------------------------------------------------------------- plotting
def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (NaN / inf points are skipped)."""
    if window <= 1:
        return list(values)
    out, buf, total = [], [], 0.0
    for v in values:
        if math.isfinite(v):
            buf.append(v)
            total += v
            if len(buf) > window:
                total -= buf.pop(0)
        out.append(total / len(buf) if buf else float("nan"))
    return out


def plot(runs: list[RunCurves], metrics: list[str], out: Path, *, x_axis: str, window: int, logy: bool,
         width: float, height: float, dpi: int, title: str | None) -> None:
    # matplotlib (about a second to import) loads only when a plot is drawn
    import matplotlib
    from matplotlib.figure import Figure
    matplotlib.use("Agg")
    fig = Figure(figsize=(width, height), dpi=dpi)
    axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, metrics):
        for i, run in enumerate(runs):
            points = run.series.get(key)
            if not points:
                continue
            steps = sorted(points)
            if x_axis == "time":
                t0 = min(t for t, _ in points.values())
                xs = [(points[s][0] - t0) / 3600.0 for s in steps]
            else:
                xs = steps
            ys = [points[s][1] for s in steps]
            color = f"C{i % 10}"
            if window > 1:
                ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(xs, smooth(ys, window), color=color, linewidth=1.5, label=run.label)
            else:
                ax.plot(xs, ys, color=color, linewidth=1.5, label=run.label, marker="o" if len(xs) < 30 else None,
                        markersize=3)
        ax.set_ylabel(key)
        if logy:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("hours" if x_axis == "time" else "step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directory, metrics.jsonl, MLflow run id or name")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--metric", action="append", help="metric to plot, repeatable (default: loss)")
    parser.add_argument("--label", action="append", help="legend label of each RUN, in order (repeatable)")
    parser.add_argument("--source", choices=("auto", "jsonl", "mlflow"), default="auto",
                        help="for run directories: metrics.jsonl (auto prefers it) or the MLflow run")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, or a run "
                                               "directory's embedded mlflow.db)")
    parser.add_argument("--experiment", default="lamemo", help="MLflow experiment for run names")
    parser.add_argument("--x", dest="x_axis", choices=("step", "time"), default="step", help="x axis")
    parser.add_argument("--smooth", type=positive_int, default=1,
                        help="moving-average window in points (raw curve faint)")
    parser.add_argument("--logy", action="store_true", help="log-scale y axis")
    parser.add_argument("--title")
    parser.add_argument("--width", type=positive_float, default=8.0, help="inches")
    parser.add_argument("--height", type=positive_float, default=None, help="inches (default 4.5 per panel)")
    parser.add_argument("--dpi", type=positive_int, default=100)
    args = parser.parse_args(argv)
    metrics = args.metric or ["loss"]
    try:
        if args.label and len(args.label) != len(args.runs):
            raise PlotError(f"{len(args.label)} --label for {len(args.runs)} runs")
        if args.width <= 0 or (args.height is not None and args.height <= 0) or args.dpi <= 0:
            raise PlotError("--width, --height and --dpi must be positive")
        runs = [load_run(ref, label=args.label[i] if args.label else None, source=args.source,
                         tracking_uri=args.tracking_uri, experiment=args.experiment, metrics=metrics)
                for i, ref in enumerate(args.runs)]
        for key in metrics:
            if not any(run.series.get(key) for run in runs):
                available = sorted({k for run in runs for k in (run.available or run.series)})
                raise PlotError(f"no run has metric {key!r} (available: {', '.join(available) or 'none'})")
        height = args.height or 4.5 * len(metrics)
        plot(runs, metrics, Path(args.out), x_axis=args.x_axis, window=args.smooth, logy=args.logy,
             width=args.width, height=height, dpi=args.dpi, title=args.title)
    except PlotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for run in runs:
        for key in metrics:
            points = run.series.get(key)
            if points:
                last = max(points)
                print(f"{run.label}: {key} {points[last][1]:.4f} at step {last} ({len(points)} points)")
            else:
                print(f"{run.label}: no {key}", file=sys.stderr)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
