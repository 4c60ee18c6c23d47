"""Drop-in layers for mlx-lm models, and `patch` / `unpatch`, which put them into a loaded model."""

from .layers import (
    BailingKDA,
    GatedDeltaNet,
    KimiDeltaAttention,
    KimiK3DeltaAttention,
    OlmoHybridGatedDeltaNet,
    Qwen3NextGatedDeltaNet,
    RMSNormGated,
)
from .patch import PatchReport, patch, unpatch

__all__ = [
    "GatedDeltaNet",
    "Qwen3NextGatedDeltaNet",
    "KimiDeltaAttention",
    "KimiK3DeltaAttention",
    "BailingKDA",
    "OlmoHybridGatedDeltaNet",
    "RMSNormGated",
    "PatchReport",
    "patch",
    "unpatch",
]
