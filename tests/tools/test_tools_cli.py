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
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "Café au lait — naïve façade.\nYou are all resolved rather to die than to famish?\nResolved.")


def _evaluate(capsys, *args) -> dict:
    from pretrain.cli import evaluate
    assert evaluate.main([*map(str, args), "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("batch_size", [1, 3])
def test_text_metrics_divide_by_exactly_the_text_that_was_scored(tmp_path, capsys, batch_size):
    """evaluate --text F --max-tokens N reports exactly the figures of scoring the text of the first N ids as a
    file of its own: cut at a line end and inside a line, with the streams' uneven tail left out (batch size 3),
    and the whole document. The byte tokenizer makes the reference independent of the tool: each byte is one
    id, so the first N ids encode the first N bytes, and the document's final <eos> encodes no text."""
    model_dir = make_model_dir(tmp_path, 257)
    full = tmp_path / "full.txt"
    full.write_text(TEXT, encoding="utf-8")
    data = TEXT.encode()
    at_line_end = data.index(b"\n", 40) + 1
    for n in (at_line_end, 101, len(data)):
        report = _evaluate(capsys, model_dir, "--text", full, "--max-tokens", n, "--batch-size", batch_size)
        (tmp_path / "cut.txt").write_bytes(data[:n])
        alone = _evaluate(capsys, model_dir, "--text", tmp_path / "cut.txt", "--batch-size", batch_size)
        assert alone["tokens"] == report["tokens"] and alone["characters"] == report["characters"]
        for key in ("loss", "bits_per_character", "bits_per_byte", "bits_per_word", "word_perplexity"):
            assert report[key] == pytest.approx(alone[key], rel=1e-6), key
        scored = report["tokens"]             # the ids after the leading <eos>: n bytes and the final <eos>
        assert n + 1 - batch_size < scored <= n + 1
        cut = data[:min(scored, n)].decode("utf-8")
        assert report["characters"] == len(cut)
        bits = report["loss"] * report["tokens"] / math.log(2)
        assert report["bits_per_character"] == pytest.approx(bits / len(cut), rel=1e-9)
        assert report["bits_per_byte"] == pytest.approx(bits / len(cut.encode()), rel=1e-9)
        assert report["bits_per_word"] == pytest.approx(bits / len(cut.split()), rel=1e-9)
    # a token file has no text to divide by: no per-character figure rather than a wrong one
    from pretrain.data.indexed import preprocess
    preprocess([full], model_dir / "tokenizer", tmp_path / "tok", workers=1)
    report = _evaluate(capsys, model_dir, "--tokens", tmp_path / "tok", "--max-tokens", 50)
    assert report["tokens"] == 49 and "bits_per_character" not in report


def _damage(model_dir, how):
    from safetensors.torch import load_file, save_file
    weights = model_dir / "model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    elif how == "corrupted header":
        raw = bytearray(weights.read_bytes())
        raw[12:24] = b"#" * 12
        weights.write_bytes(bytes(raw))
    elif how == "integer dtype":
        tensors = load_file(str(weights))
        name = sorted(tensors)[0]
        tensors[name] = tensors[name].to(torch.int32)
        save_file(tensors, str(weights))
    elif how == "no tokenizer":
        import shutil
        shutil.rmtree(model_dir / "tokenizer")
    elif how == "mixed export":
        # weights of one export, export.json of another (what a non-atomic --force could leave)
        (model_dir / "export.json").write_text(json.dumps({"checkpoint_manifest_sha256": "1" * 64}))
    elif how == "foreign tokenizer":
        # the export recorded another tokenizer than the one now in tokenizer/ (same vocabulary size)
        (model_dir / "export.json").write_text(json.dumps({"tokenizer_fingerprint": "0" * 64}))


@pytest.mark.parametrize("how,named", [("truncated", "truncated or damaged"),
                                       ("corrupted header", "truncated or damaged"),
                                       ("integer dtype", "not floating point"),
                                       ("no tokenizer", "has no tokenizer/"),
                                       ("mixed export", "come from different checkpoints"),
                                       ("foreign tokenizer", "is not the one")])
def test_every_tool_that_loads_a_model_refuses_damage_in_one_line(tmp_path, capsys, how, named):
    """evaluate, generate and the attention tool given a damaged model file or a tokenizer that does not belong
    to the model: one ``error:`` line, exit 2, no traceback (a token file needs no tokenizer)."""
    from pretrain.cli import attention_utilization, evaluate, generate
    model_dir = make_model_dir(tmp_path, 257)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    if how == "no tokenizer":
        from pretrain.data.indexed import preprocess
        preprocess([text], model_dir / "tokenizer", tmp_path / "tok", workers=1)
        capsys.readouterr()                               # its progress bar
    _damage(model_dir, how)
    calls = [(evaluate.main, [model_dir, "--text", text]), (generate.main, [model_dir, "--prompt", "To be"]),
             (attention_utilization.main, [model_dir, "--text", text, "--out", tmp_path / "a.png",
                                           "--no-progress"])]
    for main, args in calls:
        assert main(list(map(str, args))) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and named in err, err
    if how == "no tokenizer":
        _evaluate(capsys, model_dir, "--tokens", tmp_path / "tok", "--max-tokens", 20)
        # a token file of another tokenizer than the one the export recorded: refused without a tokenizer too
        (model_dir / "export.json").write_text(json.dumps({"tokenizer_fingerprint": "0" * 64}))
        assert evaluate.main([str(model_dir), "--tokens", str(tmp_path / "tok")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "tokenized with a different tokenizer" in err
