"""What an export carries for people outside the project: the tokenizer files transformers reads and a model
card (``README.md`` with YAML metadata, which ``huggingface_hub.ModelCard.load`` parses).

The card states what a reader needs to use or cite the model: its size, variant, context and memory lengths,
tokenizer, training steps and tokens, data sources and their licences where the corpus is a known one, the last
evaluation the training run recorded, and how to load it with transformers and with this package. Everything is
read from the checkpoint (``trainer.json``, ``config.yaml``, ``COMPLETE.json``) and the run's ``metrics.jsonl``;
nothing here imports transformers.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from lamemo_parallel import LaMemoConfig
from lamemo_parallel.config import BASELINE_VARIANT

from ..data.hf_tokenizer import write_transformers_tokenizer
from ..data.tokenizer import Tokenizer, load_tokenizer, tokenizer_description

CARD_NAME = "README.md"
#: Known corpora, found by name in the data paths: (name, licence, hub id of the data set or None).
KNOWN_DATA = (("wikitext-103", "CC BY-SA 3.0", "Salesforce/wikitext"),
              ("wikitext-2", "CC BY-SA 3.0", "Salesforce/wikitext"),
              ("wt103", "CC BY-SA 3.0", "Salesforce/wikitext"),
              ("wt2", "CC BY-SA 3.0", "Salesforce/wikitext"),
              ("enwik8", "CC BY-SA (Wikipedia text, Hutter Prize)", None),
              ("text8", "CC BY-SA (Wikipedia text)", None),
              ("shakespeare", "public domain text", None))


def data_sources(run_config: dict) -> list[dict]:
    """The training / validation data paths of the run with the licence of the known corpora."""
    data = run_config.get("data", {}) or {}
    out = []
    for role in ("train", "valid"):
        paths = data.get(role) or []
        for path in ([paths] if isinstance(paths, str) else paths):
            if not path:
                continue
            known = next((k for k in KNOWN_DATA if k[0] in str(path).lower()), None)
            out.append({"role": role, "path": str(path), "corpus": known[0] if known else None,
                        "licence": known[1] if known else "unknown", "hub": known[2] if known else None})
    return out


def last_evaluation(run_dir: Path, step: int) -> dict:
    """The last record with evaluation metrics at or before ``step`` in the run's ``metrics.jsonl``."""
    found: dict = {}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step and any(k.startswith("eval_") for k in record):
                found = {k: v for k, v in record.items() if k.startswith("eval_") or k == "step"}
    return found


def training_tokens(run_config: dict, layout: dict, step: int) -> int | None:
    """Tokens consumed by ``step`` optimizer steps: streams per step x segment length."""
    data = run_config.get("data", {}) or {}
    try:
        per_step = int(data["micro_batch_size"]) * int(data["micro_batches"]) * int(layout.get("data", 1))
        return step * per_step * int(data["tgt_len"])
    except (KeyError, TypeError, ValueError):
        return None


def model_card(config: LaMemoConfig, *, parameters: int, step: int, tokens: int | None, tokenizer: Tokenizer | None,
               sources: list[dict], evaluation: dict) -> str:
    """The text of ``README.md``."""
    variant = "Transformer-XL" if config.variant == BASELINE_VARIANT else f"LaMemo (variant {config.variant})"
    mem_len = config.mem_len if config.mem_len is not None else config.tgt_len
    licences = sorted({s["licence"] for s in sources})
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["lamemo", "transformer-xl", "segment-recurrence", "custom_code"]}
    hubs = sorted({s["hub"] for s in sources if s["hub"]})
    if hubs:
        meta["datasets"] = hubs
    if evaluation:
        meta["model-index"] = [{"name": "lamemo", "results": [{
            "task": {"type": "text-generation", "name": "Language modelling"},
            "dataset": {"type": sources[0]["corpus"] or "custom", "name": "validation data of the run"},
            "metrics": [{"type": k, "value": float(v)} for k, v in evaluation.items() if k != "step"]}]}]
    facts = [("Model", variant), ("Parameters", f"{parameters:,}"),
             ("Layers / width / heads", f"{config.n_layer} / {config.d_model} / {config.n_head} x {config.d_head}"),
             ("Segment (context) length", str(config.tgt_len)), ("Memory length", str(mem_len)),
             ("Tokenizer", f"{tokenizer.kind}, {tokenizer.vocab_size} ids, <eos> = {tokenizer.eos_id}"
              if tokenizer else "none shipped"),
             ("Training steps", f"{step:,}"), ("Training tokens", f"{tokens:,}" if tokens is not None else "unknown"),
             ("Data licences", ", ".join(licences) if licences else "unknown")]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {variant} language model", "",
             "A segment-recurrent language model trained with lamemo-pretrain (LaMemo: Ji et al., NAACL 2022, "
             "look-ahead memory; Transformer-XL: Dai et al., ACL 2019). Each segment attends to a memory of the "
             "segments before it, so the model reads documents longer than its segment, carried segment by segment.",
             "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in facts], "", "## Training data", ""]
    lines += [f"- {s['role']}: `{s['path']}` ({s['corpus'] or 'corpus not recognised'}; licence: {s['licence']})"
              for s in sources] or ["- not recorded in the checkpoint"]
    lines += ["", "## Evaluation", ""]
    if evaluation:
        lines += [f"Last evaluation of the training run (step {evaluation.get('step', step)}):", ""]
        lines += [f"- {k}: {v:.6g}" for k, v in evaluation.items() if k != "step" and isinstance(v, (int, float))]
    else:
        lines += ["The training run recorded no evaluation."]
    lines += ["", "## Use", "", "With transformers (the modelling code ships in this directory):", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "tokenizer = AutoTokenizer.from_pretrained(path)",
              "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)",
              "ids = tokenizer(\"The meaning of\", return_tensors=\"pt\").input_ids",
              "out = model(ids)                                   # out.cache carries the memory to the next call",
              "print(tokenizer.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0]))", "```", "",
              "With lamemo-pretrain:", "", "```python", "from lamemo_parallel import LaMemoModel",
              "model = LaMemoModel.from_pretrained(path)", "```", "",
              "`lamemo-evaluate PATH --text FILE`, `lamemo-generate PATH --prompt TEXT` and `lamemo-lm-eval --model "
              "lamemo --model_args pretrained=PATH --tasks ...` (lm-evaluation-harness with the memory carried over "
              "whole documents) work on this directory.", ""]
    return "\n".join(lines)


def write_transformers_files(out: Path, ckpt: Path, meta: dict, config: LaMemoConfig, parameters: int) -> None:
    """Next to an export's weights: the tokenizer files transformers reads (from ``out/tokenizer``) and
    ``README.md``. ``ckpt`` is the exported checkpoint, ``meta`` its ``COMPLETE.json``."""
    tokenizer_dir = out / "tokenizer"
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_description(tokenizer_dir) else None
    if tokenizer is not None:
        write_transformers_tokenizer(tokenizer, out)
    run_config = (yaml.safe_load((ckpt / "config.yaml").read_text()) if (ckpt / "config.yaml").is_file() else None) or {}
    step = int(meta["step"])
    card = model_card(config, parameters=parameters, step=step,
                      tokens=training_tokens(run_config, meta.get("layout", {}), step), tokenizer=tokenizer,
                      sources=data_sources(run_config), evaluation=last_evaluation(ckpt.parent.parent, step))
    (out / CARD_NAME).write_text(card)
