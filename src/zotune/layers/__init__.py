"""Kernels and layers below the model: the packed batch, varlen attention, few-row linear, fused add+LayerNorm.

Each Triton kernel sits beside its torch reference. Nothing here imports the model or the engine."""
