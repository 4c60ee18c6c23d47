"""`patch`: swap the Gated DeltaNet layers of a loaded mlx-lm model for mlx-gdn's, in place."""

from __future__ import annotations

import warnings
from typing import Dict, Iterator, Tuple

import mlx.nn as nn

from ..validate import BACKENDS, check_choice
from .layers import GatedDeltaNet, Qwen3NextGatedDeltaNet, _GatedDeltaBase


def _replacements() -> Dict[type, type]:
    """mlx-lm layer class -> drop-in class. Qwen3.5-MoE reuses Qwen3.5's layer class."""
    try:
        from mlx_lm.models import qwen3_5, qwen3_next
    except ImportError as e:
        raise ImportError(
            "mlx_gdn.patch needs mlx-lm to recognise its layers; install it with "
            "`pip install 'mlx-gdn[mlx-lm]'` (or `pip install mlx-lm`)"
        ) from e
    return {
        qwen3_5.GatedDeltaNet: GatedDeltaNet,
        qwen3_next.Qwen3NextGatedDeltaNet: Qwen3NextGatedDeltaNet,
    }


def _slots(module: nn.Module) -> Iterator[Tuple[object, object, nn.Module]]:
    """(container, key, child module) for every module below `module`, depth first.

    The container is a Module (key: attribute name), a list (key: index) or a dict (key).
    """
    stack = [module]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, (nn.Module, dict)) else enumerate(node)
        for key, value in items:
            if isinstance(value, nn.Module):
                yield node, key, value
                stack.append(value)
            elif isinstance(value, (list, tuple, dict)):
                stack.append(value)


def patch(model: nn.Module, backend: str = "auto") -> int:
    """Replace the Gated DeltaNet layers of an mlx-lm model (qwen3_5, qwen3_5_moe, qwen3_next) in place.

    The replacements keep the original submodules and arrays (quantized projections stay
    quantized; other layers are untouched) and the layers' training mode. ``backend`` ("auto",
    "metal", "cuda", "ops") is the backend the layers pass to `gated_delta_update`.
    Returns the number of layers replaced by this call. Calling it again replaces nothing,
    returns 0 and only sets the backend of the already patched layers. On a model without such
    layers it warns and returns 0.
    """
    check_choice("backend", backend, BACKENDS)
    table = _replacements()
    replaced = patched = 0
    for container, key, child in list(_slots(model)):
        if isinstance(child, _GatedDeltaBase):
            child.backend = backend
            patched += 1
            continue
        new_cls = table.get(type(child))
        if new_cls is None:
            continue
        new = new_cls.from_layer(child, backend)
        if isinstance(container, nn.Module):
            setattr(container, key, new)
        elif isinstance(container, tuple):
            raise TypeError(f"cannot replace a Gated DeltaNet layer held in a tuple (at key {key!r})")
        else:
            container[key] = new
        replaced += 1
    if replaced == 0 and patched == 0:
        warnings.warn(
            f"mlx_gdn.patch: {type(model).__name__} has no Gated DeltaNet layers "
            "(mlx-lm qwen3_5, qwen3_5_moe or qwen3_next); nothing was replaced",
            stacklevel=2,
        )
    return replaced
