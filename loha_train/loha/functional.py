"""Pure LoHa maths: delta weights (plain and CP), their recomputing autograd, the factored forward, masks, init."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Shapes (out = output features/channels, in = input features/channels, r = rank, k = kernel size):
#   plain  w1_a, w2_a: (out, r)   w1_b, w2_b: (r, in * kh * kw)
#   CP     w1_a, w2_a: (r, out)   w1_b, w2_b: (r, in)   t1, t2: (r, r, kh, kw)
# DeltaW = (w1_a @ w1_b) * (w2_a @ w2_b) * scale, each CP factor rebuilt as einsum("ijkl,jq,ip->pqkl").


class _HadaWeight(torch.autograd.Function):
    """(w1_a @ w1_b) * (w2_a @ w2_b) * scale, saving only the factors and recomputing products in backward."""

    @staticmethod
    def forward(ctx, w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(w1a, w1b, w2a, w2b, scale)
        return (w1a @ w1b) * (w2a @ w2b) * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        w1a, w1b, w2a, w2b, scale = ctx.saved_tensors
        grad = grad * scale
        g1 = grad * (w2a @ w2b)  # d/d(w1a @ w1b)
        grad_w1a, grad_w1b = g1 @ w1b.T, w1a.T @ g1
        del g1
        g2 = grad * (w1a @ w1b)
        return grad_w1a, grad_w1b, g2 @ w2b.T, w2a.T @ g2, None


def rebuild_cp(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """One CP factor: t (r, r, kh, kw), wa (r, out), wb (r, in) -> (out, in, kh, kw)."""
    return torch.einsum("ijkl,jq,ip->pqkl", t, wb, wa)


class _HadaWeightCP(torch.autograd.Function):
    """rebuild_cp(t1, w1a, w1b) * rebuild_cp(t2, w2a, w2b) * scale, recomputing the factors in backward."""

    @staticmethod
    def forward(
        ctx, t1: Tensor, w1a: Tensor, w1b: Tensor, t2: Tensor, w2a: Tensor, w2b: Tensor, scale: Tensor
    ) -> Tensor:
        ctx.save_for_backward(t1, w1a, w1b, t2, w2a, w2b, scale)
        return rebuild_cp(t1, w1a, w1b) * rebuild_cp(t2, w2a, w2b) * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        t1, w1a, w1b, t2, w2a, w2b, scale = ctx.saved_tensors
        grad = grad * scale
        grads_1 = cp_factor_grads(grad * rebuild_cp(t2, w2a, w2b), t1, w1a, w1b)
        grads_2 = cp_factor_grads(grad * rebuild_cp(t1, w1a, w1b), t2, w2a, w2b)
        return (*grads_1, *grads_2, None)


def cp_factor_grads(g: Tensor, t: Tensor, wa: Tensor, wb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of <g, rebuild_cp(t, wa, wb)> with respect to t, wa and wb; g is (out, in, kh, kw)."""
    g_a = torch.einsum("pqkl,ip->iqkl", g, wa)  # contract out with wa: (r, in, kh, kw)
    grad_t = torch.einsum("iqkl,jq->ijkl", g_a, wb)
    grad_wb = torch.einsum("iqkl,ijkl->jq", g_a, t)
    g_b = torch.einsum("pqkl,jq->pjkl", g, wb)  # contract in with wb: (out, r, kh, kw)
    grad_wa = torch.einsum("pjkl,ijkl->ip", g_b, t)
    return grad_t, grad_wa, grad_wb


def delta_weight(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, scale: float | Tensor) -> Tensor:
    """Plain LoHa delta: w1a, w2a (out, r); w1b, w2b (r, in_flat) -> (out, in_flat)."""
    return _HadaWeight.apply(w1a, w1b, w2a, w2b, _as_tensor(scale, w1a))


def delta_weight_cp(
    t1: Tensor, w1a: Tensor, w1b: Tensor, t2: Tensor, w2a: Tensor, w2b: Tensor, scale: float | Tensor
) -> Tensor:
    """CP LoHa delta: t (r, r, kh, kw), wa (r, out), wb (r, in) -> (out, in, kh, kw)."""
    return _HadaWeightCP.apply(t1, w1a, w1b, t2, w2a, w2b, _as_tensor(scale, w1a))


def _as_tensor(scale: float | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(scale, dtype=like.dtype, device=like.device)


# --- The factored (rank r^2) form used in training -------------------------------------------------------------
# (A B) * (C D) = U V with U[p, i*r+j] = A[p, i] C[p, j] and V[i*r+j, q] = B[i, q] D[j, q], so x DeltaW^T =
# (x V^T) U^T costs O(tokens * r^2 * (in + out)) and never materialises a weight-sized tensor.


def khatri_rao_rows(a: Tensor, c: Tensor) -> Tensor:
    """Row-wise Khatri-Rao product: a (n, r), c (n, s) -> (n, r * s) with [p, i*s+j] = a[p, i] * c[p, j]."""
    return (a.unsqueeze(2) * c.unsqueeze(1)).reshape(a.shape[0], -1)


def khatri_rao_cols(b: Tensor, d: Tensor) -> Tensor:
    """Column-wise Khatri-Rao product: b (r, m), d (s, m) -> (r * s, m) with [i*s+j, q] = b[i, q] * d[j, q]."""
    return (b.unsqueeze(1) * d.unsqueeze(0)).reshape(-1, b.shape[1])


def cp_core(t1: Tensor, t2: Tensor) -> Tensor:
    """The r^2 x r^2 spatial core of a CP LoHa conv: t (r, r, kh, kw) -> (r*r, r*r, kh, kw)."""
    r1, r2 = t1.shape[0] * t2.shape[0], t1.shape[1] * t2.shape[1]
    return torch.einsum("ijkl,abkl->iajbkl", t1, t2).reshape(r1, r2, *t1.shape[2:])


def factored_linear(x: Tensor, w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, row_scale: Tensor | float) -> Tensor:
    """x (..., in) -> x DeltaW^T (..., out); row_scale (out,) or scalar holds scale, multiplier and rank dropout."""
    u = khatri_rao_rows(w1a, w2a) * _column(row_scale, 2)
    v = khatri_rao_cols(w1b, w2b)
    return F.linear(F.linear(x, v.to(x.dtype)), u.to(x.dtype))


def factored_conv(
    x: Tensor,
    w1a: Tensor,
    w1b: Tensor,
    w2a: Tensor,
    w2b: Tensor,
    row_scale: Tensor | float,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] | int = 1,
    padding: tuple[int, int] | int | str = 0,
    dilation: tuple[int, int] | int = 1,
) -> Tensor:
    """conv(x, DeltaW) for the plain form: w1b, w2b (r, in * kh * kw); a k x k conv to r^2 channels, then 1x1."""
    u = khatri_rao_rows(w1a, w2a) * _column(row_scale, 2)
    v = khatri_rao_cols(w1b, w2b).reshape(u.shape[1], -1, *kernel_size)
    h = F.conv2d(x, v.to(x.dtype), None, stride, padding, dilation)
    return F.conv2d(h, u.to(x.dtype)[:, :, None, None])


def factored_conv_cp(
    x: Tensor,
    t1: Tensor,
    w1a: Tensor,
    w1b: Tensor,
    t2: Tensor,
    w2a: Tensor,
    w2b: Tensor,
    row_scale: Tensor | float,
    stride: tuple[int, int] | int = 1,
    padding: tuple[int, int] | int | str = 0,
    dilation: tuple[int, int] | int = 1,
) -> Tensor:
    """conv(x, DeltaW) for the CP form: 1x1 (in -> r^2), k x k core (r^2 -> r^2), 1x1 (r^2 -> out).

    The 1x1 convs have no bias, so they commute with zero padding; stride and dilation belong to the core.
    """
    a = khatri_rao_rows(w1a.T, w2a.T) * _column(row_scale, 2)  # (out, r^2)
    b = khatri_rao_cols(w1b, w2b)  # (r^2, in)
    core = cp_core(t1, t2)
    h = F.conv2d(x, b.to(x.dtype)[:, :, None, None])
    h = F.conv2d(h, core.to(x.dtype), None, stride, padding, dilation)
    return F.conv2d(h, a.to(x.dtype)[:, :, None, None])


def _column(row_scale: Tensor | float, ndim: int) -> Tensor | float:
    if isinstance(row_scale, Tensor) and row_scale.dim() == 1:
        return row_scale.reshape(-1, *([1] * (ndim - 1)))
    return row_scale


# --- DoRA (weight decomposition, LyCORIS's dora_wd) --------------------------------------------------------------
# W' = (W + DeltaW) * (multiplier * (m / ||W + DeltaW|| - 1) + 1), the norm taken per output row (wd_on_output) or
# per input column over every other dimension; m (`dora_scale`) starts as that norm of the base weight, so an
# untrained adapter still reproduces the base model. Shapes: m is (out, 1, ...) or (1, in, 1, ...).


def weight_norm(weight: Tensor, wd_on_output: bool) -> Tensor:
    """||weight|| per output row (out, 1, ...) or per input column (1, in, 1, ...), over all other dimensions."""
    ones = [1] * (weight.dim() - 1)
    if wd_on_output:
        return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *ones)
    cols = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return cols.reshape(weight.shape[1], *ones).transpose(0, 1)


def dora_scale_init(weight: Tensor, wd_on_output: bool) -> Tensor:
    """The magnitude vector m of an untrained DoRA adapter: the base weight's norm, float32."""
    return weight_norm(weight.detach().float(), wd_on_output)


def dora_factor(weight: Tensor, dora_scale: Tensor, multiplier: float, wd_on_output: bool) -> Tensor:
    """multiplier * (m / ||W + DeltaW|| - 1) + 1 in dora_scale's shape, from the merged weight W + DeltaW; float32.

    W' is the merged weight times this factor, a scale per output row or per input column, so a layer can also
    apply it to its output (rows) or its input (columns) instead of building W'.
    """
    weight = weight.to(dora_scale.dtype)
    scale = dora_scale / (weight_norm(weight, wd_on_output) + torch.finfo(weight.dtype).eps)
    return multiplier * (scale - 1) + 1 if multiplier != 1 else scale


def weight_decompose(weight: Tensor, dora_scale: Tensor, multiplier: float, wd_on_output: bool) -> Tensor:
    """W' from the merged weight W + DeltaW (any shape) and m; float32 like m, a float32 epsilon on the norm."""
    return weight.to(dora_scale.dtype) * dora_factor(weight, dora_scale, multiplier, wd_on_output)


# --- Dropout and initialisation ---------------------------------------------------------------------------------


def rank_dropout_scale(out_features: int, p: float, device: torch.device | str, rescale: bool = False) -> Tensor:
    """A per-output-row keep mask for rank dropout, as LyCORIS's LohaModule draws it.

    Rows of DeltaW are dropped with probability p. With `rescale` (LyCORIS's rank_dropout_scale) the kept rows are
    divided by the fraction actually kept (`drop /= drop.mean()`), so the delta's overall size is kept; without
    (LyCORIS's default) they are not. Draws from the global RNG so activation checkpointing (which restores the RNG
    state) recomputes the same mask.
    """
    keep = (torch.rand(out_features, device=device) > p).to(torch.float32)
    return keep / keep.mean().clamp_min(1.0 / out_features) if rescale else keep


@torch.no_grad()
def init_loha_(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, *cores: Tensor) -> None:
    """LyCORIS's initialisation: w1_b, w2_b ~ N(0, 1), w1_a ~ N(0, 0.1), cores ~ N(0, 0.1), w2_a = 0.

    The zero w2_a makes DeltaW exactly zero, so an untrained adapter reproduces the base model bit for bit,
    while every factor still receives a gradient through the other pair.
    """
    torch.nn.init.normal_(w1b, std=1.0)
    torch.nn.init.normal_(w2b, std=1.0)
    torch.nn.init.normal_(w1a, std=0.1)
    torch.nn.init.zeros_(w2a)
    for core in cores:
        torch.nn.init.normal_(core, std=0.1)
