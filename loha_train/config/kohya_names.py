"""kohya sd-scripts option names -> our config keys: the README's table, and the hint for an unknown key.

A kohya user types `learning_rate` or `network_dim` out of habit; the unknown-key error then names our key. Only
options with a same-meaning key here are listed (the README says so of the others).
"""

from __future__ import annotations

KOHYA_NAMES: dict[str, str] = {
    "pretrained_model_name_or_path": "model.path",
    "vae": "model.vae_path",
    "clip_skip": "model.clip_skip",
    "zero_terminal_snr": "model.zero_terminal_snr",
    "network_dim": "network.rank",
    "network_alpha": "network.alpha",
    "conv_dim": "network.conv_rank",
    "conv_alpha": "network.conv_alpha",
    "use_tucker": "network.use_cp",
    "rank_dropout": "network.rank_dropout",
    "module_dropout": "network.module_dropout",
    "network_weights": "network.init_from",
    "dora_wd": "network.weight_decompose",
    "wd_on_output": "network.wd_on_output",
    "train_data_dir": "data.path",
    "reg_data_dir": "data.reg_path",
    "caption_extension": "data.caption_extension",
    "shuffle_caption": "data.shuffle_captions",
    "keep_tokens": "data.keep_tokens",
    "caption_dropout_rate": "data.caption_dropout",
    "caption_tag_dropout_rate": "data.tag_dropout",
    "resolution": "data.resolution",
    "enable_bucket": "data.bucketing",
    "min_bucket_reso": "data.bucket_min_side",
    "max_bucket_reso": "data.bucket_max_side",
    "bucket_reso_steps": "data.bucket_step",
    "bucket_no_upscale": "data.bucket_no_upscale",
    "random_crop": "data.random_crop",
    "flip_aug": "data.flip",
    "prior_loss_weight": "data.prior_loss_weight",
    "cache_latents": "data.cache_latents",
    "cache_latents_to_disk": "data.cache_latents",
    "cache_text_encoder_outputs": "data.cache_text_embeddings",
    "max_data_loader_n_workers": "data.num_workers",
    "validation_split": "data.validation_split",
    "max_train_steps": "train.max_steps",
    "max_train_epochs": "train.epochs",
    "train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation",
    "learning_rate": "train.lr",
    "unet_lr": "train.unet_lr",
    "text_encoder_lr": "train.text_encoder_lr",
    "optimizer_type": "train.optimizer",
    "lr_scheduler": "train.scheduler",
    "lr_warmup_steps": "train.warmup_steps",
    "max_grad_norm": "train.max_grad_norm",
    "mixed_precision": "train.mixed_precision",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "seed": "train.seed",
    "noise_offset": "train.noise_offset",
    "min_snr_gamma": "train.min_snr_gamma",
    "save_every_n_steps": "train.save_every_steps",
    "save_last_n_steps_state": "train.keep_last_checkpoints",
    "output_dir": "output.dir",
    "output_name": "output.name",
    "save_precision": "output.save_precision",
    "sample_sampler": "sample.sampler",
    "sample_every_n_steps": "sample.every_n_steps",
    "sample_every_n_epochs": "sample.every_n_epochs",
    "sample_at_first": "sample.at_start",
}


def kohya_hint(name: str) -> str | None:
    """Our key for kohya's option `name` (also `--name` and kebab-case), or None."""
    return KOHYA_NAMES.get(name.lstrip("-").replace("-", "_"))
