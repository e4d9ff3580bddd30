"""Sharded checkpoints: exact resume, kill -9 during a save, broken checkpoints, export (real DeepSpeed runs)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lamemo_parallel import LaMemoModel
from pretrain.cli.checkpoint import main as checkpoint_command
from pretrain.cli.export_checkpoint import main as export_command

from helpers import ROOT, PicklePayload, check_full_disk_stop, launch, losses, mount_tmpfs, run_main, subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 6


def overrides(corpus, run_dir, *extra):
    return [f"data.train={corpus / 'train'}", f"data.valid={corpus / 'train'}", "run.eval_tokens=300",
            f"data.tokenizer={corpus / 'tok'}", f"run.dir={run_dir}", f"run.steps={STEPS}", "data.tgt_len=8",
            "data.mem_len=8", "data.micro_batch_size=2", "data.micro_batches=2", "model.n_layer=2",
            "model.d_model=16", "model.n_head=4", "model.d_inner=32", "model.dropout=0.1", "model.dropatt=0.1",
            "optim.lr=0.003", "run.mlflow=false", "run.log_interval=1", "run.keep_checkpoints=2", *extra]


#: Layouts whose straight run's shards also go through the offline export (one launch serves both tests).
EXPORT_LAYOUTS = {(2, 2, 1, 0), (1, 2, 2, 1)}
#: Layouts that train on a mixture (pretrain/data/mixture.py): the same file as two sources, weights 1 : 3, spans
#: of 2 segments, so streams switch source at steps 3 and 5, across the resume at step 3; with
#: data.span_memory=reset every stage of every data-parallel rank empties its memory there (step 5: in the resumed
#: process), deciding alone from the loader state.
MIXTURE_LAYOUTS = {(1, 2, 2, 1)}


def mixture(corpus):
    return [f"data.train=[{{name: a, path: {corpus / 'train'}, weight: 1}}, {{name: b, path: {corpus / 'train'}, "
            f"weight: 3}}]", "data.span_len=16", "data.span_memory=reset"]


def token_counts(run_dir):
    """step -> {data/tokens/<name>: count}; a resumed run's later line for a step wins."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = {k: v for k, v in record.items() if k.startswith("data/tokens/")}
    return out


@pytest.mark.parametrize("tp,pp,dp,zero", [(1, 1, 1, 0), (2, 2, 1, 0), (1, 2, 2, 1), (2, 1, 2, 1)])
def test_resumed_run_equals_straight_run_bitwise(corpus, tmp_path, tp, pp, dp, zero):
    """Dropout on, 2 micro-batches: exact resume needs the RNG states, the data offset and the memory of every
    micro-batch slot on every stage; per-source token counts resume too (a mixture on ``MIXTURE_LAYOUTS``). The
    straight run saves at step 3 and trains on (so the save must be a snapshot, not the live tensors); a second
    run resumes from that checkpoint. For the layouts in ``EXPORT_LAYOUTS`` the straight run's newest checkpoint
    is also exported offline (:func:`check_export_reproduces_eval_loss`)."""
    layout = [f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"parallel.zero_stage={zero}"]
    if (tp, pp, dp, zero) in MIXTURE_LAYOUTS:
        layout += mixture(corpus)
    n = tp * pp * dp
    straight = launch(n, overrides(corpus, tmp_path / "straight", *layout, "run.save_interval=3"))
    assert straight.returncode == 0, straight.stderr[-4000:]
    saved = tmp_path / "straight" / "checkpoints" / "step_00000003"
    second = launch(n, overrides(corpus, tmp_path / "resumed", *layout, f"run.resume={saved}"))
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resumed from" in second.stdout and "step_00000003" in second.stdout
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(a) == list(range(1, STEPS + 1)) and sorted(b) == list(range(4, STEPS + 1))
    assert [a[s] for s in range(4, STEPS + 1)] == [b[s] for s in range(4, STEPS + 1)]    # bitwise
    counts, resumed_counts = token_counts(tmp_path / "straight"), token_counts(tmp_path / "resumed")
    assert resumed_counts == {s: counts[s] for s in range(4, STEPS + 1)}
    final = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["valid/loss"] == final["eval_loss"] and final["valid/train/loss"] == final["eval_loss"]
    assert final["valid/train/bpc"] == final["eval_bits_per_token"]       # byte tokenizer: bits per character
    if (tp, pp, dp, zero) in MIXTURE_LAYOUTS:       # 8 streams x 8 tokens a step; both sources read by step 3
        assert sum(counts[STEPS].values()) == STEPS * 64 and min(counts[3].values()) > 0
    wa = LaMemoModel.from_pretrained(tmp_path / "straight" / "final").state_dict()
    wb = LaMemoModel.from_pretrained(tmp_path / "resumed" / "final").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    check_info(tmp_path / "straight" / "checkpoints" / f"step_{STEPS:08d}", STEPS, n, layout)
    if (tp, pp, dp, zero) in EXPORT_LAYOUTS:
        check_export_reproduces_eval_loss(corpus, tmp_path / "straight", tmp_path, dp, zero)


def _resign(ckpt, *names):
    """Rewrite the manifest entries of ``names`` as an attacker with write access would (sizes and sha256 of
    the files as they are now), so only the pickle safety check stands between the file and a load."""
    from pretrain.checkpoint.format import sealed, sha256_file
    marker = json.loads((ckpt / "COMPLETE.json").read_text())
    for name in names:
        marker["files"][name] = {"size": (ckpt / name).stat().st_size, "sha256": sha256_file(ckpt / name)}
    (ckpt / "COMPLETE.json").write_text(json.dumps(sealed(marker)))


def test_broken_checkpoints_fall_back_or_fail_clearly(corpus, tmp_path):
    """One run saves 8 checkpoints (first used, intact, for the atomic-export checks); seven are damaged in seven
    ways (truncated shard, missing file, size-preserving corruption, a manifest of {}, a garbage trainer.json of
    the same size, a planted pickle payload with a re-signed manifest, a manifest whose model entry was edited).
    Auto-resume skips each with a warning and lands on step 1; nothing runs."""
    run = tmp_path / "run"
    result = launch(1, overrides(corpus, run, "run.save_interval=1", "run.keep_checkpoints=8", "run.steps=8"))
    assert result.returncode == 0, result.stderr[-4000:]
    ckpts = run / "checkpoints"
    step = {s: ckpts / f"step_{s:08d}" for s in range(1, 9)}
    check_export_is_atomic(step[6], step[7], tmp_path / "atomic")
    edited = json.loads((step[8] / "COMPLETE.json").read_text())                  # an edited manifest: another
    edited["model"]["d_inner"] = 64                                               # architecture, same weights
    (step[8] / "COMPLETE.json").write_text(json.dumps(edited))
    shard = step[7] / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])                                  # truncated shard
    (step[6] / "trainer_state_rank_00000.pt").unlink()                           # missing file
    flipped = bytearray((step[5] / "mp_rank_00_model_states.pt").read_bytes())   # size-preserving corruption
    flipped[len(flipped) // 2] ^= 0xFF
    (step[5] / "mp_rank_00_model_states.pt").write_bytes(bytes(flipped))
    (step[4] / "COMPLETE.json").write_text("{}")                                  # damaged manifest
    size = (step[3] / "trainer.json").stat().st_size                              # garbage trainer.json
    (step[3] / "trainer.json").write_bytes(b"\x00garbage" * (size // 8) + b"#" * (size % 8))
    marker = tmp_path / "payload-ran"                                             # planted pickle payload
    torch.save({"module": PicklePayload(marker)}, step[2] / "mp_rank_00_model_states.pt")
    _resign(step[2], "mp_rank_00_model_states.pt")

    from pretrain.checkpoint import CheckpointError, find_resume_checkpoint, validate
    messages = []
    assert find_resume_checkpoint(run, "auto", log=messages.append) == step[1]
    text = "\n".join(messages)
    for expected in ("truncated", "missing trainer_state_rank_00000.pt", "mp_rank_00_model_states.pt is corrupted",
                     "COMPLETE.json is damaged", "trainer.json is corrupted", "could run code",
                     "COMPLETE.json was edited or damaged"):
        assert expected in text, (expected, text)
    assert len(messages) == 7 and all(m.startswith("warning: skipping checkpoint") for m in messages)
    with pytest.raises(CheckpointError, match="truncated"):
        validate(step[7])
    with pytest.raises(CheckpointError, match="was edited"):                      # run.resume=PATH refuses it
        find_resume_checkpoint(run, str(step[8]))
    # lamemo-checkpoint info names the failing file and exits 2 (no process group, nothing unpickled)
    probe = ("import sys; from pretrain.cli.checkpoint import main; status = main(sys.argv[1:]); "
             "assert 'deepspeed' not in sys.modules and 'megatron' not in sys.modules; sys.exit(status)")
    info = subprocess.run([sys.executable, "-c", probe, "info", str(step[7])], capture_output=True, text=True,
                          cwd=ROOT, env=subprocess_env())                # the command alone in a process, once
    assert info.returncode == 2 and info.stderr.startswith("error: ") and info.stderr.count("\n") == 1
    assert "mp_rank_00_model_states.pt is truncated" in info.stderr and "valid: NO" in info.stdout
    for broken, expected in ((step[5], "mp_rank_00_model_states.pt is corrupted"),
                             (step[6], "missing trainer_state_rank_00000.pt"), (step[4], "COMPLETE.json is damaged"),
                             (step[2], "could run code")):
        status, _, err = info_command(broken)
        assert status == 2 and expected in err and err.startswith("error: ") and err.count("\n") == 1, err
    # the loaders themselves refuse the payload too (weights_only + allow-list), in our code and DeepSpeed's
    from pretrain.checkpoint.safe_load import _safe_engine_class, safe_load
    with pytest.raises(CheckpointError, match="could run code"):
        safe_load(step[2] / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="could run code"):
        _safe_engine_class()(None).load(str(step[2] / "mp_rank_00_model_states.pt"))
    # an explicit broken checkpoint stops the trainer with one message; the payload never runs
    for broken, expected in ((step[7], "is truncated or altered"), (step[2], "could run code")):
        bad = launch(1, overrides(corpus, run, f"run.resume={broken}", "run.steps=8"))
        # no frame of our code may appear (a clean exit 2)
        assert bad.returncode == 2 and expected in bad.stderr, bad.stderr[-3000:]
        assert str(ROOT / "pretrain") not in bad.stderr and "site-packages/deepspeed" not in bad.stderr
    assert not marker.exists()
    # a checkpoint of another model is refused by name
    other = launch(1, overrides(corpus, run, "model.d_inner=48", "run.steps=8"))
    assert other.returncode != 0 and "another model" in other.stderr and "d_inner" in other.stderr
    # the export command (lamemo-export, its main in this process) refuses the damaged checkpoints with one line
    # each and exports the good one
    for broken, expected in ((step[7], "truncated"), (step[5], "corrupted"), (step[4], "damaged"),
                             (step[2], "could run code"), (step[8], "was edited")):
        status, _, err = run_main(export_command, [broken, tmp_path / "x"])
        assert status == 2 and expected in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not marker.exists()
    status, _, err = run_main(export_command, [step[1], tmp_path / "x"])
    assert status == 0, err
    # exporting onto an existing file, or over an exported model, is one line (--force replaces the model)
    (tmp_path / "file").write_text("keep me")
    for target in (tmp_path / "file", tmp_path / "x"):
        status, _, err = run_main(export_command, [step[1], target])
        assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert (tmp_path / "file").read_text() == "keep me"
    assert run_main(export_command, [step[1], tmp_path / "x", "--force"])[0] == 0


def check_export_is_atomic(old_ckpt, new_ckpt, work):
    """kill -9 at every moment of a plain export and of ``--force`` over an older export, a full disk, a file
    size limit and a read-only directory: every directory left behind (OUT, and any hidden staging directory
    beside it) either fails to load with one line or holds exactly one checkpoint's weights and its record
    (export.json names that checkpoint and its manifest hash); a failure says one line and leaves OUT as it
    was."""
    import os
    import signal

    from pretrain import faults
    from pretrain.checkpoint.export import export_checkpoint
    from pretrain.checkpoint.format import SELF_HASH, read_marker
    clean = {}
    for ckpt in (old_ckpt, new_ckpt):
        export_checkpoint(ckpt, work / f"clean-{ckpt.name}")
        clean[ckpt.name] = LaMemoModel.from_pretrained(work / f"clean-{ckpt.name}").state_dict()

    def consistent(directory):
        """None: does not load (one line); else the checkpoint it holds, after checking weights and record."""
        try:
            weights = LaMemoModel.from_pretrained(directory).state_dict()
        except (OSError, ValueError) as err:
            assert "\n" not in str(err)
            return None
        info = json.loads((directory / "export.json").read_text())
        source = next(c for c in (old_ckpt, new_ckpt) if c.name == os.path.basename(info["checkpoint"]))
        assert info["checkpoint_manifest_sha256"] == read_marker(source)[SELF_HASH]
        assert all(torch.equal(weights[k], clean[source.name][k]) for k in weights)
        return source.name

    def killed(moment, out, force):
        pid = os.fork()
        if pid == 0:                                      # the child dies by SIGKILL at ``moment``
            os.environ[faults.KILL_DURING_EXPORT_ENV] = moment
            try:
                export_checkpoint(new_ckpt, out, overwrite=force)
            finally:
                os._exit(0)
        assert os.waitpid(pid, 0)[1] & 0x7F == signal.SIGKILL

    for moment in faults.EXPORT_MOMENTS:
        for force in (False, True):
            out = work / moment / ("forced" if force else "plain") / "model"
            if force:
                export_checkpoint(old_ckpt, out)
            killed(moment, out, force)
            left = [out, *out.parent.glob(".model.export-*")]
            held = {d.name: consistent(d) for d in left if d.exists()}
            expected_out = new_ckpt.name if moment == "swapped" else (old_ckpt.name if force else None)
            assert held.get("model") == expected_out, (moment, force, held)
            if len(held) > 1 or "model" not in held:                  # the next export cleans up the leftovers
                export_checkpoint(new_ckpt, out, overwrite=True)
                assert [p.name for p in out.parent.iterdir()] == ["model"] and consistent(out) == new_ckpt.name
    # a failed write is one line and leaves OUT as it was: a file size limit (ulimit -f) ...
    out = work / "limited" / "model"
    export_checkpoint(old_ckpt, out)
    tool = [sys.executable, str(ROOT / "tools" / "export_checkpoint.py"), str(new_ckpt), str(out), "--force"]
    limited = subprocess.run(["bash", "-c", 'ulimit -f 24; exec "$@"', "_", *tool], capture_output=True, text=True)
    assert limited.returncode == 2 and limited.stderr.count("\n") == 1 and "File too large" in limited.stderr
    assert consistent(out) == old_ckpt.name and [p.name for p in out.parent.iterdir()] == ["model"]
    # ... a full disk and a read-only directory (a tmpfs, where mounting is allowed)
    disk = work / "disk"
    if mount_tmpfs(disk, 20 * 1024):
        try:
            full = subprocess.run(tool[:3] + [str(disk / "model")], capture_output=True, text=True)
            assert full.returncode == 2 and full.stderr.count("\n") == 1 and "No space left" in full.stderr
            assert list(disk.iterdir()) == []
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
            read_only = subprocess.run(tool[:3] + [str(disk / "model")], capture_output=True, text=True)
            assert read_only.returncode == 2 and "Read-only file system" in read_only.stderr
            assert read_only.stderr.count("\n") == 1 and list(disk.iterdir()) == []
        finally:
            subprocess.run(["umount", str(disk)], check=True)


def check_export_reproduces_eval_loss(corpus, run, tmp_path, dp, zero):
    """Offline export from the shards of a (TP, PP, DP) run: its evaluation loss equals the one the training run
    computed (1e-5; evaluation runs without dropout, so the run's training dropout does not enter); it loads
    with plain torch; --dtype bfloat16 writes the rounded fp32 masters and says so."""
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    assert not (ckpt / "consolidated").exists()             # shards only
    out = tmp_path / "export"
    tool = [sys.executable, str(ROOT / "tools" / "export_checkpoint.py")]
    exported_tool = subprocess.run(tool + [str(ckpt), str(out)], capture_output=True, text=True)
    assert exported_tool.returncode == 0, exported_tool.stderr
    assert (out / "tokenizer" / "lamemo_tokenizer.json").exists()
    # what transformers and people read (docs/evaluation.md): code, tokenizer files, a card that parses
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and "| Training steps |" in card.text
    assert AutoTokenizer.from_pretrained(out)("To be\n")["input_ids"] == list(b"To be\n")          # byte-level run
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    probe_ids = torch.arange(hf.config.tgt_len)[None]
    with torch.no_grad():
        reference = LaMemoModel.from_pretrained(out)(probe_ids, mem_len=hf.mem_len).logits
        assert torch.allclose(hf(probe_ids).logits, reference, rtol=1e-5, atol=1e-6)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    parallel_eval = [r["eval_loss"] for r in records if "eval_loss" in r][-1]     # scored by the training run
    from pretrain.data.indexed import load_tokens
    from lamemo_parallel.inference import evaluate_tokens
    tokens = torch.from_numpy(load_tokens(corpus / "train").astype("int64"))[:301]
    # the run scores run.eval_batch_size (1) streams per data-parallel rank: the single-device batch is dp
    exported = evaluate_tokens(LaMemoModel.from_pretrained(out), tokens, tgt_len=8, mem_len=8, batch_size=dp)
    assert exported.loss == pytest.approx(parallel_eval, rel=1e-5)
    # run.dir/final is the same offline export of the same checkpoint
    final = LaMemoModel.from_pretrained(run / "final").state_dict()
    fp32 = LaMemoModel.from_pretrained(out).state_dict()
    assert all(torch.equal(final[k], fp32[k]) for k in fp32)
    # plain torch only: the export loads in a process that never imports deepspeed / megatron
    probe = ("import sys, lamemo_parallel as lp; lp.LaMemoModel.from_pretrained(sys.argv[1]); "
             "assert 'deepspeed' not in sys.modules and 'megatron' not in sys.modules")
    check = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert json.loads((out / "export.json").read_text())["dtype"] == "float32"
    if zero == 1:
        from safetensors.torch import load_file
        half = subprocess.run(tool + [str(ckpt), str(tmp_path / "bf16"), "--dtype", "bfloat16"], capture_output=True,
                              text=True)
        assert half.returncode == 0, half.stderr
        info = json.loads((tmp_path / "bf16" / "export.json").read_text())
        assert info["dtype"] == "bfloat16" and info["weights"] == "fp32 master"
        weights = load_file(str(tmp_path / "bf16" / "model.safetensors"))
        assert all(weights[k].dtype == torch.bfloat16 and torch.equal(weights[k], fp32[k].bfloat16()) for k in fp32)


def test_bf16_training_exports_the_fp32_master_and_reshards(corpus, tmp_path):
    """bf16 training, ZeRO-1 over 2 ranks: the export holds the optimizer's fp32 masters (not bf16-rounded
    weights); resuming it on one rank with ZeRO 0 (another layout) restores the masters and continues."""
    run = tmp_path / "run"
    base = ["parallel.precision=bf16", "model.dropout=0.0", "model.dropatt=0.0", "data.mem_len=0"]
    first = launch(2, overrides(corpus, run, *base, "parallel.zero_stage=1", "run.exit_after=3"))
    assert first.returncode == 0, first.stderr[-4000:]
    ckpt = run / "checkpoints" / "step_00000003"
    from pretrain.checkpoint.export import export_checkpoint
    export_checkpoint(ckpt, tmp_path / "export")
    weights = LaMemoModel.from_pretrained(tmp_path / "export").state_dict()
    w = weights["layers.0.attn.q_proj.weight"]
    assert not torch.equal(w, w.bfloat16().float())           # fp32 masters carry more than bf16 precision
    assert json.loads((tmp_path / "export" / "export.json").read_text())["training_precision"] == "bf16"
    second = launch(1, overrides(corpus, run, *base, "parallel.zero_stage=0"))
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resharding weights and optimizer state" in second.stdout + second.stderr
    # 8 streams (2 ranks x 2 micro-batches x 2 rows) -> 4: streams 0-3 continue, 4-7 retire, their rest is read
    assert "data: streams 8 -> 4 at pair 24 of epoch 0: 4 continue" in second.stdout + second.stderr
    assert sorted(losses(run)) == list(range(1, STEPS + 1))


RESHARD_STEPS, SAVED_AT = 13, 3

EXACT_RESHARDS = {  # name -> (ranks, settings of layout A; ranks, settings of layout B); (tensor, pipeline, data)
    # (2, 1, 2) ZeRO-1 -> (1, 2, 2) ZeRO-0: heads gathered from two TP ranks, layers split over two stages
    "tp2dp2-zero1-to-pp2dp2-zero0": ((4, ["parallel.tensor=2", "parallel.zero_stage=1"]),
                                     (4, ["parallel.pipeline=2", "parallel.zero_stage=0"])),
    # (2, 2, 1) ZeRO-0 -> (1, 1, 2) ZeRO-3: the same 4 streams (2 rows per micro-batch on one data-parallel rank,
    # then 1 on each of two) follow their global ids to the new ranks; each rank fills only its ZeRO-3 partitions
    "tp2pp2-to-dp2-zero3": ((4, ["parallel.tensor=2", "parallel.pipeline=2"]),
                            (2, ["data.micro_batch_size=1", "parallel.zero_stage=3"])),
    # (1, 1, 1) ZeRO-0 -> ZeRO-2, dropout on: nothing but the ZeRO stage changes, so the RNG is restored and the
    # dropout masks are the straight run's
    "zero0-to-zero2-dropout": ((1, ["model.dropout=0.1", "model.dropatt=0.1"]),
                               (1, ["model.dropout=0.1", "model.dropatt=0.1", "parallel.zero_stage=2"])),
}


@pytest.mark.parametrize("case", sorted(EXACT_RESHARDS))
def test_resharded_resume_continues_exactly_with_the_memory(corpus, tmp_path, case):
    """fp32, mem_len = tgt_len: the straight run on layout A saves at step 3; a run on layout B resumes from that
    checkpoint. Each rank of B reads its weights, Adam moments and the memory of the streams it now reads (its
    heads, its stage's layers) from the shards, so B's losses for the next 10 steps equal A's to 1e-5. For one
    case the same resume with the memory emptied (LAMEMO_FAULT_DROP_MEMORY) misses that tolerance by far.
    ``lamemo-checkpoint info`` reads A's checkpoint: its layout and step."""
    (ranks_a, settings_a), (ranks_b, settings_b) = EXACT_RESHARDS[case]
    base = ["model.dropout=0.0", "model.dropatt=0.0", f"run.steps={RESHARD_STEPS}", f"run.save_interval={SAVED_AT}",
            "run.keep_checkpoints=6",
            "data.valid="]
    straight = launch(ranks_a, overrides(corpus, tmp_path / "straight", *base, *settings_a))
    assert straight.returncode == 0, straight.stderr[-4000:]
    ckpt = tmp_path / "straight" / "checkpoints" / f"step_{SAVED_AT:08d}"
    resumed = launch(ranks_b, overrides(corpus, tmp_path / "run", *base, *settings_b, f"run.resume={ckpt}"))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    output = resumed.stdout + resumed.stderr
    assert "resharding weights and optimizer state" in output and "streams keep their position and memory" in output
    assert ("RNG restored (every generator)" in output) == (case == "zero0-to-zero2-dropout"), output[-3000:]
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "run")
    assert sorted(b) == list(range(SAVED_AT + 1, RESHARD_STEPS + 1))
    steps = range(SAVED_AT + 1, RESHARD_STEPS + 1)
    torch.testing.assert_close(torch.tensor([b[s] for s in steps]), torch.tensor([a[s] for s in steps]),
                               rtol=1e-5, atol=0)
    check_info(ckpt, SAVED_AT, ranks_a, settings_a)
    if case == "zero0-to-zero2-dropout":
        emptied = launch(ranks_b, overrides(corpus, tmp_path / "emptied", *base, *settings_b, f"run.resume={ckpt}"),
                         env_extra={"LAMEMO_FAULT_DROP_MEMORY": "1"})
        assert emptied.returncode == 0, emptied.stderr[-4000:]
        c = losses(tmp_path / "emptied")
        worst = max(abs(c[s] - a[s]) / abs(a[s]) for s in steps)
        assert worst > 1e-3, worst          # 100 times the tolerance the memory keeps


def info_command(*args) -> tuple[int, str, str]:
    """``lamemo-checkpoint info`` in this process (its main, as the console script runs it):
    (status, stdout, stderr)."""
    return run_main(checkpoint_command, ["info", *args])


def check_info(ckpt, step, ranks, settings):
    """``lamemo-checkpoint info`` (text and --json) on a checkpoint: step and layout, streams, files."""
    status, text, _ = info_command(ckpt)
    assert status == 0, text
    value = {k: int(v) for k, v in (x.split("=") for x in settings if x.startswith("parallel.tensor=")
                                                                   or x.startswith("parallel.pipeline="))}
    tp, pp = value.get("parallel.tensor", 1), value.get("parallel.pipeline", 1)
    assert f"step: {step}" in text
    assert f"layout: tensor {tp} x pipeline {pp} x data {ranks // (tp * pp)} (world {ranks})" in text
    assert "valid: yes" in text and "memory: 8 rows per stream" in text
    status, out, _ = info_command(ckpt, "--json")
    report = json.loads(out)
    streams = report["streams"]
    assert report["step"] == step and report["valid"]
    if "span" in streams:       # a mixture: 2 segments a span, so after an even step every stream ends one
        assert streams["position"] == streams["span"] == 16 and sum(streams["read"].values()) == step * 8 * \
            streams["count"] and f"target tokens read: a {streams['read']['a']:,}" in text
    else:
        assert streams["offset"] == step * 8
    assert report["layout"]["tensor"] == tp and report["layout"]["pipeline"] == pp
    assert sorted(s for ids in report["streams"]["per_data_rank"].values() for s in ids) == \
        list(range(report["streams"]["count"]))


def test_resumed_run_logs_into_the_same_mlflow_run(corpus, tmp_path):
    """The embedded SQLite store in the run directory: one MLflow run across the restart, metrics 1..6."""
    from mlflow.tracking import MlflowClient
    run = tmp_path / "run"
    args = [a for a in overrides(corpus, run) if a != "run.mlflow=false"] + ["run.mlflow=true"]
    env = {"MLFLOW_TRACKING_URI": ""}
    assert launch(1, args + ["run.exit_after=3"], env_extra=env).returncode == 0
    second = launch(1, args, env_extra=env)
    assert second.returncode == 0, second.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    experiments = client.search_experiments()
    runs = [r for e in experiments for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted({m.step for m in history}) == list(range(1, STEPS + 1))
    assert runs[0].data.params["model.d_model"] == "16"
    assert runs[0].info.status == "FINISHED"


def test_a_synchronous_save_killed_or_out_of_disk_keeps_the_previous_checkpoint(corpus, tmp_path):
    """run.async_save=false (tests/checkpoint/test_async_save.py has the asynchronous cases). (1) kill -9 after
    step 4's shards, before its marker: the restart resumes from step 2 and its losses are the straight run's,
    bitwise. (2) The run directory on a tmpfs that holds one checkpoint but not two: the step-4 save fails with
    one line naming the path and 'No space left on device', the half-written checkpoint is removed and step 2
    stays complete."""
    from pretrain.faults import KILL_DURING_SAVE_ENV
    settings = ["run.save_interval=2", "run.async_save=false"]
    straight = launch(1, overrides(corpus, tmp_path / "straight", *settings))
    assert straight.returncode == 0, straight.stderr[-4000:]
    args = overrides(corpus, tmp_path / "run", *settings)
    killed = launch(1, args, env_extra={KILL_DURING_SAVE_ENV: "4"})
    assert killed.returncode != 0
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "step_00000002" / "COMPLETE.json").exists()
    assert (ckpts / "step_00000004").exists() and not (ckpts / "step_00000004" / "COMPLETE.json").exists()
    again = launch(1, args)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resumed from" in again.stdout and "step_00000002" in again.stdout
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "run")
    assert [a[s] for s in range(1, STEPS + 1)] == [b[s] for s in range(1, STEPS + 1)]

    # every checkpoint of the run has the same size; the newest two are kept
    ckpt_bytes = sum(p.stat().st_size for p in (tmp_path / "straight" / "checkpoints" / f"step_{STEPS:08d}").rglob("*")
                     if p.is_file())
    disk = tmp_path / "disk"
    assert ckpt_bytes > 0 and mount_tmpfs(disk, int(ckpt_bytes * 1.5) + 64 * 1024), \
        "mounting a size-limited tmpfs needs root"
    try:
        full = launch(1, overrides(corpus, disk / "run", *settings))
        # docs/reliability.md: exit code 1 = failed after start-up (2 is kept for refusals before step 1)
        assert full.returncode == 1, full.stderr[-4000:]
        check_full_disk_stop(full, disk / "run", a)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
