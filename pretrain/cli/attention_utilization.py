"""Average attention weight against relative distance for exported models on a token file (the paper's
Figure 1: how much a model reads its memory), to a PNG and a CSV.

    python tools/attention_utilization.py exports/lamemo exports/xl --tokens data/wt103/valid \\
        --max-tokens 20000 --out attention.png            # also attention.csv
    python tools/attention_utilization.py MODEL --ids tokens.npy --out att.png --csv att.csv
    python tools/attention_utilization.py MODEL --text valid.txt --out att.png   # MODEL/tokenizer

The tokens are cut into ``--batch-size`` contiguous streams and run segment by segment with streaming
memory, as in evaluation. For every current query at absolute position a and key position j the distance
is a - j (0 = itself, up to M+N-1 deep into the memory); the curve is the mean weight at each distance over
all queries, heads and segments that have a key there (per layer, and over all layers). LaMemo models
also give the look-ahead attention of the memory rows against the future distance p - i.

CSV columns: model, kind (causal | lookahead), layer (0.. or "all"), distance, mean_weight, count.
The summary gives, per model, the share of attention on memory keys (segments with memory only), the mean
attention distance and the loss.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lamemo_parallel import LaMemoModel
from lamemo_parallel.inference import segment_count, segments, split_streams
from pretrain.cli.model_inputs import check_token_file, load_model, model_tokenizer
from pretrain.data.indexed import load_tokens
from pretrain.progress import progress
from pretrain.cli_args import OneLineParser, device, non_negative_int, positive_float, positive_int


class UsageError(Exception):
    """Reported as one ``error:`` line (exit code 2)."""


@dataclass
class Histogram:
    """Sum of attention weights and number of (query, head) pairs by distance, growing as needed."""

    offset: int = 0                          # index = distance + offset (look-ahead distances are signed)
    sums: np.ndarray = field(default_factory=lambda: np.zeros(0))
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def add(self, distance: torch.Tensor, weight: torch.Tensor, pairs: int) -> None:
        """``distance`` (long) and ``weight`` (summed over batch and heads) of the same shape."""
        index = (distance.flatten() + self.offset).cpu().numpy()
        if index.size == 0:
            return
        if index.min() < 0:
            raise ValueError("distance below the histogram's offset")
        size = int(index.max()) + 1
        if size > self.sums.size:
            self.sums = np.pad(self.sums, (0, size - self.sums.size))
            self.counts = np.pad(self.counts, (0, size - self.counts.size))
        np.add.at(self.sums, index, weight.flatten().double().cpu().numpy())
        np.add.at(self.counts, index, pairs)

    def merged(self, other: "Histogram") -> "Histogram":
        size = max(self.sums.size, other.sums.size)
        out = Histogram(self.offset, np.zeros(size), np.zeros(size, dtype=np.int64))
        for h in (self, other):
            out.sums[:h.sums.size] += h.sums
            out.counts[:h.counts.size] += h.counts
        return out

    def rows(self):
        """(distance, mean weight, count) for every distance that has a key."""
        for i in np.nonzero(self.counts)[0]:
            yield int(i) - self.offset, float(self.sums[i] / self.counts[i]), int(self.counts[i])


@dataclass
class Utilization:
    label: str
    n_layer: int
    causal: list[Histogram]
    lookahead: list[Histogram]
    memory_mass: float = 0.0          # sum over queries of the weight on memory keys
    memory_queries: int = 0           # (query, head, layer) triples in segments with memory
    distance_mass: float = 0.0        # sum over queries of sum_j p_j * distance_j
    queries: int = 0                  # (query, head, layer) triples
    nll_sum: float = 0.0
    tokens: int = 0

    @staticmethod
    def all_layers(histograms: list[Histogram]) -> Histogram:
        out = Histogram(histograms[0].offset) if histograms else Histogram()
        for h in histograms:
            out = out.merged(h)
        return out

    def summary(self) -> dict:
        return {
            "model": self.label,
            "memory_share": self.memory_mass / self.memory_queries if self.memory_queries else None,
            "mean_distance": self.distance_mass / self.queries if self.queries else None,
            "loss": self.nll_sum / self.tokens if self.tokens else None,
            "tokens": self.tokens,
        }


# ---------------------------------------------------------------------------------------------- measuring
@torch.no_grad()
def measure(model: LaMemoModel, tokens: torch.Tensor, *, label: str, tgt_len: int, mem_len: int,
            batch_size: int, device, show_progress: bool) -> Utilization:
    model.eval()
    n_layer = model.config.n_layer
    lookahead_offset = mem_len + tgt_len            # covers variant 33's non-positive distances
    result = Utilization(label=label, n_layer=n_layer, causal=[Histogram() for _ in range(n_layer)],
                         lookahead=[Histogram(lookahead_offset) for _ in range(n_layer)])
    streams = split_streams(tokens, batch_size).to(device)
    memory = None
    for inputs, targets in progress(segments(streams, tgt_len), total=segment_count(streams, tgt_len),
                                desc=f"attention {label}", unit="segment", disable=not show_progress, file=sys.stderr):
        out = model(inputs, targets=targets, memory=memory, mem_len=mem_len, return_attention=True)
        memory = out.memory
        result.nll_sum += out.nll.double().sum().item()
        result.tokens += out.nll.numel()
        for layer, record in enumerate(out.attentions):
            _add_causal(result, layer, record["causal"])
            if "lookahead" in record:
                _add_lookahead(result, layer, record["lookahead"], record["lookahead_window"],
                               strict_future=not model.config.traits.full_look_ahead)
    return result


def _add_causal(result: Utilization, layer: int, probs: torch.Tensor) -> None:
    B, H, N, K = probs.shape
    M = K - N
    rows = torch.arange(N, device=probs.device)[:, None] + M          # absolute query positions
    keys = torch.arange(K, device=probs.device)[None, :]
    distance = rows - keys                                              # [N, K]
    valid = distance >= 0
    weight = probs.double().sum(dim=(0, 1))                             # [N, K]
    result.causal[layer].add(distance[valid], weight[valid], B * H)
    result.distance_mass += float((weight * distance.clamp(min=0)).sum())
    result.queries += B * H * N
    if M > 0:
        result.memory_mass += float(weight[:, :M].sum())
        result.memory_queries += B * H * N


def _add_lookahead(result: Utilization, layer: int, probs: torch.Tensor, window: tuple[int, int],
                   strict_future: bool) -> None:
    B, H, M, W = probs.shape
    start, end = window
    rows = torch.arange(M, device=probs.device)[:, None]
    keys = torch.arange(start, end, device=probs.device)[None, :]
    distance = keys - rows                                              # [M, W], > 0 = future
    valid = distance > 0 if strict_future else torch.ones_like(distance, dtype=torch.bool)
    weight = probs.double().sum(dim=(0, 1))
    result.lookahead[layer].add(distance[valid], weight[valid], B * H)


# ---------------------------------------------------------------------------------------------- inputs
def load_token_ids(args, model_dir: Path, vocab_size: int) -> torch.Tensor:
    if args.tokens:
        check_token_file(args.tokens, model_dir)
        has_tokenizer = args.tokenizer or (model_dir / "tokenizer").is_dir()
        ids = np.asarray(load_tokens(args.tokens, tokenizer=model_tokenizer(model_dir, args.tokenizer, vocab_size)
                                     if has_tokenizer else None))
    elif args.ids:
        try:
            ids = np.load(args.ids, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot read token ids from {args.ids}: {err}") from None
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise UsageError(f"{args.ids} must hold a 1-D integer array, got {ids.dtype} of shape {ids.shape}")
    else:
        tokenizer = model_tokenizer(model_dir, args.tokenizer, vocab_size,
                                    alternative=", or give the tokens with --tokens / --ids")
        ids = np.asarray(tokenizer.encode_document(Path(args.text).read_text(encoding="utf-8")), dtype=np.int64)
    if args.max_tokens:
        ids = ids[:args.max_tokens]
    if ids.size < 2:
        raise UsageError(f"need at least 2 tokens, got {ids.size}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise UsageError(f"token id {high if high >= vocab_size else low} is outside the vocabulary of "
                         f"{model_dir} ({vocab_size} ids)")
    return torch.from_numpy(ids.astype(np.int64))


# ---------------------------------------------------------------------------------------------- outputs
def write_csv(results: list[Utilization], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "kind", "layer", "distance", "mean_weight", "count"])
        for res in results:
            for kind, hists in (("causal", res.causal), ("lookahead", res.lookahead)):
                if not any(h.counts.size for h in hists):
                    continue
                for layer, hist in [*enumerate(hists), ("all", Utilization.all_layers(hists))]:
                    for distance, weight, count in hist.rows():
                        writer.writerow([res.label, kind, layer, distance, f"{weight:.8g}", count])


def plot(results: list[Utilization], path: Path, *, per_layer: bool, logy: bool, width: float, height: float,
         dpi: int) -> None:
    # matplotlib (about a second to import) loads only when a plot is drawn
    import matplotlib
    from matplotlib.figure import Figure
    matplotlib.use("Agg")
    has_lookahead = any(h.counts.size for res in results for h in res.lookahead)
    fig = Figure(figsize=(width, height), dpi=dpi)
    axes = fig.subplots(1, 2 if has_lookahead else 1, squeeze=False)[0]
    panels = [("causal", "distance to the key (0 = the query itself)", "current tokens")]
    if has_lookahead:
        panels.append(("lookahead", "distance to the future key", "memory look-ahead"))
    for ax, (kind, xlabel, title) in zip(axes, panels):
        for i, res in enumerate(results):
            hists = getattr(res, kind)
            if not any(h.counts.size for h in hists):
                continue
            color = f"C{i % 10}"
            rows = list(Utilization.all_layers(hists).rows())
            ax.plot([r[0] for r in rows], [r[1] for r in rows], color=color, linewidth=1.6,
                    label=f"{res.label} (all layers)" if per_layer else res.label)
            if per_layer:
                for layer, hist in enumerate(hists):
                    rows = list(hist.rows())
                    ax.plot([r[0] for r in rows], [r[1] for r in rows], color=color, linewidth=0.7,
                            alpha=0.25 + 0.5 * layer / max(res.n_layer - 1, 1))
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean attention weight")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="MODEL", help="from_pretrained directories (exports)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokens", help="prefix of a preprocessed token file (PREFIX.bin / PREFIX.idx)")
    source.add_argument("--ids", help="a .npy file holding a 1-D array of token ids")
    source.add_argument("--text", help="a UTF-8 text file, tokenised with each model's tokenizer (one document)")
    parser.add_argument("--tokenizer", help="tokenizer directory for --text (default: MODEL/tokenizer)")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--csv", help="CSV to write (default: the PNG's path with .csv)")
    parser.add_argument("--label", action="append", help="legend label of each MODEL, in order (repeatable)")
    parser.add_argument("--tgt-len", type=positive_int, default=None, help="segment length (default: the model's tgt_len)")
    parser.add_argument("--mem-len", type=non_negative_int, default=None, help="memory length (default: the model's mem_len)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="parallel token streams")
    parser.add_argument("--max-tokens", type=non_negative_int, default=0, help="use only the first N tokens (0: all)")
    parser.add_argument("--per-layer", action="store_true", help="also draw one faint curve per layer")
    parser.add_argument("--linear", action="store_true", help="linear y axis (default: log)")
    parser.add_argument("--width", type=positive_float, default=10.0, help="inches")
    parser.add_argument("--height", type=positive_float, default=4.5, help="inches")
    parser.add_argument("--dpi", type=positive_int, default=100)
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    out = Path(args.out)
    csv_path = Path(args.csv) if args.csv else out.with_suffix(".csv")
    results = []
    try:
        if args.label and len(args.label) != len(args.models):
            raise UsageError(f"{len(args.label)} --label for {len(args.models)} models")
        for name, value in (("--tgt-len", args.tgt_len), ("--batch-size", args.batch_size)):
            if value is not None and value <= 0:
                raise UsageError(f"{name} must be positive, got {value}")
        if args.mem_len is not None and args.mem_len < 0:
            raise UsageError(f"--mem-len must be >= 0, got {args.mem_len}")
        if args.width <= 0 or args.height <= 0 or args.dpi <= 0:
            raise UsageError("--width, --height and --dpi must be positive")
        for i, model_dir in enumerate(args.models):
            model_dir = Path(model_dir)
            try:
                model = load_model(model_dir, device=args.device)
                tokens = load_token_ids(args, model_dir, model.config.vocab_size)
            except (OSError, ValueError) as err:      # missing files, ConfigError, DataError, mismatches
                raise UsageError(str(err)) from None
            tgt_len = args.tgt_len or model.config.tgt_len
            mem_len = model.resolve_mem_len(args.mem_len, tgt_len)      # the model's default; 0 = no memory
            label = args.label[i] if args.label else model_dir.resolve().name
            try:
                results.append(measure(model, tokens, label=label, tgt_len=tgt_len, mem_len=mem_len,
                                       batch_size=args.batch_size, device=args.device,
                                       show_progress=not args.no_progress))
            except ValueError as err:                  # e.g. too few tokens for the streams, variant 33 limits
                raise UsageError(f"{model_dir}: {err}") from None
        write_csv(results, csv_path)
        plot(results, out, per_layer=args.per_layer, logy=not args.linear, width=args.width, height=args.height,
             dpi=args.dpi)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summaries = [res.summary() for res in results]
    if args.json:
        print(json.dumps({"png": str(out), "csv": str(csv_path), "models": summaries}, indent=2))
    else:
        for s in summaries:
            share = "n/a" if s["memory_share"] is None else f"{100 * s['memory_share']:.1f}%"
            mean = "n/a" if s["mean_distance"] is None else f"{s['mean_distance']:.1f}"
            loss = "n/a" if s["loss"] is None else f"{s['loss']:.4f} (ppl {math.exp(min(s['loss'], 700)):.2f})"
            print(f"{s['model']}: attention on memory {share}, mean distance {mean}, loss {loss}, "
                  f"{s['tokens']} tokens")
        print(f"wrote {out} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
