"""Fused base + LoHa layers: one autograd node per layer, the rank-r^2 path, factor gradients in closed form."""

# Each Function computes base(x) + x DeltaW^T (or the conv analogue) without ever forming DeltaW: the adapter
# runs through r^2 channels, U = KR(w1_a, w2_a) and V = KR(w1_b, w2_b) (row/column-wise Khatri-Rao products; U is
# held transposed, see below). Products go through gemm.mm (oneDNN on CPU), except the frozen forward product.
# Compared with plain autograd over the same maths this saves the broadcast graph of the Khatri-Rao products
# (a dozen small ops per layer forward and backward), adds the adapter output into the base output in place,
# and accumulates the input gradient into one buffer. Saved for backward: the layer input and the r^2-channel
# intermediates only, never a weight-sized tensor. Autocast is honoured by computing in the autocast dtype
# inside the node (backward re-enters that dtype explicitly, since autocast is off during backward).

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from loha_train.loha import functional as LF
from loha_train.loha.functional import cp_core, khatri_rao_cols
from loha_train.loha.gemm import mm


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the base layer would compute in: the autocast dtype when autocast is on, else x's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _column(row_scale: Tensor) -> Tensor:
    return row_scale.reshape(-1, 1) if row_scale.dim() == 1 else row_scale


# The output-side Khatri-Rao factor is held transposed, Ut = U^T (r^2, out), built from (r, out) rows: the
# column-wise product of contiguous rows costs a fifth of the row-wise one of (out, r) factors, and its gradient
# reduces over a leading dimension (mul + sum) instead of running thousands of tiny batched matmuls.


def _out_rows(w1a: Tensor, w2a: Tensor, row_scale: Tensor, plain: bool) -> tuple[Tensor, Tensor]:
    """w1_a, w2_a as contiguous (r, out) rows, the first times the per-output scale (plain LoHa stores (out, r))."""
    if plain:
        return (w1a * _column(row_scale)).T.contiguous(), w2a.T.contiguous()
    return w1a * row_scale, w2a


def _factors(
    w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, row_scale: Tensor, dt: torch.dtype, plain: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(Ut (r^2, out) with the row scale, V (r^2, in), in the compute dtype; the two (r, out) rows Ut came from)."""
    a1, a2 = _out_rows(w1a, w2a, row_scale, plain)
    return khatri_rao_cols(a1, a2).to(dt), khatri_rao_cols(w1b, w2b).to(dt), a1, a2


def _kr_cols_grad(grad: Tensor, b: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of KR_cols(b, d) = [b_i * d_j] (r*s, m) given grad (r*s, m), in the factors' dtype."""
    g3 = grad.to(b.dtype).reshape(b.shape[0], d.shape[0], b.shape[1])
    return (g3 * d.unsqueeze(0)).sum(1), (g3 * b.unsqueeze(1)).sum(0)


def _out_grads(grad_ut: Tensor, a1: Tensor, a2: Tensor, row_scale: Tensor, plain: bool) -> tuple[Tensor, Tensor]:
    """Gradients of w1_a, w2_a (in their stored layout) from the gradient of Ut = KR_cols(a1, a2)."""
    g1, g2 = _kr_cols_grad(grad_ut, a1, a2)
    if plain:
        return g1.T * _column(row_scale), g2.T
    return g1 * row_scale, g2


def _cp_core_grad(grad: Tensor, t1: Tensor, t2: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of cp_core(t1, t2)[(i,a), (j,b)] = t1[i, j] * t2[a, b] (per kernel position)."""
    r1, r2 = t1.shape[0], t2.shape[0]
    g6 = grad.reshape(r1, r2, t1.shape[1], t2.shape[1], *t1.shape[2:])
    return torch.einsum("iajbkl,abkl->ijkl", g6, t2), torch.einsum("iajbkl,ijkl->abkl", g6, t1)


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast off for the block (the node already picked its dtype); free when autocast is off anyway."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class FusedLoHaLinear(torch.autograd.Function):
    """y = x W^T + b + (x V^T) Ut, Ut = KR(w1a^T, w2a^T) * row_scale, V = KR(w1b, w2b)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, w1a: Tensor, w1b: Tensor, w2a: Tensor,
        w2b: Tensor, row_scale: Tensor,
    ) -> Tensor:  # fmt: skip
        dt = compute_dtype(x)
        with _no_autocast(x.device.type):
            x2 = x.reshape(-1, x.shape[-1]).to(dt)
            ut, v, _, _ = _factors(w1a, w1b, w2a, w2b, row_scale, dt, plain=True)
            h = mm(x2, v.T)
            # the frozen product on the unwrapped layer's own op: a zero delta stays bit-identical to it
            w = weight.to(dt)
            y = torch.addmm(bias.to(dt), x2, w.T) if bias is not None else x2 @ w.T
            y.add_(mm(h, ut))
        ctx.save_for_backward(x2, h, weight, w1a, w1b, w2a, w2b, row_scale)
        ctx.dt, ctx.x_shape, ctx.x_dtype = dt, x.shape, x.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x2, h, weight, w1a, w1b, w2a, w2b, row_scale = ctx.saved_tensors
        dt = ctx.dt
        with _no_autocast(grad.device.type):
            g2 = grad.reshape(-1, weight.shape[0]).to(dt)
            ut, v, a1, a2 = _factors(w1a, w1b, w2a, w2b, row_scale, dt, plain=True)
            gh = mm(g2, ut.T)
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = mm(g2, weight.to(dt)).add_(mm(gh, v)).reshape(ctx.x_shape).to(ctx.x_dtype)
            grad_w1a, grad_w2a = _out_grads(mm(h.T, g2), a1, a2, row_scale, plain=True)
            grad_w1b, grad_w2b = _kr_cols_grad(mm(gh.T, x2), w1b, w2b)
        return grad_x, None, None, grad_w1a, grad_w1b, grad_w2a, grad_w2b, None


def _conv_args(conv: Any) -> tuple[list[int], list[int], list[int]]:
    return list(conv.stride), list(conv.padding), list(conv.dilation)


def _conv_input_grad(grad: Tensor, x: Tensor, weight: Tensor, args: tuple[list[int], ...]) -> Tensor:
    stride, padding, dilation = args
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None, stride, padding, dilation, False, [0, 0], 1, [True, False, False]
    )[0]


def _conv_grads(grad: Tensor, x: Tensor, weight: Tensor, args: tuple[list[int], ...], need_x: bool) -> tuple:
    stride, padding, dilation = args
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad, x, weight, None, stride, padding, dilation, False, [0, 0], 1, [need_x, True, False]
    )
    return grad_x, grad_w


def _pointwise(m: Tensor, h: Tensor) -> Tensor:
    """A 1x1 conv as a matmul: m (out, c), h (B, c, H, W) -> (B, out, H, W)."""
    b, c, hh, ww = h.shape
    if b == 1:  # one GEMM, no broadcast batch (the common case: batch 1 per process)
        return mm(m, h.reshape(c, hh * ww)).reshape(1, m.shape[0], hh, ww)
    return torch.matmul(m, h.reshape(b, c, hh * ww)).reshape(b, m.shape[0], hh, ww)


def _pointwise_weight_grad(g: Tensor, h: Tensor) -> Tensor:
    """Gradient of the 1x1 conv's matrix: sum over batch and pixels of g (B, out, .) h (B, c, .)^T -> (out, c)."""
    b = g.shape[0]
    if b == 1:
        return mm(g.reshape(g.shape[1], -1), h.reshape(h.shape[1], -1).T)
    return torch.einsum("bon,bcn->oc", g.reshape(b, g.shape[1], -1), h.reshape(b, h.shape[1], -1))


def is_pointwise(conv_weight: Tensor, args: tuple[list[int], list[int], list[int]]) -> bool:
    """A 1x1 conv with stride 1, no padding and no dilation: a matmul over channels."""
    stride, padding, dilation = args
    return conv_weight.shape[2:] == (1, 1) and stride == [1, 1] and padding == [0, 0] and dilation == [1, 1]


class FusedLoHaPointwise(torch.autograd.Function):
    """A 1x1 LoHa conv (stride 1, no padding): y = conv(x, W) + b + Ut^T (V x), the adapter part as matmuls."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, w1a: Tensor, w1b: Tensor, w2a: Tensor,
        w2b: Tensor, row_scale: Tensor,
    ) -> Tensor:  # fmt: skip
        dt = compute_dtype(x)
        with _no_autocast(x.device.type):
            xc = x.to(dt)
            ut, v, _, _ = _factors(w1a, w1b, w2a, w2b, row_scale, dt, plain=True)
            h = _pointwise(v, xc)
            # the base part through the same conv as the unwrapped layer, so a zero delta is bit-identical to it
            y = torch.conv2d(xc, weight.to(dt), None if bias is None else bias.to(dt))
            y.add_(_pointwise(ut.T.contiguous(), h))
        ctx.save_for_backward(xc, h, weight, w1a, w1b, w2a, w2b, row_scale)
        ctx.dt, ctx.x_dtype = dt, x.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        xc, h, weight, w1a, w1b, w2a, w2b, row_scale = ctx.saved_tensors
        dt = ctx.dt
        with _no_autocast(grad.device.type):
            g = grad.to(dt)
            ut, v, a1, a2 = _factors(w1a, w1b, w2a, w2b, row_scale, dt, plain=True)
            gh = _pointwise(ut, g)
            grad_x = None
            if ctx.needs_input_grad[0]:
                base_grad = _conv_input_grad(g, xc, weight.to(dt), ([1, 1], [0, 0], [1, 1]))
                grad_x = base_grad.add_(_pointwise(v.T, gh)).to(ctx.x_dtype)
            grad_w1a, grad_w2a = _out_grads(_pointwise_weight_grad(h, g), a1, a2, row_scale, plain=True)
            grad_w1b, grad_w2b = _kr_cols_grad(_pointwise_weight_grad(gh, xc), w1b, w2b)
        return grad_x, None, None, grad_w1a, grad_w1b, grad_w2a, grad_w2b, None


class FusedLoHaConv(torch.autograd.Function):
    """Plain LoHa conv: y = conv(x, W) + b + Ut^T * conv(x, V4), V4 = KR(w1b, w2b) as (r^2, in, kh, kw)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, w1a: Tensor, w1b: Tensor, w2a: Tensor,
        w2b: Tensor, row_scale: Tensor, args: tuple[list[int], list[int], list[int]],
    ) -> Tensor:  # fmt: skip
        dt = compute_dtype(x)
        stride, padding, dilation = args
        with _no_autocast(x.device.type):
            xc = x.to(dt)
            ut, v, _, _ = _factors(w1a, w1b, w2a, w2b, row_scale, dt, plain=True)
            v4 = v.reshape(ut.shape[0], -1, *weight.shape[2:])
            y = torch.conv2d(xc, weight.to(dt), None if bias is None else bias.to(dt), stride, padding, dilation)
            h = torch.conv2d(xc, v4, None, stride, padding, dilation)
            y.add_(_pointwise(ut.T.contiguous(), h))
        ctx.save_for_backward(xc, h, weight, w1a, w1b, w2a, w2b, row_scale)
        ctx.dt, ctx.args, ctx.x_dtype = dt, args, x.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        xc, h, weight, w1a, w1b, w2a, w2b, row_scale = ctx.saved_tensors
        dt, args = ctx.dt, ctx.args
        need_x = ctx.needs_input_grad[0]
        with _no_autocast(grad.device.type):
            g = grad.to(dt)
            ut, v, a1, a2 = _factors(w1a, w1b, w2a, w2b, row_scale, dt, plain=True)
            v4 = v.reshape(ut.shape[0], -1, *weight.shape[2:])
            gh = _pointwise(ut, g)
            grad_x, grad_v4 = _conv_grads(gh, xc, v4, args, need_x)
            if need_x:
                grad_x = grad_x.add_(_conv_input_grad(g, xc, weight.to(dt), args)).to(ctx.x_dtype)
            grad_w1a, grad_w2a = _out_grads(_pointwise_weight_grad(h, g), a1, a2, row_scale, plain=True)
            grad_w1b, grad_w2b = _kr_cols_grad(grad_v4.reshape(ut.shape[0], -1), w1b, w2b)
        return grad_x, None, None, grad_w1a, grad_w1b, grad_w2a, grad_w2b, None, None


class FusedLoHaConvCP(torch.autograd.Function):
    """CP LoHa conv: y = conv(x, W) + b + A * core(B * x): 1x1 (in -> r^2), k x k core (r^2 -> r^2), 1x1 (-> out)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, t1: Tensor, w1a: Tensor, w1b: Tensor,
        t2: Tensor, w2a: Tensor, w2b: Tensor, row_scale: Tensor, args: tuple[list[int], list[int], list[int]],
    ) -> Tensor:  # fmt: skip
        dt = compute_dtype(x)
        stride, padding, dilation = args
        with _no_autocast(x.device.type):
            xc = x.to(dt)
            at, b, _, _ = _factors(w1a, w1b, w2a, w2b, row_scale, dt, plain=False)
            core = cp_core(t1, t2).to(dt)
            y = torch.conv2d(xc, weight.to(dt), None if bias is None else bias.to(dt), stride, padding, dilation)
            h1 = _pointwise(b, xc)
            h2 = torch.conv2d(h1, core, None, stride, padding, dilation)
            y.add_(_pointwise(at.T.contiguous(), h2))
        ctx.save_for_backward(xc, h1, h2, weight, t1, w1a, w1b, t2, w2a, w2b, row_scale)
        ctx.dt, ctx.args, ctx.x_dtype = dt, args, x.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        xc, h1, h2, weight, t1, w1a, w1b, t2, w2a, w2b, row_scale = ctx.saved_tensors
        dt, args = ctx.dt, ctx.args
        with _no_autocast(grad.device.type):
            g = grad.to(dt)
            at, b, a1, a2 = _factors(w1a, w1b, w2a, w2b, row_scale, dt, plain=False)
            core = cp_core(t1, t2).to(dt)
            gh2 = _pointwise(at, g)
            gh1, grad_core = _conv_grads(gh2, h1, core, args, need_x=True)
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = _pointwise(b.T, gh1)
                grad_x = grad_x.add_(_conv_input_grad(g, xc, weight.to(dt), args)).to(ctx.x_dtype)
            grad_w1a, grad_w2a = _out_grads(_pointwise_weight_grad(h2, g), a1, a2, row_scale, plain=False)
            grad_w1b, grad_w2b = _kr_cols_grad(_pointwise_weight_grad(gh1, xc), w1b, w2b)
            grad_t1, grad_t2 = _cp_core_grad(grad_core.to(t1.dtype), t1, t2)
        return grad_x, None, None, grad_t1, grad_w1a, grad_w1b, grad_t2, grad_w2a, grad_w2b, None, None


# --- The merged form: one op on W + DeltaW ----------------------------------------------------------------------
# When a layer sees many tokens per weight element (small channels, large images, high rank), building DeltaW once
# and running a single GEMM/conv on the merged weight is cheaper than the rank-r^2 path; its backward computes the
# weight-sized gradient g^T x once and projects it onto the factors in closed form. Both weight-sized tensors are
# transient (built in forward, rebuilt in backward), so nothing weight-sized is held between forward and backward.


def _delta_factors(factors: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """The two Hadamard factors of DeltaW (unscaled): plain (out, in_flat) or CP (out, in, kh, kw)."""
    if len(factors) == 6:
        t1, w1a, w1b, t2, w2a, w2b = factors
        return LF.rebuild_cp(t1, w1a, w1b), LF.rebuild_cp(t2, w2a, w2b)
    w1a, w1b, w2a, w2b = factors
    return w1a @ w1b, w2a @ w2b


def _delta_factor_grads(grad_delta: Tensor, factors: tuple[Tensor, ...], f1: Tensor, f2: Tensor) -> tuple:
    """Gradients of every factor from the gradient of f1 * f2 (already multiplied by the row scale)."""
    g1, g2 = grad_delta * f2, grad_delta * f1
    if len(factors) == 6:
        t1, w1a, w1b, t2, w2a, w2b = factors
        return (*LF.cp_factor_grads(g1, t1, w1a, w1b), *LF.cp_factor_grads(g2, t2, w2a, w2b))
    w1a, w1b, w2a, w2b = factors
    return g1 @ w1b.T, w1a.T @ g1, g2 @ w2b.T, w2a.T @ g2


def _row_view(row_scale: Tensor, ndim: int) -> Tensor:
    return row_scale.reshape(-1, *([1] * (ndim - 1))) if row_scale.dim() == 1 else row_scale


class FusedMergedLoHa(torch.autograd.Function):
    """y = op(x, W + DeltaW) + b for a Linear (args None) or Conv2d (args = stride, padding, dilation)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, row_scale: Tensor,
        args: tuple[list[int], list[int], list[int]] | None, *factors: Tensor,
    ) -> Tensor:  # fmt: skip
        dt = compute_dtype(x)
        with _no_autocast(x.device.type):
            merged = _merged_weight(weight, factors, row_scale).to(dt)
            b = None if bias is None else bias.to(dt)
            xc = x.to(dt)
            y = torch.nn.functional.linear(xc, merged, b) if args is None else torch.conv2d(xc, merged, b, *args)
        ctx.save_for_backward(xc, weight, row_scale, *factors)
        ctx.dt, ctx.args, ctx.x_dtype = dt, args, x.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        xc, weight, row_scale, *factors = ctx.saved_tensors
        factors = tuple(factors)
        dt, args = ctx.dt, ctx.args
        need_x = ctx.needs_input_grad[0]
        with _no_autocast(grad.device.type):
            f1, f2 = _delta_factors(factors)
            scale = _row_view(row_scale, f1.dim())
            merged = (weight.to(f1.dtype) + (f1 * f2 * scale).reshape(weight.shape)).to(dt)
            g = grad.to(dt)
            if args is None:
                g2, x2 = g.reshape(-1, weight.shape[0]), xc.reshape(-1, weight.shape[1])
                grad_x = (g2 @ merged).reshape(xc.shape) if need_x else None
                grad_w = g2.T @ x2
            else:
                stride, padding, dilation = args
                grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                    g, xc, merged, None, stride, padding, dilation, False, [0, 0], 1, [need_x, True, False]
                )
            grad_delta = grad_w.to(f1.dtype).reshape(f1.shape) * scale
            factor_grads = _delta_factor_grads(grad_delta, factors, f1, f2)
        grad_x = grad_x.to(ctx.x_dtype) if grad_x is not None else None
        return (grad_x, None, None, None, None, *factor_grads)


def _merged_weight(weight: Tensor, factors: tuple[Tensor, ...], row_scale: Tensor) -> Tensor:
    f1, f2 = _delta_factors(factors)
    return weight.to(f1.dtype) + (f1 * f2 * _row_view(row_scale, f1.dim())).reshape(weight.shape)
