"""lm-evaluation-harness with the ``lamemo`` model type, on tasks read from local files (no hub, no network):
the word perplexity of a whole document equals lamemo-evaluate's, loglikelihood scores continuations after
their context as the transformers model does, generate_until decodes greedily until its stop string."""
from __future__ import annotations

import json
import lzma
import math
import re
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, WIKITEXT2, shakespeare_text, subprocess_env
from test_transformers_export import make_export

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}

ROLLING_TASK = """task: wt2_valid_document
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""

CHOICE_TASK = """task: local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
"""

GENERATE_TASK = """task: local_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 10
  do_sample: false
metric_list:
  - metric: exact_match
"""


def write_task(folder, template, rows, name):
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / f"{name}.yaml").write_text(template.format(data=data))


@pytest.mark.slow
def test_lamemo_lm_eval_word_perplexity_matches_lamemo_evaluate(tmp_path, bpe_dir):
    """``lamemo-lm-eval`` with a local rolling-loglikelihood task over the first 100 kB of the WikiText-2 valid
    split as ONE document (about 60k ids: over 200 segments): the memory is carried over the whole document and its
    word perplexity is lamemo-evaluate --text's (1e-4)."""
    # a 1-layer model with segments of 256: the 60k ids cost a few seconds of CPU per pass
    export = make_export(tmp_path / "export", bpe_dir, variant=3, n_layer=1, n_head=2, tgt_len=256, mem_len=256)
    split = lzma.open(WIKITEXT2 / "valid.txt.xz", "rt", encoding="utf-8").read()
    text = split[:split.index("\n = ", 100_000) + 1]          # cut before a heading line
    (tmp_path / "valid.txt").write_text(text, encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks, ROLLING_TASK, [{"text": text}], "valid")
    env = subprocess_env(HF_HOME=str(tmp_path / "hf"), **OFFLINE)
    harness = subprocess.run([sys.executable, "-m", "pretrain.cli.lm_eval_harness", "--model", "lamemo",
                              "--model_args", f"pretrained={export}", "--tasks", "wt2_valid_document",
                              "--include_path", str(tasks), "--device", "cpu", "--output_path", str(tmp_path / "out")],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert harness.returncode == 0, harness.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    theirs = results["wt2_valid_document"]["word_perplexity,none"]
    ours = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), str(export), "--text",
                           str(tmp_path / "valid.txt"), "--json"], capture_output=True, text=True, env=env, timeout=900)
    assert ours.returncode == 0, ours.stderr[-3000:]
    report = json.loads(ours.stdout.strip().splitlines()[-1])
    assert report["tgt_len"] == report["mem_len"] == 256 and report["tokens"] > 50_000     # the document, segments
    assert theirs == pytest.approx(report["word_perplexity"], rel=1e-4)
    # lm-eval's word count: its words and the empty pieces re.split makes of the leading space and the final newline
    words = len(text.split())
    assert len(re.split(r"\s+", text)) == words + 2
    assert report["word_perplexity"] == pytest.approx(math.exp(report["loss"] * report["tokens"] / (words + 2)),
                                                      rel=1e-9)


@pytest.mark.slow
def test_simple_evaluate_runs_local_tasks_with_the_lamemo_model(tmp_path, byte_dir):
    """``lm_eval.simple_evaluate`` on multiple-choice and generation tasks from local files: each choice's
    loglikelihood is the transformers model's log-probability of it after its context, and each generation is
    its greedy continuation cut at the stop string."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM

    from pretrain.lm_eval_model import LaMemoLM

    export = make_export(tmp_path / "export", byte_dir, variant=3, tgt_len=8, mem_len=8)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    lines = [line for line in shakespeare_text(3000).splitlines() if line.strip()]
    write_task(tasks, CHOICE_TASK, [{"context": lines[i] + "\n", "choices": [lines[i + 1], lines[i + 2]], "gold": 0}
                                    for i in (0, 10, 20)], "choice")
    write_task(tasks, GENERATE_TASK, [{"prompt": lines[i] + "\n" + lines[i + 1], "answer": "x"} for i in (0, 5)],
               "generate")
    lm = LaMemoLM(pretrained=str(export), device="cpu")
    for key, value in OFFLINE.items():
        import os
        os.environ.setdefault(key, value)
    out = lm_eval.simple_evaluate(model=lm, tasks=["local_choice", "local_generate"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks)))
    assert 0.0 <= out["results"]["local_choice"]["acc,none"] <= 1.0
    assert "exact_match,none" in out["results"]["local_generate"]
    hf = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    tokenizer = lm.tokenizer
    for sample in out["samples"]["local_choice"]:
        context = sample["doc"]["context"]
        for (logprob, _greedy), choice in zip((r[0] for r in sample["resps"]), sample["doc"]["choices"]):
            continuation = " " + choice                     # lm-eval's default target delimiter
            ctx, whole = tokenizer.encode(context), tokenizer.encode(context + continuation)
            assert whole[:len(ctx)] == ctx
            with torch.no_grad():
                logits = hf(torch.tensor([whole])).logits[0].double().log_softmax(-1)
            expected = sum(logits[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))
            assert float(logprob) == pytest.approx(expected, rel=1e-5)
    for sample in out["samples"]["local_generate"]:
        prompt = tokenizer.encode(sample["doc"]["prompt"])
        new = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt):].tolist()
        new = new[:new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new     # <eos> ends a generation
        assert sample["resps"][0][0] == tokenizer.decode(new).split("\n")[0]


def test_lamemo_lm_eval_refuses_a_missing_export_in_one_line(tmp_path, capsys):
    from pretrain.cli.lm_eval_harness import main
    code = main(["--model", "lamemo", "--model_args", f"pretrained={tmp_path / 'nothing'}", "--tasks", "wikitext",
                 "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "not a LaMemo model directory" in err[-1]
    assert not any("Traceback" in line for line in err)
