"""Optimizers: Prodigy gets an lr it can work with, optimizer_args reach the optimizer and are checked against it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from loha_train.config import Config, ConfigError, config_from_dict
from loha_train.training.optim import check_optimizer, lr_warnings, make_optimizer


def config(tmp_path: Path, **train: Any) -> Config:
    raw = {
        "model": {"path": "builtin:tiny-sd-random"},
        "data": {"path": "builtin:shapes"},
        "train": {"max_steps": 10, **train},
        "output": {"dir": str(tmp_path / "out")},
    }
    return config_from_dict(raw)


def one_param() -> list[dict[str, Any]]:
    return [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1.0}]


def prodigy_step_sizes(cfg: Config, steps: int = 60) -> list[float]:
    """d * lr of Prodigy (its effective step size) after each step on a least-squares problem with scale ~1."""
    torch.manual_seed(0)
    a, b = torch.randn(64, 16), torch.randn(64)
    w = torch.nn.Parameter(torch.zeros(16))
    opt = make_optimizer(cfg.train.optimizer, [{"params": [w], "lr": cfg.train.effective_lr}], cfg)
    sizes = []
    for _ in range(steps):
        loss = ((a @ w - b) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        group = opt.param_groups[0]
        sizes.append(group["d"] * group["lr"])
    return sizes


def test_prodigy_default_lr_lets_its_step_size_grow(tmp_path: Path) -> None:
    pytest.importorskip("prodigyopt")
    cfg = config(tmp_path, optimizer="prodigy")
    assert cfg.train.effective_lr == 1.0  # Prodigy's own default; the estimate d starts at d0 = 1e-6
    sizes = prodigy_step_sizes(cfg)
    # On a problem whose solution is ~1 away from 0, Prodigy's estimate climbs by orders of magnitude from d0
    assert sizes[0] <= 1e-5 and sizes[-1] > 1e-2, sizes[::10]
    # what main did: train.lr 1e-4 reached Prodigy, and d*lr stayed around 1e-10..1e-6
    assert prodigy_step_sizes(config(tmp_path, optimizer="prodigy", lr=1e-4))[-1] < 1e-3


def test_optimizer_args_reach_the_optimizer(tmp_path: Path) -> None:
    pytest.importorskip("prodigyopt")
    args = {"d_coef": 2.0, "safeguard_warmup": True, "use_bias_correction": True, "decouple": False}
    cfg = config(tmp_path, optimizer="prodigy", optimizer_args=args)
    check_optimizer(cfg)
    group = make_optimizer("prodigy", one_param(), cfg).param_groups[0]
    assert {k: group[k] for k in args} == args
    adamw = config(tmp_path, optimizer_args={"betas": [0.8, 0.95], "amsgrad": True})
    group = make_optimizer("adamw", one_param(), adamw).param_groups[0]
    assert tuple(group["betas"]) == (0.8, 0.95) and group["amsgrad"] is True


def test_unknown_or_wrong_optimizer_args_name_the_key(tmp_path: Path) -> None:
    pytest.importorskip("prodigyopt")
    with pytest.raises(ConfigError) as err:
        check_optimizer(config(tmp_path, optimizer="prodigy", optimizer_args={"d_coeff": 2.0}))
    assert "train.optimizer_args.d_coeff" in str(err.value) and "d_coef" in str(err.value)
    with pytest.raises(ConfigError, match=r"train\.optimizer_args.*refuses"):
        check_optimizer(config(tmp_path, optimizer_args={"betas": [2.0, 0.9]}))


def test_adaptive_optimizer_with_small_lr_is_warned_about(tmp_path: Path) -> None:
    assert lr_warnings(config(tmp_path, optimizer="prodigy")) == []
    assert lr_warnings(config(tmp_path, lr=1e-4)) == []  # adamw: a small lr is normal
    (warning,) = lr_warnings(config(tmp_path, optimizer="prodigy", lr=1e-4))
    assert "1e-4" in warning.replace("0.0001", "1e-4") and "1.0" in warning
    (warning,) = lr_warnings(config(tmp_path, optimizer="prodigy", text_encoder_lr=0.05))
    assert "text encoder 0.05" in warning


def lr_curve(scheduler: Any, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize(
    ("name", "sets"),
    [
        ("cosine_with_restarts", {"lr_scheduler_num_cycles": 3}),
        ("polynomial", {"lr_scheduler_power": 2.0}),
        ("polynomial", {"lr_scheduler_power": 0.5}),
        ("cosine", {"lr_scheduler_num_cycles": 3}),  # cosine has no cycles: it stays cosine
    ],
)
def test_scheduler_options_shape_the_schedule_as_diffusers_does(tmp_path: Path, name: str, sets: dict) -> None:
    from diffusers.optimization import get_scheduler

    from loha_train.loha.inject import LoHaNetwork
    from loha_train.loha.layers import LoHaLinear
    from loha_train.training.optim import build_optimizer

    one = LoHaNetwork({"m": LoHaLinear(torch.nn.Linear(2, 2), 1, 1.0)}, {"m": "unet.m"}, {"m": "unet"})
    steps = 40
    cfg = config(tmp_path, scheduler=name, warmup_steps=5, lr=1e-3, **sets)
    _, ours = build_optimizer(cfg, one, steps)
    reference_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    kwargs = {"num_cycles": sets.get("lr_scheduler_num_cycles", 1), "power": sets.get("lr_scheduler_power", 1.0)}
    reference = get_scheduler(name, reference_opt, num_warmup_steps=5, num_training_steps=steps, **kwargs)
    got, want = lr_curve(ours, steps), lr_curve(reference, steps)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    if name != "cosine":  # the option changes the curve: without it the schedule would be another
        plain_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
        plain = get_scheduler(name, plain_opt, num_warmup_steps=5, num_training_steps=steps)
        assert got != pytest.approx(lr_curve(plain, steps))
