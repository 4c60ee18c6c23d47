"""Drop-in layers for mlx-lm models and `patch`, which swaps them into a loaded model."""

from .layers import GatedDeltaNet, Qwen3NextGatedDeltaNet, RMSNormGated
from .patch import patch

__all__ = ["GatedDeltaNet", "Qwen3NextGatedDeltaNet", "RMSNormGated", "patch"]
