"""Sample prompts from a kohya prompt file, and classifier-free guidance rescale against diffusers' formula."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from loha_train.config import ConfigError, ModelConfig, SampleConfig, SamplePrompt, config_from_dict, dump_config
from loha_train.config.yaml_io import parse_yaml

MINIMAL: dict[str, Any] = {
    "model": {"path": "builtin:tiny-sd-random"},
    "data": {"path": "builtin:shapes"},
    "train": {"max_steps": 1},
    "output": {"dir": "out"},
}

PROMPTS = """# kohya sample prompts
a red circle --n blurry, low quality --w 100 --h 40 --s 2000 --l 4.5 --d 123
   # an indented '#' is not a comment in kohya (only a '#' in the first column is)

a blue square --W 512 --ss euler_a --cn control.png
masterpiece --s 0 --d 7
"""


def load(tmp_path: Path, text: str, **sample: Any) -> Any:
    path = tmp_path / "prompts.txt"
    path.write_text(text, encoding="utf-8")
    return config_from_dict({**MINIMAL, "sample": {"prompts_file": str(path), **sample}}, check_paths=False)


def test_kohya_prompt_file_lines_become_prompts(tmp_path: Path) -> None:
    cfg = load(tmp_path, PROMPTS, prompts=["inline first"])
    assert cfg.sample.prompts == (
        SamplePrompt("inline first"),
        # kohya: size rounded down to a multiple of 8, at least 64; steps clamped to 1..1000
        SamplePrompt("a red circle", "blurry, low quality", width=96, height=64, seed=123, steps=1000, guidance=4.5),
        SamplePrompt("# an indented '#' is not a comment in kohya (only a '#' in the first column is)"),
        SamplePrompt("a blue square", width=512),  # options are case-insensitive; --ss/--cn are ignored
        SamplePrompt("masterpiece", seed=7, steps=1),
    )
    # the run's config.yaml lists the prompts it samples and reads back to the same config
    again = config_from_dict(parse_yaml(dump_config(cfg), "config.yaml"), check_paths=False)
    assert again == cfg and again.sample.prompts_file is None


def test_a_bad_prompt_line_names_the_key_and_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "ok\nbad --l 7.5.1\n")
    assert [p.key for p in info.value.problems] == ["sample.prompts_file"]
    assert "line 2: --l 7.5.1: '7.5.1' is not a number" in str(info.value)
    with pytest.raises(ConfigError, match=r"sample\.prompts_file: does not exist"):
        config_from_dict({**MINIMAL, "sample": {"prompts_file": str(tmp_path / "none.txt")}})


def test_guidance_rescale_defaults_follow_zero_terminal_snr() -> None:
    from loha_train.training.sampling import guidance_rescale

    plain = config_from_dict(MINIMAL, check_paths=False)
    ztsnr = config_from_dict(
        {**MINIMAL, "model": {"path": "builtin:tiny-sd-v", "zero_terminal_snr": True}}, check_paths=False
    )
    assert guidance_rescale(plain) == 0.0 and guidance_rescale(ztsnr) == 0.7
    chosen = config_from_dict({**MINIMAL, "sample": {"guidance_rescale": 0.3}}, check_paths=False)
    assert guidance_rescale(chosen) == 0.3


@pytest.mark.usefixtures("builtin_cache", "fresh_accelerate")
@torch.no_grad()
def test_guidance_rescale_is_diffusers_rescale_noise_cfg(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the sampler steps with is Lin et al.'s rescaled guidance (diffusers' rescale_noise_cfg):
    cfg = u + g (c - u); x = cfg * std(c) / std(cfg); out = phi x + (1 - phi) cfg, std over all but the batch dim."""
    import diffusers

    from loha_train.models.loading import load_models
    from loha_train.training.sampling import SampleModels, generate

    bundle = load_models(ModelConfig(path="builtin:tiny-sd-random"))
    outputs: list[torch.Tensor] = []
    stepped: list[torch.Tensor] = []
    hook = bundle.unet.register_forward_hook(lambda _m, _a, out: outputs.append(out[0].clone()))
    step = diffusers.EulerDiscreteScheduler.step

    def recording_step(self: Any, model_output: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        stepped.append(model_output.clone())
        return step(self, model_output, *args, **kwargs)

    monkeypatch.setattr(diffusers.EulerDiscreteScheduler, "step", recording_step)
    models = SampleModels(bundle.unet, bundle.vae, bundle.text_encoders, bundle.tokenizers, bundle.scheduler_config)
    prompt = SamplePrompt("a red circle", negative_prompt="blurry", width=64, height=64, steps=2)
    g, phi = 6.0, 0.7
    generate(models, SampleConfig(prompts=(prompt,), guidance=g, guidance_rescale=phi, sampler="euler"), 64)
    hook.remove()
    assert len(outputs) == len(stepped) == 2
    for out, got in zip(outputs, stepped, strict=True):
        uncond, text = out[:1], out[1:]
        guided = uncond + g * (text - uncond)
        std_text = text.std(dim=(1, 2, 3), keepdim=True)
        std_guided = guided.std(dim=(1, 2, 3), keepdim=True)
        want = phi * guided * (std_text / std_guided) + (1 - phi) * guided
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, guided, rtol=1e-3, atol=1e-4)  # the rescale did change the step
