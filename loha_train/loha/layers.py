"""LoHa wrappers around frozen nn.Linear / nn.Conv2d layers, with on-disk parameter names and merge."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loha_train.loha import functional as LF
from loha_train.loha.kernels import (
    FusedLoHaConv,
    FusedLoHaConvCP,
    FusedLoHaLinear,
    FusedLoHaPointwise,
    FusedMergedLoHa,
    is_pointwise,
)

ADAPTER_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale")


class LoHaModule(nn.Module):
    """A frozen base layer plus a LoHa delta; forward is base(x) + multiplier * x DeltaW in factored form.

    Parameters carry the on-disk names (hada_w1_a ... hada_t2) and `alpha` is a 0-dim buffer, so the
    module's own state is exactly what a LyCORIS file holds for it, minus the key prefix.

    With `weight_decompose` (DoRA, LyCORIS's dora_wd) the module also trains `dora_scale`, a magnitude per output
    row (`wd_on_output`, LyCORIS's default) or per input column, and its forward is one op on the decomposed weight
    W' = (W + DeltaW) * (multiplier * (m / ||W + DeltaW|| - 1) + 1), as LyCORIS's LohaModule computes it. The norm
    needs the merged weight, built from the factors once per call; W' itself never is (see dora_forward).
    """

    hada_w1_a: nn.Parameter
    hada_w1_b: nn.Parameter
    hada_w2_a: nn.Parameter
    hada_w2_b: nn.Parameter
    alpha: Tensor

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        *,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        multiplier: float = 1.0,
        rank_dropout_scale: bool = False,
        weight_decompose: bool = False,
        wd_on_output: bool = True,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoHa rank must be >= 1, got {rank}")
        if alpha == 0:
            raise ValueError("LoHa alpha must be non-zero (WebUI and ComfyUI zero the adapter when alpha is 0)")
        base.requires_grad_(False)
        self.base = base
        self.rank = rank
        self.rank_dropout = rank_dropout
        self.rank_dropout_scale = rank_dropout_scale
        self.module_dropout = module_dropout
        self.multiplier = multiplier
        self.merged = False
        self.register_buffer("alpha", torch.tensor(float(alpha), dtype=torch.float32))
        self.weight_decompose = weight_decompose
        self.wd_on_output = wd_on_output
        self._unmerged_weight: Tensor | None = None  # DoRA's merge is not additive: the weight to restore
        if weight_decompose:
            self.dora_scale = nn.Parameter(LF.dora_scale_init(base.weight, wd_on_output))

    # Subclasses define the factor shapes, delta_weight() and adapter_forward().
    @property
    def use_cp(self) -> bool:
        return False

    @property
    def scale(self) -> float:
        """alpha / rank, applied once."""
        return float(self.alpha) / self.rank

    def _scale_t(self) -> Tensor:
        return self.alpha / self.rank

    @property
    def out_features(self) -> int:
        return int(self.base.weight.shape[0])

    def _make_factors(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], device: torch.device) -> None:
        for name, shape in (("hada_w1_a", a_shape), ("hada_w1_b", b_shape)):
            setattr(self, name, nn.Parameter(torch.empty(shape, device=device)))
            setattr(self, name.replace("w1", "w2"), nn.Parameter(torch.empty(shape, device=device)))

    # The fused single-node kernels (kernels.py) are the default; the plain-autograd path (adapter_forward) is the
    # reference they are tested against, the fallback when the base weight itself is trained, and the path under
    # torch.compile (train.compile), whose compiler traces and fuses plain ops but not our autograd nodes. `path` picks
    # the fused kernel: "auto" compares the multiply-adds of the rank-r^2 path and the merged-weight path for the
    # shapes and token count of each call; "factored" and "merged" force one (tests, benchmarks).
    fused: bool = True
    path: str = "auto"

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.multiplier == 0:
            return self.base(x)
        if self.training and self.module_dropout > 0 and float(torch.rand(())) < self.module_dropout:
            return self.base(x)
        if self.weight_decompose:
            return self.dora_forward(x)
        row_scale = self._row_scale(x.device)
        if self.fused and not self.base.weight.requires_grad and self._fusable() and not torch.compiler.is_compiling():
            return self.fused_forward(x, row_scale)
        return self.base(x) + self.adapter_forward(x, row_scale)

    def _fusable(self) -> bool:
        return True

    def dora_weight(self) -> Tensor:
        """DoRA's decomposed weight W' in the base weight's shape and dtype (no dropout: for merging)."""
        w = self.base.weight
        merged = w.float() + self.delta_weight().float()
        return LF.weight_decompose(merged, self.dora_scale, self.multiplier, self.wd_on_output).to(w.dtype)

    def dora_forward(self, x: Tensor) -> Tensor:
        """op(x, W') without W' or its token-sized weight gradient: W' = (W + DeltaW) * f scales rows or columns.

        f (a scale per output row or input column, LF.dora_factor) needs the merged weight's norm, which is built
        from the factors (no token work); then a row factor scales the output of op(x, W) + the rank-r^2 adapter
        path, a column factor scales the input of both. Rank dropout masks rows of DeltaW, norm included. Where
        a token-sized weight-gradient product costs less than the rank-r^2 path (few tokens, narrow layers: the
        same comparison as the fused kernels'), it runs one op on W' instead.
        """
        w = self.base.weight
        delta, row_scale = self.delta_weight(), self._scale_t()
        if self.training and self.rank_dropout > 0:
            keep = LF.rank_dropout_scale(self.out_features, self.rank_dropout, w.device, self.rank_dropout_scale)
            delta, row_scale = delta * keep.reshape(-1, *[1] * (delta.dim() - 1)), row_scale * keep
        merged = w.float() + delta.float()
        factored_cost, merged_cost = self.extra_cost(x)
        if self.path == "merged" or (self.path == "auto" and merged_cost < factored_cost):
            decomposed = LF.weight_decompose(merged, self.dora_scale, self.multiplier, self.wd_on_output)
            return self.base_op(x, self.base.bias, decomposed.to(w.dtype))
        factor = LF.dora_factor(merged, self.dora_scale, self.multiplier, self.wd_on_output)
        factor = factor.reshape(-1, *[1] * (x.dim() - 2)) if isinstance(self.base, nn.Conv2d) else factor.reshape(-1)
        factor = factor.to(x.dtype)
        bias = self.base.bias
        if self.wd_on_output:
            y = (self.base_op(x, None) + self.adapter_forward(x, row_scale)) * factor
            return y if bias is None else y + (bias.reshape(-1, *[1] * (x.dim() - 2)) if factor.dim() > 1 else bias)
        x = x * factor
        return self.base_op(x, bias) + self.adapter_forward(x, row_scale)

    def base_op(self, x: Tensor, bias: Tensor | None, weight: Tensor | None = None) -> Tensor:
        """The frozen layer's op with the given bias, on its own weight or on `weight` (same shape)."""
        base = self.base
        weight = base.weight if weight is None else weight
        if isinstance(base, nn.Linear):
            return F.linear(x, weight, bias)
        return base._conv_forward(x, weight, bias)  # type: ignore[operator]

    def fused_forward(self, x: Tensor, row_scale: Tensor) -> Tensor:
        """base(x) + the adapter in one autograd node (kernels.py), by the cheaper path for this call."""
        if self.path == "merged" or (self.path == "auto" and self._merged_is_cheaper(x)):
            base = self.base
            args = None if isinstance(base, nn.Linear) else (list(base.stride), list(base.padding), list(base.dilation))
            return FusedMergedLoHa.apply(x, base.weight, base.bias, row_scale, args, *self.factors())
        return self.factored_forward(x, row_scale)

    def factors(self) -> tuple[Tensor, ...]:
        """(t1, w1a, w1b, t2, w2a, w2b) for CP, else (w1a, w1b, w2a, w2b)."""
        if self.use_cp:
            return (self.hada_t1, self.hada_w1_a, self.hada_w1_b, self.hada_t2, self.hada_w2_a, self.hada_w2_b)
        return (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b)

    # The merged kernel also makes ~a dozen memory-bound passes over weight-sized tensors that the multiply-add
    # count leaves out; measured on the SD1.5 bench, picking it on a narrow margin (rank 8, 320 channels) made
    # the step slower, so it must win clearly.
    MERGED_MARGIN = 0.6

    def _merged_is_cheaper(self, x: Tensor) -> bool:
        """Multiply-adds of forward + backward beyond the frozen layer's own, for each path."""
        factored, merged = self.extra_cost(x)
        return merged < self.MERGED_MARGIN * factored

    def extra_cost(self, x: Tensor) -> tuple[float, float]:
        """(rank-r^2 path, merged path) extra multiply-adds of one forward + backward on input x."""
        raise NotImplementedError

    def factored_forward(self, x: Tensor, row_scale: Tensor) -> Tensor:
        raise NotImplementedError

    def _row_scale(self, device: torch.device) -> Tensor:
        """scale * multiplier (a 0-dim tensor: no device sync), times a rank-dropout row mask in training."""
        s = self.alpha * (self.multiplier / self.rank)
        if self.training and self.rank_dropout > 0:
            return LF.rank_dropout_scale(self.out_features, self.rank_dropout, device, self.rank_dropout_scale) * s
        return s

    def adapter_forward(self, x: Tensor, row_scale: Tensor) -> Tensor:
        """x DeltaW^T (or the conv analogue) with each output row scaled by row_scale."""
        raise NotImplementedError

    def delta_weight(self) -> Tensor:
        """DeltaW (scaled by alpha / rank, without the multiplier) in the base weight's shape, float32."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """Bake multiplier * DeltaW into the base weight; a second call does nothing."""
        if not self.merged:
            w = self.base.weight
            if self.weight_decompose:
                self._unmerged_weight = w.detach().clone()
                w.copy_(self.dora_weight())
            else:
                w.add_((self.delta_weight() * self.multiplier).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged delta back out of the base weight; does nothing when not merged."""
        if self.merged:
            w = self.base.weight
            if self._unmerged_weight is not None:
                w.copy_(self._unmerged_weight)
                self._unmerged_weight = None
            else:
                w.sub_((self.delta_weight() * self.multiplier).to(w.dtype))
            self.merged = False

    def adapter_state(self) -> dict[str, Tensor]:
        """The tensors a LyCORIS file stores for this module, by suffix."""
        return {k: v for k, v in self.state_dict().items() if k in ADAPTER_SUFFIXES}

    def extra_repr(self) -> str:
        dora = f", dora={'out' if self.wd_on_output else 'in'}" if self.weight_decompose else ""
        return f"rank={self.rank}, alpha={float(self.alpha):g}, cp={self.use_cp}{dora}"


class LoHaLinear(LoHaModule):
    """LoHa around nn.Linear: w1_a, w2_a (out, r); w1_b, w2_b (r, in)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, **kwargs: float) -> None:
        super().__init__(base, rank, alpha, **kwargs)
        self._make_factors((base.out_features, rank), (rank, base.in_features), base.weight.device)
        LF.init_loha_(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b)

    def adapter_forward(self, x: Tensor, row_scale: Tensor) -> Tensor:
        return LF.factored_linear(x, self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, row_scale)

    def extra_cost(self, x: Tensor) -> tuple[float, float]:
        out_f, in_f = self.base.weight.shape
        tokens, r2 = x.numel() // in_f, self.rank * self.rank
        # factored: x V^T, h U^T forward; their input and weight gradients backward (3 passes over r^2 channels)
        # merged: building DeltaW twice and projecting its gradient (~8 r in out), plus the g^T x weight gradient
        return 3.0 * tokens * r2 * (in_f + out_f), tokens * in_f * out_f + 8.0 * self.rank * in_f * out_f

    def factored_forward(self, x: Tensor, row_scale: Tensor) -> Tensor:
        base = self.base
        return FusedLoHaLinear.apply(
            x, base.weight, base.bias, self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, row_scale
        )

    def delta_weight(self) -> Tensor:
        return LF.delta_weight(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self._scale_t())


class LoHaConv2d(LoHaModule):
    """LoHa around nn.Conv2d (groups = 1): plain for 1x1 (and k x k without CP), CP for k x k with use_cp."""

    hada_t1: nn.Parameter
    hada_t2: nn.Parameter

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, *, use_cp: bool = True, **kwargs: float) -> None:
        if base.groups != 1:
            raise ValueError(f"LoHa supports Conv2d with groups=1 only, got groups={base.groups}")
        if base.padding_mode != "zeros":
            raise ValueError(f"LoHa supports zero padding only, got padding_mode={base.padding_mode!r}")
        super().__init__(base, rank, alpha, **kwargs)
        out_ch, in_ch, kh, kw = base.weight.shape
        self._cp = use_cp and (kh, kw) != (1, 1)
        device = base.weight.device
        if self._cp:
            self._make_factors((rank, out_ch), (rank, in_ch), device)
            self.hada_t1 = nn.Parameter(torch.empty(rank, rank, kh, kw, device=device))
            self.hada_t2 = nn.Parameter(torch.empty(rank, rank, kh, kw, device=device))
            cores: tuple[Tensor, ...] = (self.hada_t1, self.hada_t2)
        else:
            self._make_factors((out_ch, rank), (rank, in_ch * kh * kw), device)
            cores = ()
        LF.init_loha_(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, *cores)

    @property
    def use_cp(self) -> bool:
        return self._cp

    def adapter_forward(self, x: Tensor, row_scale: Tensor) -> Tensor:
        conv = self.base
        if self._cp:
            return LF.factored_conv_cp(
                x, self.hada_t1, self.hada_w1_a, self.hada_w1_b, self.hada_t2, self.hada_w2_a, self.hada_w2_b,
                row_scale, conv.stride, conv.padding, conv.dilation,
            )  # fmt: skip
        return LF.factored_conv(
            x, self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, row_scale,
            conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        )  # fmt: skip

    def _fusable(self) -> bool:
        return not isinstance(self.base.padding, str)  # "same"/"valid": the reference path handles them

    def extra_cost(self, x: Tensor) -> tuple[float, float]:
        conv = self.base
        out_c, in_c, kh, kw = conv.weight.shape
        k, r, r2 = kh * kw, self.rank, self.rank * self.rank
        pixels_in = x.shape[0] * x.shape[-2] * x.shape[-1]
        pixels_out = x.shape[0] * math.prod(
            (n + 2 * p - d * (kk - 1) - 1) // s + 1
            for n, p, d, kk, s in zip(
                x.shape[-2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride, strict=True
            )
        )
        merged = pixels_out * in_c * out_c * k + 8.0 * r * in_c * out_c * k
        if self._cp:
            factored = 3.0 * (pixels_in * r2 * in_c + pixels_out * (r2 * r2 * k + r2 * out_c))
        else:
            factored = 3.0 * pixels_out * r2 * (in_c * k + out_c)
        return factored, merged

    def factored_forward(self, x: Tensor, row_scale: Tensor) -> Tensor:
        conv = self.base
        args = (list(conv.stride), list(conv.padding), list(conv.dilation))
        if self._cp:
            return FusedLoHaConvCP.apply(
                x, conv.weight, conv.bias, self.hada_t1, self.hada_w1_a, self.hada_w1_b,
                self.hada_t2, self.hada_w2_a, self.hada_w2_b, row_scale, args,
            )  # fmt: skip
        plain = (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b)
        if is_pointwise(conv.weight, args):
            return FusedLoHaPointwise.apply(x, conv.weight, conv.bias, *plain, row_scale)
        return FusedLoHaConv.apply(x, conv.weight, conv.bias, *plain, row_scale, args)

    def delta_weight(self) -> Tensor:
        if self._cp:
            return LF.delta_weight_cp(
                self.hada_t1, self.hada_w1_a, self.hada_w1_b, self.hada_t2, self.hada_w2_a, self.hada_w2_b,
                self._scale_t(),
            )  # fmt: skip
        flat = LF.delta_weight(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self._scale_t())
        return flat.reshape(self.base.weight.shape)


def wrap_layer(
    base: nn.Module,
    rank: int,
    alpha: float,
    *,
    use_cp: bool = True,
    rank_dropout: float = 0.0,
    module_dropout: float = 0.0,
    rank_dropout_scale: bool = False,
    weight_decompose: bool = False,
    wd_on_output: bool = True,
) -> LoHaModule:
    """Wrap an nn.Linear or nn.Conv2d in the matching LoHa module (DoRA with `weight_decompose`)."""
    dropouts = {
        "rank_dropout": rank_dropout,
        "module_dropout": module_dropout,
        "rank_dropout_scale": rank_dropout_scale,
        "weight_decompose": weight_decompose,
        "wd_on_output": wd_on_output,
    }
    if isinstance(base, nn.Linear):
        return LoHaLinear(base, rank, alpha, **dropouts)
    if isinstance(base, nn.Conv2d):
        return LoHaConv2d(base, rank, alpha, use_cp=use_cp, **dropouts)
    raise TypeError(f"LoHa wraps nn.Linear and nn.Conv2d, not {type(base).__name__}")


def parameter_count(module: LoHaModule) -> int:
    """Trainable adapter parameters of one module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
