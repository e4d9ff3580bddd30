"""Progress displays (pretrain/progress.py): a redrawn tqdm bar on a terminal (a real pty), plain interval lines
without a carriage return when the output goes to a file, checked on the real tools over WikiText-2."""
from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import subprocess
import sys
import termios

import pytest
import torch

from lamemo_parallel import LaMemoConfig, LaMemoModel
from pretrain import progress as progress_module
from pretrain.progress import PlainLines, progress

from helpers import ROOT, WIKITEXT2, subprocess_env


def test_plain_lines_in_a_file_bar_on_a_terminal_decided_by_the_stream(monkeypatch):
    monkeypatch.setattr(progress_module, "MIN_INTERVAL_S", 0.0)
    out = io.StringIO()                                  # not a terminal
    display = progress(range(1000), desc="work", unit="item", file=out, mininterval=0)
    assert isinstance(display, PlainLines)
    assert sum(1 for _ in display) == 1000
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n")
    # one line per LINE_PERCENT (10 %) of progress, plus the final one; each a readable status line
    assert 9 <= len(lines) <= 11, lines
    assert lines[-1].startswith("work: 100%") and "1000/1000" in lines[-1]
    # without a total: the final line only (no time has passed)
    out = io.StringIO()
    list(progress(iter(range(50)), desc="count", file=out, mininterval=0))
    assert out.getvalue().splitlines() == [out.getvalue().strip()] and out.getvalue().startswith("count: 50")


def test_min_interval_bounds_the_lines(monkeypatch):
    """With the default minimum interval a quick job writes its final line when it completed its total, nothing
    otherwise (a one-line error stays one line); a job longer than the interval writes its final line."""
    out = io.StringIO()
    list(progress(range(10_000), desc="quick", file=out, mininterval=0))
    assert out.getvalue().startswith("quick: 100%") and len(out.getvalue().splitlines()) == 1
    out = io.StringIO()
    list(progress(iter(range(10)), desc="no total", file=out, mininterval=0))
    with progress(total=10, desc="failed", file=out, mininterval=0) as display:
        display.update(3)
    assert out.getvalue() == ""
    clock = [0.0]
    monkeypatch.setattr(progress_module, "_clock", lambda: clock[0])
    display = progress(total=3, desc="slow", file=out, mininterval=0)
    for _ in range(3):
        clock[0] += 2.0                                  # 2 s per item: lines at 4 s apart would be too often
        display.update(1)
    display.close()
    assert out.getvalue().splitlines() == [out.getvalue().strip()] and out.getvalue().startswith("slow: 100%")


def test_terminal_keeps_the_redrawn_bar():
    """stderr on a pseudo-terminal: tqdm's bar, redrawn with carriage returns."""
    script = ("import time\nfrom pretrain.progress import progress\n"
              "for _ in progress(range(20), desc='bar', mininterval=0):\n    time.sleep(0.01)\n")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))   # a 80x24 terminal (0x0 shows nothing)
    child = subprocess.Popen([sys.executable, "-c", script], stderr=slave, stdout=slave, env=subprocess_env(),
                             cwd=ROOT)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 30)
        if not ready:
            break
        try:
            data = os.read(master, 4096)
        except OSError:                                  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    child.wait(timeout=30)
    os.close(master)
    text = b"".join(chunks).decode()
    assert child.returncode == 0, text
    assert text.count("\r") >= 10 and "bar: 100%" in text and "|" in text


@pytest.mark.slow
def test_tools_write_plain_lines_to_a_log_file(tmp_path, byte_dir):
    """Acceptance: preprocess_data.py and evaluate.py on the shipped WikiText-2 validation split, stdout and stderr
    redirected to a file: no carriage return, at most a few dozen progress lines, the last at 100 %. Byte-level
    tokens (1.1 M) keep the model's output layer small, and evaluation scores the first 200,000 of them: the
    display, not the model, is under test."""
    log = tmp_path / "log.txt"

    def tool(*args) -> str:
        with open(log, "w") as f:
            done = subprocess.run([sys.executable, *args], stdout=f, stderr=subprocess.STDOUT, env=subprocess_env(),
                                  cwd=ROOT, timeout=600)
        text = log.read_text()
        assert done.returncode == 0, text
        assert "\r" not in text
        return text

    text = tool("tools/preprocess_data.py", "--input", str(WIKITEXT2 / "valid.txt.xz"), "--tokenizer",
                str(byte_dir), "--output-prefix", str(tmp_path / "valid"), "--workers", "1", "--chunk-mb", "0.05")
    check_lines(text, "tokenize valid.bin")

    torch.manual_seed(0)
    config = LaMemoConfig(vocab_size=257, n_layer=1, d_model=16, n_head=2, d_inner=32, tgt_len=256, mem_len=256)
    LaMemoModel(config).save_pretrained(tmp_path / "model")
    text = tool("tools/evaluate.py", str(tmp_path / "model"), "--tokens", str(tmp_path / "valid"), "--tokenizer",
                str(byte_dir), "--batch-size", "16", "--max-tokens", "200000")
    check_lines(text, "evaluate:")


def check_lines(text: str, prefix: str) -> None:
    """At least one and at most a few dozen progress lines, each a plain status line, the last at 100 %."""
    lines = [x for x in text.splitlines() if x.startswith(prefix)]
    assert 1 <= len(lines) <= 36, text
    assert all("%" in x and "[" in x for x in lines) and "100%" in lines[-1], text
