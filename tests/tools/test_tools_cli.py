"""The tools as commands: evaluate / generate on an exported directory and their clear errors (a real tiny model,
real tokenizer); every tool is an installed console command and a script."""
import importlib
import json
import math
import subprocess
import sys

import pytest
import torch

from lamemo_parallel import LaMemoModel

from helpers import ROOT, load_tool, tiny_config



def make_model_dir(tmp_path, vocab_size):
    from pretrain.data.tokenizer import train_tokenizer
    torch.manual_seed(0)
    out = tmp_path / "model"
    LaMemoModel(tiny_config(vocab_size, tgt_len=8)).save_pretrained(out)
    train_tokenizer("byte", [], out / "tokenizer")
    return out


def run(tool, *args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / tool), *map(str, args)], capture_output=True,
                          text=True)


@pytest.mark.slow
def test_evaluate_and_generate_on_an_export(tmp_path):
    model_dir = make_model_dir(tmp_path, 257)
    text = tmp_path / "valid.txt"
    text.write_text("To be, or not to be, that is the question.\nWhether 'tis nobler in the mind to suffer\n")
    result = run("evaluate.py", model_dir, "--text", text, "--mem-len", "16", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # one document as preprocessing tokenises it (its bytes and a final <eos>), each id predicted after the <eos>
    # that ends the document before it
    assert report["tokens"] == len(text.read_bytes()) + 1 and report["mem_len"] == 16 and report["tgt_len"] == 8
    # the same numbers from the model directly: segments of 8 with a memory of 16, every id but the first scored
    from pretrain.data.tokenizer import load_tokenizer
    tokenizer, model = load_tokenizer(model_dir / "tokenizer"), LaMemoModel.from_pretrained(model_dir)
    ids = torch.tensor([tokenizer.eos_id, *tokenizer.encode_document(text.read_text())])
    inputs, targets, memory, nll_sum = ids[None, :-1], ids[None, 1:], None, 0.0
    with torch.no_grad():
        for s in range(0, inputs.shape[1], 8):
            out = model(inputs[:, s:s + 8], targets=targets[:, s:s + 8], memory=memory, mem_len=16)
            nll_sum, memory = nll_sum + out.nll.sum().item(), out.memory
    assert report["loss"] == pytest.approx(nll_sum / (len(ids) - 1), rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(nll_sum / (len(ids) - 1)), rel=1e-5)
    assert report["bits_per_character"] == pytest.approx(nll_sum / math.log(2) / len(text.read_text()), rel=1e-5)
    # lm-evaluation-harness's word perplexity: whitespace-separated pieces as re.split counts them (18 words and
    # the empty piece after the final newline)
    assert report["word_perplexity"] == pytest.approx(math.exp(nll_sum / 19), rel=1e-5)
    gen = run("generate.py", model_dir, "--prompt", "To be", "--max-new-tokens", "12", "--seed", "3", "--top-k", "20")
    assert gen.returncode == 0, gen.stderr
    again = run("generate.py", model_dir, "--prompt", "To be", "--max-new-tokens", "12", "--seed", "3", "--top-k", "20")
    assert gen.stdout == again.stdout and gen.stdout.startswith("To be")


@pytest.mark.slow
def test_tokenizer_that_does_not_match_the_model_is_refused(tmp_path):
    model_dir = make_model_dir(tmp_path, 300)          # the byte tokenizer has 257 ids
    text = tmp_path / "t.txt"
    text.write_text("hello\n")
    for result in (run("evaluate.py", model_dir, "--text", text),
                   run("generate.py", model_dir, "--prompt", "hi")):
        assert result.returncode == 2 and "vocabulary mismatch" in result.stderr and "Traceback" not in result.stderr


def test_every_tool_is_an_installed_command_and_a_script(monkeypatch, capsys):
    """Each ``[project.scripts]`` entry names a ``main`` that exists, every ``tools/X.py`` (bar the shell scripts)
    is the script form of one of them (no sys.path set-up of its own) and answers ``--help``."""
    import runpy
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    targets = {}
    for command, target in scripts.items():
        module, function = target.split(":")
        assert command.startswith("lamemo-") and callable(getattr(importlib.import_module(module), function)), command
        targets[module] = command
    tools = sorted(p for p in (ROOT / "tools").glob("*.py"))
    assert tools and not (ROOT / "tools" / "_bootstrap.py").exists()
    for tool in tools:
        assert f"pretrain.cli.{tool.stem}" in targets, f"{tool.name} has no console command"
        assert load_tool(tool.stem).main is importlib.import_module(f"pretrain.cli.{tool.stem}").main
        assert "sys.path" not in tool.read_text() and "_bootstrap" not in tool.read_text(), tool.name
        monkeypatch.setattr(sys, "argv", [str(tool), "--help"])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(tool), run_name="__main__")
        assert exit_.value.code == 0, tool.name
        assert capsys.readouterr().out.startswith("usage: "), tool.name


def test_a_model_saved_without_memory_evaluates_and_generates_without_memory(tmp_path, monkeypatch, capsys):
    """``mem_len: 0`` in a saved model means no memory for every tool (``config.resolve_mem_len``): evaluate and
    generate run every forward with mem_len 0, and evaluate's loss is the memoryless one."""
    from pretrain.cli import evaluate as evaluate_cli
    from pretrain.cli import generate as generate_cli
    model_dir = make_model_dir(tmp_path, 257)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "mem_len": 0}))
    text = tmp_path / "valid.txt"
    text.write_text("To be, or not to be, that is the question.\n")
    seen = []
    forward = LaMemoModel.forward

    def spy(self, *args, mem_len=None, **kwargs):
        out = forward(self, *args, mem_len=mem_len, **kwargs)
        seen.append((mem_len, out.memory.length))
        return out

    monkeypatch.setattr(LaMemoModel, "forward", spy)
    assert evaluate_cli.main([str(model_dir), "--text", str(text), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["mem_len"] == 0 and seen and all(s == (0, 0) for s in seen), seen
    seen.clear()
    assert generate_cli.main([str(model_dir), "--prompt", "To be, or not", "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert len(seen) == 2 + 5 and all(s == (0, 0) for s in seen), seen     # 13 prompt bytes in segments of 8
