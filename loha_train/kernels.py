"""Fused base + LoHa layers: one autograd node per layer, the rank-r^2 path, factor gradients in closed form."""

# Each Function computes base(x) + x DeltaW^T (or the conv analogue) without ever forming DeltaW: the adapter
# runs through r^2 channels, U = KR(w1_a, w2_a) and V = KR(w1_b, w2_b) (row/column-wise Khatri-Rao products).
# Compared with plain autograd over the same maths this saves the broadcast graph of the Khatri-Rao products
# (a dozen small ops per layer forward and backward), adds the adapter output into the base output in place,
# and accumulates the input gradient into one buffer. Saved for backward: the layer input and the r^2-channel
# intermediates only, never a weight-sized tensor. Autocast is honoured by computing in the autocast dtype
# inside the node (backward re-enters that dtype explicitly, since autocast is off during backward).

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import functional as LF
from .functional import cp_core, khatri_rao_cols, khatri_rao_rows


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the base layer would compute in: the autocast dtype when autocast is on, else x's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _column(row_scale: Tensor) -> Tensor:
    return row_scale.reshape(-1, 1) if row_scale.dim() == 1 else row_scale


def _kr_rows_grad(grad: Tensor, a: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of KR_rows(a, c) = [a_i * c_j] (n, r*s) given grad (n, r*s)."""
    g3 = grad.reshape(a.shape[0], a.shape[1], c.shape[1])
    return torch.einsum("pij,pj->pi", g3, c), torch.einsum("pij,pi->pj", g3, a)


def _kr_cols_grad(grad: Tensor, b: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of KR_cols(b, d) = [b_i * d_j] (r*s, m) given grad (r*s, m)."""
    g3 = grad.reshape(b.shape[0], d.shape[0], b.shape[1])
    return torch.einsum("ijq,jq->iq", g3, d), torch.einsum("ijq,iq->jq", g3, b)


def _cp_core_grad(grad: Tensor, t1: Tensor, t2: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of cp_core(t1, t2)[(i,a), (j,b)] = t1[i, j] * t2[a, b] (per kernel position)."""
    r1, r2 = t1.shape[0], t2.shape[0]
    g6 = grad.reshape(r1, r2, t1.shape[1], t2.shape[1], *t1.shape[2:])
    return torch.einsum("iajbkl,abkl->ijkl", g6, t2), torch.einsum("iajbkl,ijkl->abkl", g6, t1)


def _plain_uv(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, scale: Tensor, dt: torch.dtype) -> tuple:
    """The rank-r^2 pair of the plain form in the compute dtype: U (out, r^2) with the row scale, V (r^2, in)."""
    return (khatri_rao_rows(w1a, w2a) * scale).to(dt), khatri_rao_cols(w1b, w2b).to(dt)


class _NoAutocast:
    """Run a block with autocast off for x's device (the node already picked its dtype)."""

    def __init__(self, device_type: str) -> None:
        self._ctx = torch.autocast(device_type=device_type, enabled=False)

    def __enter__(self) -> None:
        self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


class FusedLoHaLinear(torch.autograd.Function):
    """y = x W^T + b + ((x V^T) U^T), U = KR(w1a, w2a) * row_scale, V = KR(w1b, w2b)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, w1a: Tensor, w1b: Tensor, w2a: Tensor,
        w2b: Tensor, row_scale: Tensor,
    ) -> Tensor:  # fmt: skip
        dt = compute_dtype(x)
        with _NoAutocast(x.device.type):
            x2 = x.reshape(-1, x.shape[-1]).to(dt)
            u, v = _plain_uv(w1a, w1b, w2a, w2b, _column(row_scale), dt)
            w = weight.to(dt)
            h = x2 @ v.T
            y = torch.addmm(bias.to(dt), x2, w.T) if bias is not None else x2 @ w.T
            y.addmm_(h, u.T)
        ctx.save_for_backward(x2, h, weight, w1a, w1b, w2a, w2b, row_scale)
        ctx.dt, ctx.x_shape, ctx.x_dtype = dt, x.shape, x.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x2, h, weight, w1a, w1b, w2a, w2b, row_scale = ctx.saved_tensors
        dt = ctx.dt
        with _NoAutocast(grad.device.type):
            g2 = grad.reshape(-1, weight.shape[0]).to(dt)
            scale = _column(row_scale)
            u, v = _plain_uv(w1a, w1b, w2a, w2b, scale, dt)
            gh = g2 @ u
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = (g2 @ weight.to(dt)).addmm_(gh, v).reshape(ctx.x_shape).to(ctx.x_dtype)
            grad_w1a, grad_w2a = _kr_rows_grad((g2.T @ h).to(w1a.dtype) * scale, w1a, w2a)
            grad_w1b, grad_w2b = _kr_cols_grad((gh.T @ x2).to(w1b.dtype), w1b, w2b)
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
        return (m @ h.reshape(c, hh * ww)).reshape(1, m.shape[0], hh, ww)
    return torch.matmul(m, h.reshape(b, c, hh * ww)).reshape(b, m.shape[0], hh, ww)


def _pointwise_weight_grad(g: Tensor, h: Tensor) -> Tensor:
    """Gradient of the 1x1 conv's matrix: sum over batch and pixels of g (B, out, .) h (B, c, .)^T -> (out, c)."""
    b = g.shape[0]
    if b == 1:
        return g.reshape(g.shape[1], -1) @ h.reshape(h.shape[1], -1).T
    return torch.einsum("bon,bcn->oc", g.reshape(b, g.shape[1], -1), h.reshape(b, h.shape[1], -1))


def is_pointwise(conv_weight: Tensor, args: tuple[list[int], list[int], list[int]]) -> bool:
    """A 1x1 conv with stride 1, no padding and no dilation: a matmul over channels."""
    stride, padding, dilation = args
    return conv_weight.shape[2:] == (1, 1) and stride == [1, 1] and padding == [0, 0] and dilation == [1, 1]


class FusedLoHaPointwise(torch.autograd.Function):
    """A 1x1 LoHa conv (stride 1, no padding): y = conv(x, W) + b + U (V x), the adapter part as matmuls."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, w1a: Tensor, w1b: Tensor, w2a: Tensor,
        w2b: Tensor, row_scale: Tensor,
    ) -> Tensor:  # fmt: skip
        dt = compute_dtype(x)
        with _NoAutocast(x.device.type):
            xc = x.to(dt)
            u, v = _plain_uv(w1a, w1b, w2a, w2b, _column(row_scale), dt)
            h = _pointwise(v, xc)
            # the base part through the same conv as the unwrapped layer, so a zero delta is bit-identical to it
            y = torch.conv2d(xc, weight.to(dt), None if bias is None else bias.to(dt))
            y.add_(_pointwise(u, h))
        ctx.save_for_backward(xc, h, weight, w1a, w1b, w2a, w2b, row_scale)
        ctx.dt, ctx.x_dtype = dt, x.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        xc, h, weight, w1a, w1b, w2a, w2b, row_scale = ctx.saved_tensors
        dt = ctx.dt
        with _NoAutocast(grad.device.type):
            g = grad.to(dt)
            scale = _column(row_scale)
            u, v = _plain_uv(w1a, w1b, w2a, w2b, scale, dt)
            gh = _pointwise(u.T, g)
            grad_x = None
            if ctx.needs_input_grad[0]:
                base_grad = _conv_input_grad(g, xc, weight.to(dt), ([1, 1], [0, 0], [1, 1]))
                grad_x = base_grad.add_(_pointwise(v.T, gh)).to(ctx.x_dtype)
            grad_w1a, grad_w2a = _kr_rows_grad(_pointwise_weight_grad(g, h).to(w1a.dtype) * scale, w1a, w2a)
            grad_w1b, grad_w2b = _kr_cols_grad(_pointwise_weight_grad(gh, xc).to(w1b.dtype), w1b, w2b)
        return grad_x, None, None, grad_w1a, grad_w1b, grad_w2a, grad_w2b, None


class FusedLoHaConv(torch.autograd.Function):
    """Plain LoHa conv: y = conv(x, W) + b + U * conv(x, V4), V4 = KR(w1b, w2b) as (r^2, in, kh, kw), U 1x1."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, w1a: Tensor, w1b: Tensor, w2a: Tensor,
        w2b: Tensor, row_scale: Tensor, args: tuple[list[int], list[int], list[int]],
    ) -> Tensor:  # fmt: skip
        dt = compute_dtype(x)
        stride, padding, dilation = args
        with _NoAutocast(x.device.type):
            xc = x.to(dt)
            u, v = _plain_uv(w1a, w1b, w2a, w2b, _column(row_scale), dt)
            v4 = v.reshape(u.shape[1], -1, *weight.shape[2:])
            y = torch.conv2d(xc, weight.to(dt), None if bias is None else bias.to(dt), stride, padding, dilation)
            h = torch.conv2d(xc, v4, None, stride, padding, dilation)
            y.add_(_pointwise(u, h))
        ctx.save_for_backward(xc, h, weight, w1a, w1b, w2a, w2b, row_scale)
        ctx.dt, ctx.args, ctx.x_dtype = dt, args, x.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        xc, h, weight, w1a, w1b, w2a, w2b, row_scale = ctx.saved_tensors
        dt, args = ctx.dt, ctx.args
        need_x = ctx.needs_input_grad[0]
        with _NoAutocast(grad.device.type):
            g = grad.to(dt)
            scale = _column(row_scale)
            u, v = _plain_uv(w1a, w1b, w2a, w2b, scale, dt)
            v4 = v.reshape(u.shape[1], -1, *weight.shape[2:])
            gh = _pointwise(u.T, g)
            grad_x, grad_v4 = _conv_grads(gh, xc, v4, args, need_x)
            if need_x:
                grad_x = grad_x.add_(_conv_input_grad(g, xc, weight.to(dt), args)).to(ctx.x_dtype)
            grad_w1a, grad_w2a = _kr_rows_grad(_pointwise_weight_grad(g, h).to(w1a.dtype) * scale, w1a, w2a)
            grad_w1b, grad_w2b = _kr_cols_grad(grad_v4.reshape(u.shape[1], -1).to(w1b.dtype), w1b, w2b)
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
        with _NoAutocast(x.device.type):
            xc = x.to(dt)
            a = (khatri_rao_rows(w1a.T, w2a.T) * _column(row_scale)).to(dt)
            b = khatri_rao_cols(w1b, w2b).to(dt)
            core = cp_core(t1, t2).to(dt)
            y = torch.conv2d(xc, weight.to(dt), None if bias is None else bias.to(dt), stride, padding, dilation)
            h1 = _pointwise(b, xc)
            h2 = torch.conv2d(h1, core, None, stride, padding, dilation)
            y.add_(_pointwise(a, h2))
        ctx.save_for_backward(xc, h1, h2, weight, t1, w1a, w1b, t2, w2a, w2b, row_scale)
        ctx.dt, ctx.args, ctx.x_dtype = dt, args, x.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        xc, h1, h2, weight, t1, w1a, w1b, t2, w2a, w2b, row_scale = ctx.saved_tensors
        dt, args = ctx.dt, ctx.args
        with _NoAutocast(grad.device.type):
            g = grad.to(dt)
            scale = _column(row_scale)
            a = (khatri_rao_rows(w1a.T, w2a.T) * scale).to(dt)
            b = khatri_rao_cols(w1b, w2b).to(dt)
            core = cp_core(t1, t2).to(dt)
            gh2 = _pointwise(a.T, g)
            gh1, grad_core = _conv_grads(gh2, h1, core, args, need_x=True)
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = _pointwise(b.T, gh1)
                grad_x = grad_x.add_(_conv_input_grad(g, xc, weight.to(dt), args)).to(ctx.x_dtype)
            ga1, ga2 = _kr_rows_grad(_pointwise_weight_grad(g, h2).to(w1a.dtype) * scale, w1a.T, w2a.T)
            grad_w1b, grad_w2b = _kr_cols_grad(_pointwise_weight_grad(gh1, xc).to(w1b.dtype), w1b, w2b)
            grad_t1, grad_t2 = _cp_core_grad(grad_core.to(t1.dtype), t1, t2)
        return grad_x, None, None, grad_t1, ga1.T, grad_w1b, grad_t2, ga2.T, grad_w2b, None, None


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
        with _NoAutocast(x.device.type):
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
        with _NoAutocast(grad.device.type):
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
