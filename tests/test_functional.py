"""LoHa maths against naive reference formulas, gradcheck, and the factored forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loha_train.loha import functional as LF

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def naive_plain(w1a, w1b, w2a, w2b, scale):
    """Element by element: sum_i a1[p,i] b1[i,q] * sum_j a2[p,j] b2[j,q] * scale."""
    out, r = w1a.shape
    res = torch.zeros(out, w1b.shape[1], dtype=torch.float64)
    for p in range(out):
        for q in range(w1b.shape[1]):
            s1 = sum(w1a[p, i] * w1b[i, q] for i in range(r))
            s2 = sum(w2a[p, j] * w2b[j, q] for j in range(r))
            res[p, q] = s1 * s2 * scale
    return res


def naive_cp_factor(t, wa, wb):
    r, _, kh, kw = t.shape
    out, inp = wa.shape[1], wb.shape[1]
    res = torch.zeros(out, inp, kh, kw, dtype=torch.float64)
    for p in range(out):
        for q in range(inp):
            for i in range(r):
                for j in range(r):
                    res[p, q] += t[i, j] * wb[j, q] * wa[i, p]
    return res


@pytest.mark.parametrize("shape", [(5, 7), (6, 4 * 1 * 1), (6, 3 * 3 * 3)], ids=["linear", "conv1x1", "conv3x3"])
def test_plain_delta_equals_naive_loop(shape):
    out, inp = shape
    r, scale = 3, 5.0 / 3  # alpha 5 != rank 3: a missing or doubled scale cannot pass
    w1a, w1b, w2a, w2b = _rand(out, r), _rand(r, inp), _rand(out, r), _rand(r, inp)
    ours = LF.delta_weight(w1a, w1b, w2a, w2b, scale)
    torch.testing.assert_close(ours, naive_plain(w1a, w1b, w2a, w2b, scale), rtol=1e-12, atol=1e-12)


def test_cp_delta_equals_naive_loop():
    r, out, inp, scale = 3, 5, 4, 7.0 / 3
    t1, t2 = _rand(r, r, 3, 3), _rand(r, r, 3, 3)
    w1a, w2a, w1b, w2b = _rand(r, out), _rand(r, out), _rand(r, inp), _rand(r, inp)
    ours = LF.delta_weight_cp(t1, w1a, w1b, t2, w2a, w2b, scale)
    ref = naive_cp_factor(t1, w1a, w1b) * naive_cp_factor(t2, w2a, w2b) * scale
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def _plain_args(out=5, inp=6, r=3):
    return [_rand(*s).requires_grad_() for s in [(out, r), (r, inp), (out, r), (r, inp)]]


def _cp_args(out=4, inp=3, r=2, k=3):
    return [
        _rand(r, r, k, k).requires_grad_(),
        _rand(r, out).requires_grad_(),
        _rand(r, inp).requires_grad_(),
        _rand(r, r, k, k).requires_grad_(),
        _rand(r, out).requires_grad_(),
        _rand(r, inp).requires_grad_(),
    ]


def test_gradcheck_plain():
    args = _plain_args()
    assert torch.autograd.gradcheck(lambda *a: LF.delta_weight(*a, 1.7), args)


def test_gradcheck_cp():
    args = _cp_args()
    assert torch.autograd.gradcheck(lambda *a: LF.delta_weight_cp(*a, 1.7), args)


def test_custom_backward_equals_plain_autograd():
    args = _plain_args()
    g = _rand(5, 6)
    grads = torch.autograd.grad((LF.delta_weight(*args, 1.3) * g).sum(), args)
    w1a, w1b, w2a, w2b = args
    ref = torch.autograd.grad((((w1a @ w1b) * (w2a @ w2b) * 1.3) * g).sum(), args)
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b)

    cp = _cp_args()
    g = _rand(4, 3, 3, 3)
    grads = torch.autograd.grad((LF.delta_weight_cp(*cp, 0.7) * g).sum(), cp)
    t1, w1a, w1b, t2, w2a, w2b = cp
    plain = LF.rebuild_cp(t1, w1a, w1b) * LF.rebuild_cp(t2, w2a, w2b) * 0.7
    ref = torch.autograd.grad((plain * g).sum(), cp)
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_factored_linear_equals_dense_delta():
    w1a, w1b, w2a, w2b = (t.detach() for t in _plain_args(out=7, inp=5, r=3))
    x = _rand(2, 4, 5)
    row = _rand(7)
    dense = LF.delta_weight(w1a, w1b, w2a, w2b, 1.0) * row[:, None]
    torch.testing.assert_close(LF.factored_linear(x, w1a, w1b, w2a, w2b, row), F.linear(x, dense))


@pytest.mark.parametrize(
    ("stride", "padding", "dilation"), [(1, 1, 1), (2, 1, 1), (1, 2, 2), (1, 0, 1), (2, "valid", 1)]
)
def test_factored_convs_equal_dense_delta(stride, padding, dilation):
    out, inp, r, k = 5, 4, 2, 3
    x = _rand(2, inp, 9, 9)
    w1a, w2a, w1b, w2b = _rand(out, r), _rand(out, r), _rand(r, inp * k * k), _rand(r, inp * k * k)
    dense = LF.delta_weight(w1a, w1b, w2a, w2b, 0.9).reshape(out, inp, k, k)
    ours = LF.factored_conv(x, w1a, w1b, w2a, w2b, 0.9, (k, k), stride, padding, dilation)
    torch.testing.assert_close(ours, F.conv2d(x, dense, None, stride, padding, dilation))

    t1, t2 = _rand(r, r, k, k), _rand(r, r, k, k)
    ca, cb = (_rand(r, out), _rand(r, out)), (_rand(r, inp), _rand(r, inp))
    dense = LF.delta_weight_cp(t1, ca[0], cb[0], t2, ca[1], cb[1], 0.9)
    ours = LF.factored_conv_cp(x, t1, ca[0], cb[0], t2, ca[1], cb[1], 0.9, stride, padding, dilation)
    torch.testing.assert_close(ours, F.conv2d(x, dense, None, stride, padding, dilation))


def test_loha_rank_reaches_r_squared_while_lora_stays_at_r():
    out, inp, r = 40, 30, 4
    w1a, w1b, w2a, w2b = _rand(out, r), _rand(r, inp), _rand(out, r), _rand(r, inp)
    loha = LF.delta_weight(w1a, w1b, w2a, w2b, 1.0)
    assert torch.linalg.matrix_rank(loha) == min(r * r, out, inp)
    assert torch.linalg.matrix_rank(w1a @ w1b) == r


def test_init_gives_exactly_zero_delta_and_nonzero_gradients():
    w1a, w1b, w2a, w2b = (torch.empty(s, dtype=torch.float64, requires_grad=True) for s in [(6, 2), (2, 5)] * 2)
    LF.init_loha_(w1a, w1b, w2a, w2b)
    delta = LF.delta_weight(w1a, w1b, w2a, w2b, 1.0)
    assert torch.count_nonzero(delta) == 0
    delta.sum().backward()
    assert w2a.grad.abs().sum() > 0  # the zero factor still learns


def test_rank_dropout_mask_is_lycoris():
    """LyCORIS LohaModule: drop = (rand(out) > p); with rank_dropout_scale drop /= drop.mean(); else as it is."""
    torch.manual_seed(0)
    masks = torch.stack([LF.rank_dropout_scale(64, 0.25, "cpu") for _ in range(4000)])
    assert masks.unique().tolist() == [0.0, 1.0]  # LyCORIS's default: no rescale
    assert (masks == 0).double().mean().item() == pytest.approx(0.25, abs=0.01)
    torch.manual_seed(1)
    scaled = LF.rank_dropout_scale(64, 0.25, "cpu", rescale=True)
    torch.manual_seed(1)
    drop = (torch.rand(64) > 0.25).float()
    torch.testing.assert_close(scaled, drop / drop.mean())
