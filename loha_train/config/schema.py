"""The run configuration: one frozen dataclass per YAML section; defaults live here and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from loha_train.config.check import Schema
from loha_train.config.rules import FIELD_RULES

# Every field's comment is its documentation: scripts/config_table.py turns these dataclasses into the
# README's config reference table, so keep each comment to one line a user can act on.

Preset = Literal["attn-only", "attn-mlp", "full", "full-lin", "none"]
# Optimizers that estimate their own step size and expect lr ~1.0 (D-Adaptation style, as kohya names them).
ADAPTIVE_OPTIMIZERS = ("prodigy",)


def default_lr(optimizer: str) -> float:
    """`train.lr` when unset: 1.0 for the adaptive optimizers (their step is their estimate times lr), else 1e-4."""
    return 1.0 if optimizer in ADAPTIVE_OPTIMIZERS else 1e-4


Scheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


@dataclass(frozen=True)
class ModelConfig:
    """`model:` which base model to train against."""

    path: str  # diffusers folder, single-file .safetensors/.ckpt, or builtin:tiny-sd (see README)
    family: Literal["auto", "sd1", "sd2", "sdxl"] = "auto"  # detected from the files; set it only to assert
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = "auto"  # auto: read from scheduler config
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # precision of the frozen weights
    vae_path: str | None = None  # optional separate VAE (diffusers folder or single file)
    vae_dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp32 if the VAE config says force_upcast
    tokenizer_path: str | None = None  # tokenizer folder (or diffusers model folder) for single-file checkpoints
    clip_skip: int = 1  # use the output of the N-th last text-encoder layer (2 for anime models)
    max_token_length: Literal[75, 150, 225] = 75  # caption tokens encoded (kohya's): 150/225 in 75-token chunks
    zero_terminal_snr: bool = False  # rescale the noise schedule to zero terminal SNR (use with v_prediction)


@dataclass(frozen=True)
class NetworkConfig:
    """`network:` where the LoHa adapters go and how big they are."""

    preset: Preset = "attn-mlp"  # which modules get LoHa; "none" to use only `targets`
    targets: tuple[str, ...] = ()  # extra regexes searched in qualified module names (unet.…, text_encoder.…)
    exclude: tuple[str, ...] = ()  # regexes; matching modules are left without an adapter
    rank: int = 8  # rank of each Hadamard factor for linear layers (and 1x1 convs)
    alpha: float = 4.0  # scale = alpha / rank
    conv_rank: int | None = None  # rank for k x k convs; default: `rank`
    conv_alpha: float | None = None  # alpha for k x k convs; default: `alpha`
    use_cp: bool = True  # CP-decompose k x k convs (LyCORIS use_tucker, PEFT use_effective_conv2d)
    rank_dropout: float = 0.0  # probability of dropping an output row of the delta, training only
    rank_dropout_scale: bool = False  # LyCORIS's: divide kept rows by the kept fraction (off, its default: no rescale)
    module_dropout: float = 0.0  # probability of skipping a module's adapter for a step, training only
    rank_pattern: dict[str, int] = field(default_factory=dict)  # regex -> rank, first match wins
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # regex -> alpha, first match wins
    train_unet: bool = True  # put LoHa on the UNet
    train_text_encoder: bool = False  # put LoHa on the text encoder(s)
    init_from: str | None = None  # start from an existing LoHa .safetensors instead of zero
    scale_weight_norms: float | None = None  # max-norm: scale down each module whose delta weight's norm exceeds this
    weight_decompose: bool = False  # DoRA for LoHa (LyCORIS dora_wd): trains a magnitude `dora_scale` per module
    wd_on_output: bool = False  # DoRA norm per input column (WebUI/ComfyUI exact); true: per row (lycoris-lora)

    @property
    def effective_conv_rank(self) -> int:
        return self.rank if self.conv_rank is None else self.conv_rank

    @property
    def effective_conv_alpha(self) -> float:
        return self.alpha if self.conv_alpha is None else self.conv_alpha


@dataclass(frozen=True)
class SubsetConfig:
    """One entry of `data.subsets` (kohya's [[datasets.subsets]]): unset fields take the top-level `data.*` value."""

    path: str  # any data.path source: folder, kohya N_name folder, imagefolder, save_to_disk, parquet/..., hf:
    name: str | None = None  # subset name in the plan and ss_tag_frequency; default: the folder or file name
    repeats: int | None = None  # kohya num_repeats; default: data.repeats (reg subsets: data.reg_repeats)
    is_reg: bool = False  # regularization (class) images, as kohya's is_reg
    caption_extension: str | None = None  # default: data.caption_extension
    default_caption: str | None = None  # kohya class_tokens: caption of images without one
    trigger_word: str | None = None  # default: data.trigger_word (never applied to reg subsets)
    caption_prefix: str | None = None  # default: data.caption_prefix
    caption_suffix: str | None = None  # default: data.caption_suffix
    shuffle_captions: bool | None = None  # kohya shuffle_caption; default: data.shuffle_captions
    keep_tokens: int | None = None  # default: data.keep_tokens
    caption_dropout: float | None = None  # kohya caption_dropout_rate; default: data.caption_dropout
    tag_dropout: float | None = None  # kohya caption_tag_dropout_rate; default: data.tag_dropout
    flip: bool | None = None  # kohya flip_aug; default: data.flip
    random_crop: bool | None = None  # default: data.random_crop
    prior_loss_weight: float | None = None  # loss weight of this subset's images when is_reg; default: data's
    image_column: str | None = None  # default: data.image_column
    caption_column: str | None = None  # default: data.caption_column


@dataclass(frozen=True)
class DataConfig:
    """`data:` the training images, captions and caches."""

    path: str | None = None  # image folder, kohya N_name folders, imagefolder, save_to_disk, parquet/..., hf:OWNER/NAME
    repeats: int = 1  # times each image is seen per epoch (N_name subfolders override it)
    caption_extension: str = ".txt"  # caption file next to each image
    default_caption: str | None = None  # caption for images without one
    trigger_word: str | None = None  # prepended to every caption (kept first when shuffling)
    caption_prefix: str | None = None  # kohya's: "<prefix> <caption>" before shuffling and dropout
    caption_suffix: str | None = None  # kohya's: "<caption> <suffix>" before shuffling and dropout
    shuffle_captions: bool = False  # shuffle comma-separated tags each step
    keep_tokens: int = 0  # leading tags that shuffling and tag dropout leave in place
    caption_separator: str = ","  # tag separator for shuffling and tag dropout
    caption_dropout: float = 0.0  # probability of an empty caption for a sample
    tag_dropout: float = 0.0  # probability of dropping each (non-kept) tag
    caption_wildcards: bool = False  # `{a|b|c}` in a caption: one option drawn per step (kohya's enable_wildcard)
    resolution: int = 512  # training side length in pixels (multiple of 8); buckets hold about resolution^2
    bucketing: bool = True  # aspect-ratio buckets; off: resize and center-crop to a square
    bucket_min_side: int = 256  # smallest bucket side
    bucket_max_side: int = 1024  # largest bucket side
    bucket_step: int = 64  # bucket sides are multiples of this
    bucket_no_upscale: bool = True  # never upscale an image to reach a bucket
    random_crop: bool = False  # random instead of center crop (incompatible with latent caching)
    flip: bool = False  # random horizontal flip (with cached latents both orientations are cached)
    max_aspect_ratio: float = 8.0  # refuse images whose long side is over this times the short side
    reg_path: str | None = None  # regularization (class) images, DreamBooth style
    reg_repeats: int = 1  # repeats for regularization images
    prior_loss_weight: float = 1.0  # loss weight of regularization images
    cache_latents: Literal["memory", "disk", "none"] = "disk"  # disk caches live in <data>/.loha-cache
    cache_text_embeddings: bool = True  # cache text-encoder outputs when possible (frozen encoder, fixed captions)
    num_workers: int = 0  # dataloader workers
    validation_path: str | None = None  # held-out images for a validation loss
    validation_split: float = 0.0  # or hold out this fraction of the training images
    skip_bad_images: bool = False  # warn and skip unreadable images instead of stopping
    alpha_mask: bool = False  # masked loss: weight the loss by each image's alpha channel (kohya's alpha_mask)
    mask_path: str | None = None  # masked loss: folder of mask images named like the images (white = trained)
    subsets: tuple[SubsetConfig, ...] = ()  # several sources, each with its own repeats/caption rules (after path)
    image_column: str | None = None  # table sources: image column; auto: image, img, file_name, ...
    caption_column: str | None = None  # table sources: caption column; auto: text, caption, prompt, tags
    width_column: str | None = None  # table sources: pixel width column (auto: width); skips decoding to bucket
    height_column: str | None = None  # table sources: pixel height column (auto: height)
    hf_split: str = "train"  # hf:OWNER/NAME sources: the split
    hf_revision: str | None = None  # hf: sources: branch, tag or commit in the local HF cache; default: main
    hf_config: str | None = None  # hf: sources: the dataset config (subset) name
    streaming: bool = False  # train from an IterableDataset without materialising it (table and hf: sources)
    stream_buffer: int = 256  # streaming: samples held while filling aspect buckets


@dataclass(frozen=True)
class EMAConfig:
    """`train.ema:` an exponential moving average of the adapter weights, with diffusers' EMAModel schedule."""

    decay: float = 0.9999  # the largest decay (diffusers' `decay`); any train.ema key (even `{}`) turns EMA on
    update_after_step: int = 0  # optimizer steps before averaging starts (the average copies the weights until then)
    use_warmup: bool = False  # decay 1 - (1 + step / inv_gamma) ** -power instead of (1 + step) / (10 + step)
    inv_gamma: float = 1.0  # warm-up: inverse multiplicative factor of the step
    power: float = 0.6666666666666666  # warm-up: exponential factor (2/3 for long runs, 3/4 for short ones)
    min_decay: float = 0.0  # the smallest decay


@dataclass(frozen=True)
class TrainConfig:
    """`train:` the optimisation."""

    max_steps: int | None = None  # optimizer steps; give this or `epochs`
    epochs: int | None = None  # passes over the (repeated) dataset
    batch_size: int = 1  # images per step per process
    gradient_accumulation: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # learning rate for all adapters; default 1e-4, or 1.0 for prodigy (it scales its own step)
    unet_lr: float | None = None  # default: `lr`
    text_encoder_lr: float | tuple[float, ...] | None = None  # default: `lr`; SDXL: one value or [encoder 1, encoder 2]
    lr_pattern: dict[str, float] = field(default_factory=dict)  # regex -> lr (block LRs; 0 freezes), first match wins
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = "adamw"  # adamw8bit needs bitsandbytes, prodigy prodigyopt
    optimizer_args: dict[str, Any] = field(default_factory=dict)  # extra optimizer arguments (prodigy: d_coef, …)
    weight_decay: float = 0.01  # decoupled weight decay
    adam_beta1: float = 0.9  # first-moment decay
    adam_beta2: float = 0.999  # second-moment decay
    adam_eps: float = 1e-8  # denominator epsilon
    scheduler: Scheduler = "constant"  # learning-rate schedule
    warmup_steps: int = 0  # linear warm-up steps
    lr_scheduler_num_cycles: int = 1  # cosine_with_restarts: hard restarts over the run (kohya's name)
    lr_scheduler_power: float = 1.0  # polynomial: the decay's power (1 = linear; kohya's name)
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # autocast precision (GPU)
    gradient_checkpointing: bool = False  # trade compute for activation memory
    compile: bool = False  # torch.compile the UNet with its LoHa layers; GPU only (first step compiles: minutes)
    seed: int = 42  # seeds data order, noise, dropouts and init
    noise_offset: float = 0.0  # offset noise strength (0.05-0.1 for darker/brighter images)
    noise_offset_random_strength: bool = False  # draw the offset's strength uniformly in [0, noise_offset) each step
    adaptive_noise_scale: float | None = None  # add this x |latent channel mean| to noise_offset (kohya's)
    multires_noise_iterations: int = 0  # pyramid noise levels added to the noise (6-10 is common); 0: off
    multires_noise_discount: float = 0.3  # weight factor of each further pyramid level
    ip_noise_gamma: float = 0.0  # input perturbation noise strength (0.1 is common); 0: off
    ip_noise_gamma_random_strength: bool = False  # draw its strength uniformly in [0, ip_noise_gamma) each step
    min_timestep: int = 0  # smallest training timestep
    max_timestep: int | None = None  # training timesteps are below this; default: the scheduler's count (1000)
    loss: Literal["l2", "l1", "huber", "smooth_l1"] = "l2"  # per-element loss (kohya's loss_type)
    huber_schedule: Literal["constant", "exponential", "snr"] = "snr"  # huber/smooth_l1 threshold over timesteps
    huber_c: float = 0.1  # huber/smooth_l1 threshold (the schedule's value at the noisiest timestep)
    huber_scale: float = 1.0  # huber/smooth_l1: multiplies the constant and exponential thresholds
    min_snr_gamma: float | None = None  # min-SNR loss weighting (5 is common)
    debiased_estimation: bool = False  # weight the loss by 1/sqrt(SNR) (v-prediction: 1/(SNR+1)), kohya's
    scale_v_pred_loss_like_noise_pred: bool = False  # v-prediction: weight the loss by SNR/(SNR+1) (kohya's)
    save_every_steps: int | None = None  # resumable checkpoint interval
    keep_last_checkpoints: int = 3  # older checkpoints are deleted
    nan_policy: Literal["stop", "skip"] = "stop"  # on a NaN/inf loss: stop, or skip that step
    validation_every_steps: int | None = None  # validation loss interval (needs a validation set)
    ema: EMAConfig | None = None  # keep an exponential moving average of the adapter (diffusers' EMAModel)

    @property
    def effective_lr(self) -> float:
        """`lr`, or its default: 1.0 for the adaptive optimizers (their step is their estimate times lr)."""
        return default_lr(self.optimizer) if self.lr is None else self.lr

    @property
    def effective_unet_lr(self) -> float:
        return self.effective_lr if self.unet_lr is None else self.unet_lr

    @property
    def effective_text_encoder_lr(self) -> float:
        """The first text encoder's lr."""
        return self.text_encoder_lrs[0]

    @property
    def text_encoder_lrs(self) -> tuple[float, float]:
        """(first, second) text encoder's lr: one value serves both, as in kohya."""
        te = self.text_encoder_lr
        lrs = (self.effective_lr,) if te is None else (te,) if isinstance(te, float) else te
        return lrs[0], lrs[-1]


@dataclass(frozen=True)
class SamplePrompt:
    """One entry of `sample.prompts` (a plain string is a prompt with defaults)."""

    prompt: str  # the text prompt
    negative_prompt: str = ""  # the negative prompt
    width: int | None = None  # default: data.resolution
    height: int | None = None  # default: data.resolution
    seed: int | None = None  # default: sample.seed
    steps: int | None = None  # default: sample.steps
    guidance: float | None = None  # default: sample.guidance


@dataclass(frozen=True)
class SampleConfig:
    """`sample:` images generated during training."""

    prompts: tuple[SamplePrompt, ...] = ()  # no prompts: no samples
    sampler: Literal["euler", "euler_a", "ddim", "dpmpp_2m", "pndm"] = "euler_a"  # diffusers scheduler
    steps: int = 20  # denoising steps
    guidance: float = 7.0  # classifier-free guidance scale
    seed: int = 0  # base seed for prompts without one
    every_n_steps: int | None = None  # sample every N optimizer steps
    every_n_epochs: int | None = None  # sample at the end of every N epochs
    at_start: bool = True  # sample before the first step (the untrained baseline)
    prompts_file: str | None = None  # kohya prompt file: one prompt per line with --n --w --h --s --l --d, # comments
    guidance_rescale: float | None = None  # diffusers' CFG rescale; default 0.7 with zero_terminal_snr, else 0
    use_ema: bool = False  # samples and the validation loss use the EMA weights (needs train.ema)
    concept: str | None = None  # "<colour> <shape>" (e.g. "purple star"): score the samples for it (README: quickstart)


@dataclass(frozen=True)
class OutputConfig:
    """`output:` where results go."""

    dir: str  # output folder (the layout is in the README)
    name: str = "loha"  # file name stem and ss_output_name
    save_precision: Literal["fp16", "bf16", "fp32"] = "fp16"  # dtype of exported adapters
    save_adapter_every_steps: int | None = None  # also export <name>-step-NNNNNN.safetensors every N steps
    title: str | None = None  # modelspec.title; default: `name`
    trigger_words: tuple[str, ...] = ()  # recorded in metadata for users of the file
    export_ema: bool = False  # exported adapters hold the EMA weights (needs train.ema); metadata loha_train.weights

    @property
    def effective_title(self) -> str:
        return self.name if self.title is None else self.title


@dataclass(frozen=True)
class WandbConfig:
    """`logging.wandb:` log to Weights & Biases as well (pip install "loha-train[wandb]")."""

    project: str  # the W&B project
    run_name: str | None = None  # the run's name; default: output.name
    tags: tuple[str, ...] = ()  # tags on the run
    entity: str | None = None  # team or user; default: your W&B default entity


@dataclass(frozen=True)
class LoggingConfig:
    """`logging:` where metrics go besides TensorBoard and logs/metrics.jsonl."""

    wandb: WandbConfig | None = None  # Weights & Biases (WANDB_MODE=offline works without an account)


@dataclass(frozen=True)
class Config:
    """The whole run."""

    model: ModelConfig
    network: NetworkConfig
    data: DataConfig
    train: TrainConfig
    output: OutputConfig
    sample: SampleConfig = field(default_factory=SampleConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def resolved_prompts(cfg: Config) -> tuple[SamplePrompt, ...]:
    """`sample.prompts` with every unset field filled in from `sample` and `data.resolution`."""
    sample, side = cfg.sample, cfg.data.resolution
    return tuple(
        replace(
            p,
            width=side if p.width is None else p.width,
            height=side if p.height is None else p.height,
            seed=sample.seed if p.seed is None else p.seed,
            steps=sample.steps if p.steps is None else p.steps,
            guidance=sample.guidance if p.guidance is None else p.guidance,
        )
        for p in sample.prompts
    )


SCHEMA = Schema(root=Config, field_rules=FIELD_RULES, shorthands={SamplePrompt: "prompt"})
