"""Diffusers/transformers configs of the real SD 1.5, SD 2.1 and SDXL base architectures, for single files."""

# A single-file checkpoint holds weights but no configs, and diffusers would fetch them from the Hub; these are
# the public repos' config.json values (stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1,
# stabilityai/stable-diffusion-xl-base-1.0), written out so loading works offline. Plain dicts, no torch.

from __future__ import annotations

from typing import Any

# The noise schedule every SD 1.x/2.x model ships (scheduler_config.json of the public repos).
SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "timestep_spacing": "leading",
    "clip_sample": False,
}

_SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

# OpenAI CLIP ViT-L/14 text tower (SD 1.x, and SDXL's first encoder).
_CLIP_L: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "layer_norm_eps": 1e-5,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

SD1: dict[str, dict[str, Any]] = {
    "unet": {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    "vae": _SD_VAE,
    "text_encoder": _CLIP_L,
    "scheduler": {**SD_SCHEDULE, "prediction_type": "epsilon"},
}

# OpenCLIP ViT-H/14 text tower without its last layer: SD 2.x conditions on the penultimate layer, and the
# diffusers conversion drops resblocks.23 (that is how stabilityai's diffusers repo ships it).
SD2: dict[str, dict[str, Any]] = {
    "unet": {
        **SD1["unet"],
        "sample_size": 96,
        "cross_attention_dim": 1024,
        "attention_head_dim": [5, 10, 20, 20],
        "use_linear_projection": True,
        "upcast_attention": True,
    },
    "vae": {**_SD_VAE, "sample_size": 768},
    "text_encoder": {
        **_CLIP_L,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 23,
        "hidden_act": "gelu",
        "projection_dim": 512,
    },
    # No prediction_type: 768-v (v_prediction) and 512-base (epsilon) files have the same keys.
    "scheduler": dict(SD_SCHEDULE),
}

SDXL: dict[str, dict[str, Any]] = {
    "unet": {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [320, 640, 1280],
        "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 2, 10],
        "cross_attention_dim": 2048,
        "attention_head_dim": [5, 10, 20],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "norm_num_groups": 32,
    },
    "vae": {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
    "text_encoder": _CLIP_L,
    # OpenCLIP ViT-bigG/14 text tower with its projection (CLIPTextModelWithProjection).
    "text_encoder_2": {
        **_CLIP_L,
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_attention_heads": 20,
        "num_hidden_layers": 32,
        "hidden_act": "gelu",
        "projection_dim": 1280,
    },
    "scheduler": {**SD_SCHEDULE, "prediction_type": "epsilon"},
}

REFERENCE: dict[str, dict[str, dict[str, Any]]] = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}
