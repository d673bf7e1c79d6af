"""The fused Triton GRU kernel against the TorchScript recurrence: compiled on a GPU, interpreted on CPU."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from model import GRU, fused
from model.cell import VARIANTS, Variant

pytestmark = pytest.mark.skipif(not fused.AVAILABLE, reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: tests/conftest.py set TRITON_INTERPRET


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    ("inputs", "hidden", "layers", "batch", "lengths"),
    [
        (1, 64, 2, 20, [6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 6, 6, 5, 5, 4, 4, 3, 3]),  # ragged
        (4, 128, 1, 3, None),  # the second serving shape, every row all steps
        (3, 50, 2, 17, [3] * 9 + [2] * 4 + [1] * 4),  # H not a power of two: padded lanes must stay zero
        (2, 8, 3, 1, [1]),  # a tiny H, one row, one step
        (2, 16, 4, 5, [3, 1, 2, 3, 3]),  # four layers: outputs pass through both buffers, rows unsorted
    ],
)
def test_kernel_matches_the_torchscript_recurrence(
    variant: Variant, inputs: int, hidden: int, layers: int, batch: int, lengths: list[int] | None
) -> None:
    torch.manual_seed(hidden + batch)
    gru = GRU(inputs, hidden, layers, variant=variant).to(DEVICE)
    given = lengths
    lengths = lengths or [4] * batch
    steps = max(lengths)
    x = torch.randn(batch, steps, inputs, device=DEVICE)
    h0 = torch.randn(layers, batch, hidden, device=DEVICE) * 0.5
    order = sorted(range(batch), key=lambda row: -lengths[row])  # the scripted path needs longest first
    with torch.no_grad():
        out, h_n = fused.run_layers(x, h0, gru._stacked.get(), given, variant == "seed")
        sorted_lengths = [lengths[row] for row in order]
        gru.use_fused = False
        ref_out, ref_h = gru(x[order], h0[:, order].contiguous(), sorted_lengths)
    torch.testing.assert_close(h_n[:, order], ref_h, atol=1e-5, rtol=0)
    for rank, row in enumerate(order):  # outputs count only up to each row's own length
        torch.testing.assert_close(out[row, : lengths[row]], ref_out[rank, : lengths[row]], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "config", [fused.LaunchConfig(rows=2, warps=4, stream=False), fused.LaunchConfig(rows=4, warps=2, stream=True)]
)
def test_every_launch_config_computes_the_same(config: fused.LaunchConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several rows per program (the last program part empty) and weights read every step."""
    monkeypatch.setattr(fused, "launch_config", lambda *_: config)
    test_kernel_matches_the_torchscript_recurrence("seed", 3, 50, 2, 7, [3, 3, 2, 2, 1, 3, 2])


def test_launch_rule_follows_the_sweeps() -> None:
    """One row per program while the weights fit in registers, or while each row has a multiprocessor."""
    one_row = fused.LaunchConfig(rows=1, warps=4, stream=False)
    assert fused.launch_config(64, 1024, 132) == one_row
    assert fused.launch_config(128, 132, 132) == one_row
    assert fused.launch_config(128, 133, 132) == fused.LaunchConfig(rows=2, warps=8, stream=True)
    assert fused.launch_config(256, 1, 132) == fused.LaunchConfig(rows=2, warps=16, stream=True)


def test_strided_inputs_give_contiguous_results() -> None:
    """Callers may pass views (a state gathered as (B, L, H) and transposed): results are laid out as usual."""
    torch.manual_seed(2)
    gru = GRU(3, 16, 2).to(DEVICE)
    x = torch.randn(4, 5, 3, device=DEVICE)
    h0 = torch.randn(4, 2, 16, device=DEVICE).transpose(0, 1)  # (L, B, H), not contiguous
    with torch.no_grad():
        out, h_n = fused.run_layers(x.transpose(0, 1).contiguous().transpose(0, 1), h0, gru._stacked.get(), None, True)
        ref_out, ref_h = fused.run_layers(x, h0.contiguous(), gru._stacked.get(), None, True)
    assert h_n.is_contiguous()
    torch.testing.assert_close((out, h_n), (ref_out, ref_h), atol=0, rtol=0)


def test_weights_changed_in_place_are_read_again() -> None:
    """The kernel reads stacked copies of the weights: a load_state_dict (in place) must reach them."""
    torch.manual_seed(1)
    gru, other = GRU(2, 16, 2).to(DEVICE), GRU(2, 16, 2).to(DEVICE)
    x, h0 = torch.randn(3, 4, 2, device=DEVICE), torch.zeros(2, 3, 16, device=DEVICE)
    with torch.no_grad():
        before = fused.run_layers(x, h0, gru._stacked.get(), None, seed=True)
        gru.load_state_dict(other.state_dict())
        after = fused.run_layers(x, h0, gru._stacked.get(), None, seed=True)
        expected = fused.run_layers(x, h0, other._stacked.get(), None, seed=True)
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(after, expected, atol=0, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gru_on_cuda_runs_the_kernel_at_inference_and_equals_cudnn() -> None:
    torch.backends.cudnn.allow_tf32 = False  # cuDNN's default TF32 is ~1e-3 off fp32
    torch.manual_seed(0)
    reference = nn.GRU(1, 64, 2, batch_first=True).cuda().eval()
    ours = GRU.from_torch(reference).eval()
    x, h0 = torch.randn(256, 32, 1, device="cuda"), torch.randn(2, 256, 64, device="cuda")
    assert fused.supports(x)
    with torch.inference_mode():
        fused_out = ours(x, h0)
        ours.use_fused = False
        script_out = ours(x, h0)
        cudnn_out = reference(x, h0)
    for a, b in ((fused_out, cudnn_out), (fused_out, script_out)):
        torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=0)


def test_kernel_is_used_only_for_float32_on_cuda() -> None:
    fake = lambda dtype, cuda: types.SimpleNamespace(is_cuda=cuda, dtype=dtype)  # noqa: E731
    assert not fused.supports(fake(torch.float64, True))
    assert not fused.supports(fake(torch.float16, True))
    assert not fused.supports(fake(torch.float32, False))
    assert fused.supports(fake(torch.float32, True)) == fused.AVAILABLE
