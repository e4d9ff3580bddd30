"""The vectorised single-device model against the loop-per-position transcription of docs/method.md."""
import pytest
import torch

from helpers import tiny_model
from spec_reference import SpecModel


def small_model(variant, *, pre_lnorm=False, clamp_len=-1, seed=0):
    return tiny_model(37, variant=variant, pre_lnorm=pre_lnorm, clamp_len=clamp_len, seed=seed)


# M = N, M < N and M > N; variant 33 requires M >= N (docs/method.md §5; see test_variant33_rejects_short_memory).
CASES = [(v, n, m) for v in (0, 3, 31, 32, 33) for n, m in [(5, 5), (5, 3), (4, 7)] if not (v == 33 and m < n)]


@pytest.mark.parametrize("variant,seg_len,mem_len", CASES)
def test_model_matches_spec_over_segments(variant, seg_len, mem_len):
    model = small_model(variant)
    ref = SpecModel(model)
    torch.manual_seed(1)
    tokens = torch.randint(0, 37, (2, 5 * seg_len + 1))
    memory, ref_memory = None, None
    for s in range(5):
        x = tokens[:, s * seg_len:(s + 1) * seg_len]
        y = tokens[:, s * seg_len + 1:(s + 1) * seg_len + 1]
        out = model(x, targets=y, memory=memory, mem_len=mem_len, return_logits=True)
        ref_logits, ref_memory = ref.run_segment(x, ref_memory, mem_len)
        torch.testing.assert_close(out.logits.double(), ref_logits, rtol=1e-5, atol=1e-5)
        ref_nll = torch.nn.functional.cross_entropy(ref_logits.flatten(0, 1), y.flatten(), reduction="none")
        torch.testing.assert_close(out.nll.double(), ref_nll.view_as(y), rtol=1e-5, atol=1e-5)
        memory = out.memory
        if variant != 0:
            for layer in range(2):
                torch.testing.assert_close(memory.vectors[layer].double(), ref_memory["C"][layer],
                                           rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(memory.log_normalizers[layer].double(), ref_memory["Z"][layer],
                                           rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", [0, 3])
@pytest.mark.parametrize("pre_lnorm,clamp_len", [(True, -1), (False, 3), (True, 2)])
def test_pre_lnorm_and_clamp_len_match_spec(variant, pre_lnorm, clamp_len):
    model = small_model(variant, pre_lnorm=pre_lnorm, clamp_len=clamp_len)
    ref = SpecModel(model)
    tokens = torch.randint(0, 37, (2, 19))
    memory, ref_memory = None, None
    for s in range(3):
        x, y = tokens[:, s * 6:(s + 1) * 6], tokens[:, s * 6 + 1:(s + 1) * 6 + 1]
        out = model(x, targets=y, memory=memory, mem_len=6, return_logits=True)
        ref_logits, ref_memory = ref.run_segment(x, ref_memory, 6)
        torch.testing.assert_close(out.logits.double(), ref_logits, rtol=1e-5, atol=1e-5)
        memory = out.memory


def test_variant33_rejects_short_memory():
    model = small_model(33)
    tokens = torch.randint(0, 37, (1, 12))
    out = model(tokens[:, :3], memory=None, mem_len=3)
    with pytest.raises(ValueError, match="variant 33"):
        model(tokens[:, 3:9], memory=out.memory, mem_len=3)
