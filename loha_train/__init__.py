"""loha-train: fine-tune Stable Diffusion with LoHa adapters and export LyCORIS-compatible files."""

__version__ = "0.2.0"
