"""Official-release import, save_pretrained / from_pretrained round trips, and clear errors on bad state dicts."""
import subprocess
import sys

import pytest
import torch

from lamemo_parallel import CheckpointMismatchError, LaMemoModel
from lamemo_parallel.convert import OfficialImportError, import_official, to_official_state_dict

from helpers import ROOT, tiny_config, tiny_model



def random_model(variant, **kw):
    return tiny_model(29, seed=3, perturb=0.05, variant=variant, init_std=0.2, **kw)


def outputs(model, tokens, seg=5):
    memory, nlls = None, []
    for s in range(tokens.shape[1] // seg - 1):
        out = model(tokens[:, s * seg:(s + 1) * seg], targets=tokens[:, s * seg + 1:(s + 1) * seg + 1], memory=memory)
        nlls.append(out.nll)
        memory = out.memory
    return torch.cat(nlls, 1)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [0, 3, 31, 32, 33])
def test_import_tool_save_load_round_trip_is_exact(variant, tmp_path):
    model = random_model(variant, pre_lnorm=variant == 31, clamp_len=3 if variant == 32 else -1)
    src = tmp_path / "release.pt"
    torch.save(to_official_state_dict(model), src)
    out_dir = tmp_path / "imported"
    cmd = [sys.executable, str(ROOT / "tools" / "import_official_checkpoint.py"), str(src), str(out_dir)]
    cmd += ["--variant", "33"] if variant == 33 else []
    cmd += ["--pre-lnorm"] if variant == 31 else []
    cmd += ["--clamp-len", "3"] if variant == 32 else []
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    imported = LaMemoModel.from_pretrained(out_dir)
    c = imported.config
    assert (c.variant, c.n_layer, c.d_model, c.n_head, c.d_head, c.d_inner, c.vocab_size) == (variant, 2, 16, 2, 8, 24, 29)
    assert c.pre_lnorm == (variant == 31) and c.clamp_len == (3 if variant == 32 else -1)
    for (name, a), (name_b, b) in zip(model.state_dict().items(), imported.state_dict().items(), strict=True):
        assert name == name_b and torch.equal(a, b), name
    tokens = torch.randint(0, 29, (2, 21))
    assert torch.equal(outputs(model, tokens), outputs(imported, tokens))
    # save_pretrained -> from_pretrained is exact too
    imported.save_pretrained(tmp_path / "again")
    again = LaMemoModel.from_pretrained(tmp_path / "again")
    assert torch.equal(outputs(again, tokens), outputs(model, tokens))


def test_import_infers_variant_and_sizes():
    state = to_official_state_dict(random_model(32))
    assert import_official(state).config.variant == 32
    state = to_official_state_dict(random_model(0))
    assert import_official(state).config.variant == 0
    with pytest.raises(OfficialImportError, match="variant 0"):
        import_official(state, variant=3)


@pytest.mark.parametrize("variant", [0, 3])
def test_bad_state_dicts_name_the_tensor(variant):
    good = to_official_state_dict(random_model(variant))
    missing = dict(good)
    del missing["layers.1.pos_ff.layer_norm.bias"]
    with pytest.raises(OfficialImportError, match=r"layers\.1\.pos_ff\.layer_norm\.bias"):
        import_official(missing)
    extra = dict(good, **{"layers.0.dec_attn.mystery.weight": torch.zeros(3)})
    with pytest.raises(OfficialImportError, match=r"layers\.0\.dec_attn\.mystery\.weight"):
        import_official(extra)
    misshaped = dict(good)
    misshaped["layers.1.pos_ff.CoreNet.3.bias"] = torch.zeros(17)
    with pytest.raises(OfficialImportError, match=r"layers\.1\.pos_ff\.CoreNet\.3\.bias"):
        import_official(misshaped)
    untied = dict(good)
    untied["crit.out_layers.0.weight"] = good["crit.out_layers.0.weight"] + 1
    with pytest.raises(OfficialImportError, match="tied"):
        import_official(untied)


def test_import_tool_reports_errors_without_traceback(tmp_path):
    bad = to_official_state_dict(random_model(3))
    del bad["r_r_bias"]
    torch.save(bad, tmp_path / "bad.pt")
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "import_official_checkpoint.py"),
                             str(tmp_path / "bad.pt"), str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "r_r_bias" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_ddp_prefix_and_wrapped_state_dicts(tmp_path):
    from lamemo_parallel.convert import read_official_state_dict
    good = to_official_state_dict(random_model(3))
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in good.items()}}, tmp_path / "wrapped.pt")
    state = read_official_state_dict(tmp_path / "wrapped.pt")
    assert set(state) == set(good) and all(torch.equal(state[k], good[k]) for k in good)


def test_from_pretrained_names_bad_tensors(tmp_path):
    from safetensors.torch import load_file, save_file
    model = random_model(3)
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["layers.0.attn.q_proj.weight"] = torch.zeros(3, 3)
    del tensors["output_bias"]
    tensors["surprise"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError) as err:
        LaMemoModel.from_pretrained(tmp_path)
    message = str(err.value)
    assert "output_bias" in message and "surprise" in message and "layers.0.attn.q_proj.weight" in message


@pytest.mark.parametrize("variant", [0, 3])
def test_memory_state_dict_round_trip_continues_identically(variant, tmp_path):
    """LaMemoMemory.state_dict -> torch.save / load(weights_only) -> from_state_dict gives the same next segment."""
    torch.manual_seed(0)
    model = LaMemoModel(tiny_config(17, variant=variant))
    tokens = torch.randint(0, 17, (2, 12))
    memory = model(tokens[:, :6], targets=tokens[:, 1:7]).memory
    torch.save(memory.state_dict(), tmp_path / "memory.pt")
    loaded = type(memory).from_state_dict(torch.load(tmp_path / "memory.pt", weights_only=True), device="cpu")
    assert sorted(loaded.tensors()) == sorted(memory.tensors())
    for name, tensor in memory.tensors().items():
        assert torch.equal(loaded.tensors()[name], tensor), name
    expected = model(tokens[:, 6:11], targets=tokens[:, 7:12], memory=memory).nll
    assert torch.equal(model(tokens[:, 6:11], targets=tokens[:, 7:12], memory=loaded).nll, expected)
