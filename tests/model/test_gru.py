"""GRUCell and GRU against the equations written out again in NumPy, and against torch.nn.GRU."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from model import GRU, GRUCell


def _sigmoid(a: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-a))


def numpy_cell(x: np.ndarray, h: np.ndarray, cell: GRUCell) -> np.ndarray:
    """One step, straight from the equations in model/cell.py's docstring, in float64."""
    w_ih, w_hh = cell.weight_ih.detach().double().numpy(), cell.weight_hh.detach().double().numpy()
    b_ih, b_hh = cell.bias_ih.detach().double().numpy(), cell.bias_hh.detach().double().numpy()
    (w_ir, w_iz, w_in), (w_hr, w_hz, w_hn) = np.split(w_ih, 3), np.split(w_hh, 3)
    (b_ir, b_iz, b_in), (b_hr, b_hz, b_hn) = np.split(b_ih, 3), np.split(b_hh, 3)
    r = _sigmoid(x @ w_ir.T + b_ir + h @ w_hr.T + b_hr)
    z = _sigmoid(x @ w_iz.T + b_iz + h @ w_hz.T + b_hz)
    if cell.variant == "seed":
        n = np.tanh(x @ w_in.T + b_in + (r * h) @ w_hn.T + b_hn)
        return z * n + (1 - z) * h
    n = np.tanh(x @ w_in.T + b_in + r * (h @ w_hn.T + b_hn))
    return (1 - z) * n + z * h


def numpy_stack(x: np.ndarray, h0: np.ndarray, gru: GRU) -> tuple[np.ndarray, np.ndarray]:
    """Every layer over every step, one step at a time: x (B, T, I), h0 (L, B, H)."""
    layer_input, finals = x, []
    for layer, cell in enumerate(gru.cells):
        h, outputs = h0[layer], []
        for t in range(x.shape[1]):
            h = numpy_cell(layer_input[:, t], h, cell)
            outputs.append(h)
        layer_input = np.stack(outputs, axis=1)
        finals.append(h)
    return layer_input, np.stack(finals)


@pytest.mark.parametrize("variant", ["seed", "torch"])
def test_cell_step_matches_numpy_equations(variant: str) -> None:
    torch.manual_seed(1)
    cell = GRUCell(3, 5, variant=variant)  # type: ignore[arg-type]
    x, h = torch.randn(4, 3), torch.randn(4, 5)
    expected = numpy_cell(x.double().numpy(), h.double().numpy(), cell)
    np.testing.assert_allclose(cell(x, h).detach().numpy(), expected, atol=1e-6)


def test_variants_differ_on_the_same_weights() -> None:
    torch.manual_seed(2)
    seed_cell = GRUCell(3, 5, variant="seed")
    torch_cell = GRUCell(3, 5, variant="torch")
    torch_cell.load_state_dict(seed_cell.state_dict())
    x, h = torch.randn(4, 3), torch.randn(4, 5)
    assert (seed_cell(x, h) - torch_cell(x, h)).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["seed", "torch"])
def test_two_layer_stack_matches_numpy_equations(variant: str) -> None:
    torch.manual_seed(3)
    gru = GRU(3, 6, num_layers=2, variant=variant)  # type: ignore[arg-type]
    x, h0 = torch.randn(2, 9, 3), torch.randn(2, 2, 6)
    out, h_n = gru(x, h0)
    expected_out, expected_h = numpy_stack(x.double().numpy(), h0.double().numpy(), gru)
    np.testing.assert_allclose(out.detach().numpy(), expected_out, atol=1e-5)
    np.testing.assert_allclose(h_n.detach().numpy(), expected_h, atol=1e-5)


def test_stack_is_built_from_one_gru_cell_per_layer() -> None:
    gru = GRU(3, 6, num_layers=3)
    assert sum(isinstance(m, GRUCell) for m in gru.modules()) == 3


@pytest.mark.parametrize("bias", [True, False])
def test_from_torch_matches_nn_gru_outputs_and_final_state(bias: bool) -> None:
    torch.manual_seed(4)
    reference = nn.GRU(3, 7, num_layers=2, batch_first=True, bias=bias)
    gru = GRU.from_torch(reference)
    x, h0 = torch.randn(3, 11, 3), torch.randn(2, 3, 7)
    with torch.no_grad():
        expected_out, expected_h = reference(x, h0)
        out, h_n = gru(x, h0)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(h_n, expected_h, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["seed", "torch"])
def test_chunk_by_chunk_equals_one_call(variant: str) -> None:
    torch.manual_seed(5)
    gru = GRU(2, 6, num_layers=2, variant=variant)  # type: ignore[arg-type]
    x = torch.randn(3, 20, 2)
    with torch.no_grad():
        whole, h_whole = gru(x)
        h, pieces = None, []
        for start, stop in [(0, 1), (1, 8), (8, 13), (13, 20)]:
            out, h = gru(x[:, start:stop], h)
            pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(h, h_whole, atol=1e-6, rtol=0)


def test_unequal_lengths_give_each_row_its_own_run() -> None:
    torch.manual_seed(6)
    gru = GRU(2, 5, num_layers=2)
    lengths = [7, 4, 1]
    x, h0 = torch.randn(3, 7, 2), torch.randn(2, 3, 5)
    with torch.no_grad():
        out, h_n = gru(x, h0, lengths=lengths)
        for row, length in enumerate(lengths):
            alone_out, alone_h = gru(x[row : row + 1, :length], h0[:, row : row + 1].contiguous())
            torch.testing.assert_close(out[row : row + 1, :length], alone_out, atol=1e-6, rtol=0)
            torch.testing.assert_close(h_n[:, row : row + 1], alone_h, atol=1e-6, rtol=0)


def test_lengths_out_of_order_are_refused() -> None:
    with pytest.raises(ValueError, match="sorted longest first"):
        GRU(2, 4)(torch.randn(2, 5, 2), lengths=[3, 5])


@pytest.mark.parametrize(("x_shape", "h0_shape", "message"), [
    ((4, 3, 2), (2, 1, 5), r"h0 must be \(L, B, H\) = \(2, 4, 5\), got \(2, 1, 5\)"),
    ((4, 3, 2), (3, 4, 5), r"h0 must be .* got \(3, 4, 5\)"),
    ((4, 3, 3), None, r"x must be \(B, T >= 1, 2\), got \(4, 3, 3\)"),
    ((4, 0, 2), None, r"x must be .* got \(4, 0, 2\)"),
    ((3, 2), None, r"x must be .* got \(3, 2\)"),
])
def test_inputs_of_the_wrong_shape_are_refused_as_nn_gru_refuses_them(
    x_shape: tuple[int, ...], h0_shape: tuple[int, ...] | None, message: str
) -> None:
    """An h0 for one row broadcast over four and an h0 with an extra layer had that layer ignored."""
    h0 = None if h0_shape is None else torch.zeros(h0_shape)
    with pytest.raises(ValueError, match=message):
        GRU(2, 5, 2)(torch.randn(x_shape), h0)


def test_fast_path_follows_parameters_after_conversion_and_loading() -> None:
    """The scripted recurrence reads weights rearranged once (kept while autograd is off): .to() and
    load_state_dict, in place, must reach it."""
    torch.manual_seed(3)
    gru, other = GRU(2, 8, 2), GRU(2, 8, 2)
    x = torch.randn(3, 5, 2)
    with torch.inference_mode():
        before = gru(x)[0]
        gru.load_state_dict(other.state_dict())
        after, expected = gru(x)[0], other(x)[0]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected)
    torch.testing.assert_close(gru(x)[0], other(x)[0])
    replaced = GRU(2, 8, 2)
    with torch.inference_mode():
        replaced(x)
        replaced.load_state_dict(other.state_dict(), assign=True)  # new Parameter objects, not copies
        torch.testing.assert_close(replaced(x)[0], expected)
        # made under inference_mode (as unpickling here does): parameters without a version counter
        unpickled = pickle.loads(pickle.dumps(replaced))
        torch.testing.assert_close(unpickled(x)[0], expected)
        unpickled.load_state_dict(gru.state_dict())
        torch.testing.assert_close(unpickled(x)[0], gru(x)[0])
    as_double = gru.double()
    out, h_n = as_double(x.double())
    assert out.dtype == h_n.dtype == torch.float64
    torch.testing.assert_close(out.float(), other(x)[0], atol=1e-5, rtol=0)


def test_gradients_reach_the_cells_and_equal_nn_gru() -> None:
    """Training runs the sigmoid form too, its weights folded per call from the cells' parameters."""
    torch.manual_seed(7)
    reference = nn.GRU(3, 7, num_layers=2, batch_first=True)
    gru = GRU.from_torch(reference)
    x, h0 = torch.randn(4, 6, 3), torch.randn(2, 4, 7)
    for model in (reference, gru):
        out, h_n = model(x, h0)
        (out.square().sum() + h_n.sum()).backward()
    for layer, cell in enumerate(gru.layers()):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            expected = getattr(reference, f"{name}_l{layer}").grad
            torch.testing.assert_close(getattr(cell, name).grad, expected, atol=1e-5, rtol=1e-4)


def test_cell_without_bias_has_zero_biases_like_nn_gru_cell() -> None:
    cell = GRUCell(3, 5, bias=False)
    assert not cell.bias_ih.any() and not cell.bias_hh.any()
    assert not cell.bias_ih.requires_grad and not cell.bias_hh.requires_grad


@pytest.mark.parametrize("lengths", [[6, 5], [5, 0]])
def test_lengths_outside_the_chunk_are_refused(lengths: list[int]) -> None:
    with pytest.raises(ValueError, match=r"lengths must lie in 1\.\.5"):
        GRU(2, 4)(torch.randn(2, 5, 2), lengths=lengths)
