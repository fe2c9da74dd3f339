"""The LoHa adapter: pure maths, fused kernels, matrix products, layers and injection (no files, no accelerate)."""
