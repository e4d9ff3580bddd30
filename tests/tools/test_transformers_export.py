"""The export outside the project: transformers loads the model (remote code copied from lamemo_parallel, in a
process that cannot import lamemo_parallel or pretrain) and the tokenizer (stock class), with the numbers of our
own model, generator and tokenizer; the model card parses; training and export never import the extras."""
from __future__ import annotations

import json
import lzma
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lamemo_parallel import LaMemoConfig, LaMemoModel
from lamemo_parallel.generation import generate
from lamemo_parallel.model_files import code_files
from pretrain.checkpoint.model_card import model_card
from pretrain.data.hf_tokenizer import write_transformers_tokenizer
from pretrain.data.tokenizer import load_tokenizer, train_tokenizer

from helpers import ROOT, WIKITEXT2, shakespeare_text, subprocess_env, tiny_config
from test_import_graph import import_graph

#: Run first in the child: every import of lamemo_parallel or pretrain fails, as where this package is absent.
IMPORT_BLOCKER = """
import importlib.abc, sys
class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lamemo_parallel", "pretrain"):
            raise ImportError(f"{name} is not installed here")
sys.meta_path.insert(0, _Blocked())
"""

TRANSFORMERS_SIDE = IMPORT_BLOCKER + """
import json, sys, torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer
for blocked in ("lamemo_parallel", "pretrain"):
    try:
        __import__(blocked)
        raise SystemExit(f"{blocked} could be imported")
    except ImportError:
        pass
export, prompt = sys.argv[1], sys.argv[2]
ids = torch.tensor([json.loads(sys.argv[3])])
model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(export)
seg, cache, nll = model.config.tgt_len, None, []
with torch.no_grad():
    for start in range(0, 3 * seg, seg):          # 3 consecutive segments, the memory carried in the cache
        out = model(ids[:, start:start + seg], cache=cache)
        cache = out.cache
        nll += F.cross_entropy(out.logits[0], ids[0, start + 1:start + seg + 1], reduction="none").tolist()
    whole = model(ids[:, :3 * seg + 1], labels=ids[:, :3 * seg + 1])     # one call, shifted labels
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    new = model.generate(prompt_ids, max_new_tokens=12, do_sample=False)[0, prompt_ids.shape[1]:]
open(sys.argv[4], "w").write(json.dumps({"nll": nll, "loss": float(whole.loss), "prompt_ids": prompt_ids[0].tolist(),
                  "new": new.tolist(), "text": tokenizer.decode(new)}))
"""


def make_export(out: Path, tokenizer_dir: Path, **model) -> Path:
    """What ``lamemo-export`` writes, from an initialised model (the export of a trained checkpoint is
    checked in tests/checkpoint): weights, config and code, tokenizer/ and its transformers files, README.md."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer(tokenizer_dir)
    config = tiny_config(tokenizer.vocab_size, **{"n_head": 4, **model})
    LaMemoModel(config).save_pretrained(out)
    shutil.copytree(tokenizer_dir, out / "tokenizer")
    write_transformers_tokenizer(tokenizer, out)
    sources = [{"role": "train", "path": "data/wikitext-2/train", "corpus": "wikitext-2", "licence": "CC BY-SA 3.0",
                "hub": "Salesforce/wikitext"}]
    (out / "README.md").write_text(model_card(config, parameters=LaMemoModel(config).num_parameters(), step=40,
                                              tokens=40 * 4 * 8, tokenizer=tokenizer, sources=sources,
                                              evaluation={"step": 40, "eval_loss": 5.5, "eval_ppl": 244.7}))
    return out


def test_the_copied_code_is_the_model_librarys_and_nothing_else(tmp_path):
    """The directory carries the two transformers entry points and exactly the modules they import (the import
    closure of lamemo_parallel.model among them), byte for byte the library's files."""
    graph = import_graph()
    closure, todo = set(), ["lamemo_parallel.configuration_lamemo", "lamemo_parallel.modeling_lamemo"]
    while todo:
        module = todo.pop()
        if module not in closure:
            closure.add(module)
            todo.extend(graph[module])
    assert "lamemo_parallel.model" in closure and "lamemo_parallel.attention" in closure
    assert {f"lamemo_parallel.{p.stem}" for p in code_files()} == closure
    LaMemoModel(tiny_config(11, n_layer=1)).save_pretrained(tmp_path)
    for source in code_files():
        assert (tmp_path / source.name).read_bytes() == source.read_bytes(), source.name
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "lamemo" and config["architectures"] == ["LaMemoForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lamemo.LaMemoForCausalLM"
    assert LaMemoConfig.load(tmp_path / "config.json").vocab_size == 11          # one format, both loaders


@pytest.mark.slow
@pytest.mark.parametrize("variant", [3, 0], ids=["lamemo", "transformer-xl"])
def test_transformers_model_equals_lamemo_model_without_this_package(tmp_path, bpe_dir, variant):
    """``AutoModelForCausalLM`` (trust_remote_code) in a process where lamemo_parallel and pretrain cannot be
    imported: per-token NLL of 3 consecutive segments with the memory carried equals LaMemoModel's (1e-5), the
    shifted-labels loss of one long call is their mean, and greedy generate from a prompt of several segments
    gives lamemo-generate's tokens and text."""
    export = make_export(tmp_path / "export", bpe_dir, variant=variant, tgt_len=8, mem_len=12)
    text = shakespeare_text(2000)
    tokenizer, model = load_tokenizer(bpe_dir), LaMemoModel.from_pretrained(export)
    ids = torch.tensor([tokenizer.encode(text)[:3 * 8 + 1]])
    prompt = text[:120]                                       # about 40 ids: 5 prompt segments
    env = subprocess_env(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    child = subprocess.run([sys.executable, "-c", TRANSFORMERS_SIDE, str(export), prompt, json.dumps(ids[0].tolist()),
                            str(tmp_path / "theirs.json")], capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    theirs = json.loads((tmp_path / "theirs.json").read_text())
    memory, ours = None, []
    with torch.no_grad():
        for start in range(0, 24, 8):
            out = model(ids[:, start:start + 8], targets=ids[:, start + 1:start + 9], memory=memory, mem_len=12)
            memory = out.memory
            ours.append(out.nll[0])
    ours = torch.cat(ours).double()
    assert torch.allclose(torch.tensor(theirs["nll"], dtype=torch.float64), ours, rtol=1e-5, atol=0)
    assert theirs["loss"] == pytest.approx(ours.mean().item(), rel=1e-5)
    # greedy generation: the same prompt ids, the same new ids as our generator, the same text as lamemo-generate
    prompt_ids = tokenizer.encode(prompt)
    assert theirs["prompt_ids"] == prompt_ids and len(prompt_ids) > 3 * 8
    new = generate(model, torch.tensor([prompt_ids]), max_new_tokens=12, segment_len=8, mem_len=12, temperature=0)
    assert theirs["new"] == new[0].tolist()
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "generate.py"), str(export), "--prompt", prompt,
                             "--temperature", "0", "--max-new-tokens", "12"], capture_output=True, text=True,
                            env=subprocess_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout == prompt + theirs["text"] + "\n"


@pytest.mark.slow
def test_save_pretrained_round_trip_and_meta_device_positions(tmp_path, byte_dir):
    """transformers' save_pretrained writes a directory both loaders read with the same weights; the sinusoid
    frequencies (not saved, rebuilt after transformers' meta-device construction) are the right ones."""
    from transformers import AutoModelForCausalLM
    export = make_export(tmp_path / "export", byte_dir, variant=3, tgt_len=8)
    hf = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
    reference = LaMemoModel.from_pretrained(export)
    assert torch.equal(hf.model.inv_freq, reference.inv_freq)
    hf.save_pretrained(tmp_path / "again")
    again = LaMemoModel.from_pretrained(tmp_path / "again")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in reference.state_dict().items())
    ids = torch.randint(0, 257, (2, 20))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits)
        assert torch.equal(hf(ids).logits[:, :8], reference(ids[:, :8]).logits)


@pytest.mark.slow
def test_auto_tokenizer_gives_our_ids(tmp_path, bpe_dir, wt2_word_dir, byte_dir):
    """``AutoTokenizer.from_pretrained(export)`` (no remote code) encodes the WikiText-2 valid split to our ids for
    a bpe and a word export; byte and unigram agree on Shakespeare; <eos> is ours."""
    from transformers import AutoTokenizer
    valid = lzma.open(WIKITEXT2 / "valid.txt.xz", "rt", encoding="utf-8").read()
    sample = shakespeare_text(100_000) + "héllo wörld 😀 <eos>\n\nlast line, no newline"
    (tmp_path / "s.txt").write_text(shakespeare_text(200_000))
    unigram_dir = tmp_path / "unigram"
    train_tokenizer("unigram", [tmp_path / "s.txt"], unigram_dir, vocab_size=500, character_coverage=1.0)
    for name, tokenizer_dir, texts in (("bpe", bpe_dir, [valid, sample]), ("word", wt2_word_dir, [valid]),
                                       ("byte", byte_dir, [sample]), ("unigram", unigram_dir, [sample[:100_000]])):
        ours = load_tokenizer(tokenizer_dir)
        write_transformers_tokenizer(ours, tmp_path / name)
        config = json.loads((tmp_path / name / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] == "PreTrainedTokenizerFast"           # stock: no trust_remote_code
        theirs = AutoTokenizer.from_pretrained(tmp_path / name)
        assert theirs.eos_token == "<eos>" and theirs.eos_token_id == ours.eos_id, name
        for text in texts:
            assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text), name
    assert len(load_tokenizer(wt2_word_dir).encode(valid)) == 217_646


def test_model_card_parses_and_states_the_facts(tmp_path, byte_dir):
    from huggingface_hub import ModelCard
    export = make_export(tmp_path / "export", byte_dir, variant=0, tgt_len=8, mem_len=16)
    card = ModelCard.load(export / "README.md")
    assert card.data.library_name == "transformers" and card.data.datasets == ["Salesforce/wikitext"]
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}      # the YAML model-index
    assert results == {"eval_loss": 5.5, "eval_ppl": 244.7}
    for fact in ("Transformer-XL", "| Memory length | 16 |", "| Segment (context) length | 8 |", "byte, 257 ids",
                 "| Training steps | 40 |", "| Training tokens | 1,280 |", "CC BY-SA 3.0", "trust_remote_code=True",
                 "LaMemoModel.from_pretrained(path)"):
        assert fact in card.text or fact in card.content, fact


def test_training_and_export_never_import_transformers_or_lm_eval():
    """The extras stay optional: nothing the trainer or the export imports (transitively, lazy imports
    included) reaches transformers, lm-eval or the modules that need them."""
    graph = import_graph()
    needs_extras = {"lamemo_parallel.configuration_lamemo", "lamemo_parallel.modeling_lamemo", "pretrain.lm_eval_model"}
    for start in ("pretrain.train", "pretrain.trainer", "pretrain.checkpoint.export", "pretrain.cli.export_checkpoint",
                  "pretrain.cli.evaluate", "pretrain.cli.generate", "pretrain.cli.preprocess_data"):
        seen, todo = set(), [start]
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
        assert not seen & needs_extras, (start, seen & needs_extras)
    probe = ("import sys, pretrain.train, pretrain.checkpoint.export, pretrain.cli.export_checkpoint; "
             "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'lm_eval', 'tokenizers')]; "
             "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-2000:]
