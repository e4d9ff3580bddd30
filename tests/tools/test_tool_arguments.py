"""Every tool answers bad arguments with one ``error: ...`` line and exit code 2 (called in-process: the tools'
``main`` functions with the argument lists a user would type), and verify_data finds a same-size corruption."""
from __future__ import annotations

import pytest
import torch
from helpers import load_tool, tiny_config

from lamemo_parallel import LaMemoModel


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from pretrain.data.tokenizer import train_tokenizer
    out = tmp_path_factory.mktemp("tool-model") / "model"
    torch.manual_seed(0)
    LaMemoModel(tiny_config(257, n_layer=1, tgt_len=8)).save_pretrained(out)
    train_tokenizer("byte", [], out / "tokenizer")
    return out


def one_error_line(capsys, call) -> str:
    """Run ``call``; it must end with exit code 2 (returned or raised by argparse) and one stderr line."""
    try:
        code = call()
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_bad_arguments_of_every_tool_give_one_line(tmp_path, model_dir, corpus, capsys):
    from pretrain.data.indexed import preprocess
    from pretrain.data.tokenizer import train_tokenizer
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    # a token file whose ids fit the model's vocabulary but were made with another tokenizer
    train_tokenizer("word", [corpus / "train.txt"], tmp_path / "word", max_size=200)
    preprocess([corpus / "train.txt"], tmp_path / "word", tmp_path / "foreign", workers=1, progress=False)
    evaluate, generate = load_tool("evaluate"), load_tool("generate")
    cases = [
        (evaluate, [str(model_dir), "--text", str(empty)], "evaluation needs at least 2"),
        (evaluate, [str(model_dir), "--text", str(empty), "--batch-size", "0"], "--batch-size: must be >= 1"),
        (evaluate, [str(model_dir), "--text", str(empty), "--tgt-len", "0"], "--tgt-len"),
        (evaluate, [str(model_dir), "--text", str(empty), "--mem-len", "-1"], "--mem-len"),
        (evaluate, [str(tmp_path / "nothing"), "--text", str(empty)], "not a LaMemo model directory"),
        (evaluate, [str(model_dir), "--tokens", str(tmp_path / "foreign")], "different tokenizer"),
        (generate, [str(model_dir), "--prompt", "hi", "--top-p", "0"], "--top-p: must be in (0, 1]"),
        (generate, [str(model_dir), "--prompt", "hi", "--top-k", "-2"], "--top-k"),
        (generate, [str(model_dir), "--prompt", "hi", "--temperature", "-1"], "--temperature"),
        (generate, [str(model_dir), "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
        (generate, [str(model_dir), "--prompt", "hi", "--segment-len", "x"], "'x' is not an integer"),
        (generate, [str(model_dir)], "--prompt"),
        (load_tool("import_official_checkpoint"), [str(tmp_path / "missing.pt"), str(tmp_path / "out")], "missing.pt"),
        (load_tool("import_official_checkpoint"), ["a.pt", "b", "--tgt-len", "0"], "--tgt-len"),
        (load_tool("plot_runs"), [str(tmp_path), "--out", "x.png", "--smooth", "0"], "--smooth"),
        (load_tool("attention_utilization"), [str(model_dir), "--tokens", "t", "--out", "a.png", "--dpi", "0"],
         "--dpi"),
        (load_tool("export_checkpoint"), [], "required"),
        (load_tool("verify_data"), [str(tmp_path / "nope")], "meta.json is missing"),
        (load_tool("prepare_mixture_example"), ["--vocab-size", "0"], "--vocab-size: must be >= 1"),
        (load_tool("prepare_mixture_example"), ["--limit-chars", "-5"], "--limit-chars: must be >= 0"),
    ]
    for module, argv, expected in cases:
        line = one_error_line(capsys, lambda: module.main(argv))
        assert expected in line, (argv, line)
    for tool, argv, expected in [
            ("preprocess_data", ["--input", str(empty), "--tokenizer", str(model_dir / "tokenizer"),
                                 "--output-prefix", str(tmp_path / "p"), "--workers", "0"], "--workers"),
            ("train_tokenizer", ["--kind", "bpe", "--input", str(empty), "--output", str(tmp_path / "t"),
                                 "--vocab-size", "0"], "--vocab-size"),
            ("download_data", ["no-such-corpus"], "invalid choice")]:
        module = load_tool(tool)
        line = one_error_line(capsys, lambda: module.main(argv))
        assert expected in line, (argv, line)


def test_verify_data_catches_a_same_size_corruption_and_a_foreign_tokenizer(tmp_path, corpus, bpe_dir, capsys):
    """Also what the trainer relies on: the fingerprint in meta.json, compared, refuses a token file made with
    another tokenizer."""
    import shutil
    verify = load_tool("verify_data")
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copy(corpus / f"train{suffix}", tmp_path / f"train{suffix}")
    assert verify.main([str(tmp_path / "train"), "--tokenizer", str(corpus / "tok")]) == 0
    assert "sha256 verified, tokenizer matches" in capsys.readouterr().out
    line = one_error_line(capsys, lambda: verify.main([str(tmp_path / "train"), "--tokenizer",
                                                                         str(bpe_dir)]))
    assert "different tokenizer" in line
    data = bytearray((tmp_path / "train.bin").read_bytes())
    data[100] ^= 1                                   # one flipped bit: same size, other content
    (tmp_path / "train.bin").write_bytes(bytes(data))
    assert verify.main([str(tmp_path / "train"), "--size-only"]) == 0   # sizes cannot see it
    capsys.readouterr()
    assert "sha256 does not match" in one_error_line(capsys, lambda: verify.run_tool(verify.main,
                                                                                      [str(tmp_path / "train")]))
    # preprocessing's "up to date" check verifies the sha256 too: the corrupted output is rebuilt, not kept
    from pretrain.data.indexed import _is_up_to_date, read_meta
    meta = read_meta(tmp_path / "train")
    job = {k: meta[k] for k in ("inputs", "tokenizer_fingerprint", "json_key")}
    assert not _is_up_to_date(tmp_path / "train", job)
    assert _is_up_to_date(corpus / "train", job)
