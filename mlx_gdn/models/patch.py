"""`patch` and `unpatch`: put mlx-gdn's gated delta rule into a loaded mlx-lm model, in place.

Two ways in. Layers of the families mlx-gdn knows are swapped for the drop-in classes of
`mlx_gdn.models.layers` (per layer: own backend, pad-proof, the Qwen layers' fused T=1 step).
Any other model whose layer classes live in a module that imported mlx-lm's
``gated_delta_update`` by name gets that module's binding swapped for an adapter calling
`mlx_gdn.gated_delta_update`: a family added to mlx-lm later is accelerated as it is.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from typing import Dict, Iterator, List, Tuple

import mlx.nn as nn

from .. import api
from ..validate import BACKENDS, check_choice
from .layers import (
    BailingKDA,
    DropInLayer,
    GatedDeltaNet,
    KimiDeltaAttention,
    KimiK3DeltaAttention,
    OlmoHybridGatedDeltaNet,
    Qwen3NextGatedDeltaNet,
)

DROP_INS = (GatedDeltaNet, Qwen3NextGatedDeltaNet, KimiDeltaAttention, KimiK3DeltaAttention, BailingKDA,
            OlmoHybridGatedDeltaNet)
BINDING = "gated_delta_update"


class PatchReport(int):
    """What one `patch` (or `unpatch`) call changed: an int, the number of layers it replaced, that
    also maps family -> layers (``report["qwen3_5"]``, ``report.items()``, ``report.families``).

    Families are mlx-lm model module names ("qwen3_5_moe", "kimi_linear", ...); a module whose
    ``gated_delta_update`` binding was swapped reports as "module:<module name>" with the number
    of layers whose class calls it.
    """

    def __new__(cls, families: Dict[str, int]):
        self = super().__new__(cls, sum(families.values()))
        self.families = dict(families)
        return self

    @property
    def total(self) -> int:
        return int(self)

    def __getitem__(self, family: str) -> int:
        return self.families[family]

    def __contains__(self, family: str) -> bool:
        return family in self.families

    def get(self, family: str, default=None):
        return self.families.get(family, default)

    def keys(self):
        return self.families.keys()

    def items(self):
        return self.families.items()

    def __repr__(self) -> str:
        return f"PatchReport({int(self)}, {self.families!r})"

    def __str__(self) -> str:  # printed and formatted as the int it is
        return str(int(self))


def _import_mlx_lm(what: str):
    try:
        return importlib.import_module(what)
    except ImportError as e:
        if not importlib.util.find_spec("mlx_lm"):
            raise ImportError(
                "mlx_gdn.patch needs mlx-lm to recognise its layers; install it with "
                "`pip install 'mlx-gdn[mlx-lm]'` (or `pip install mlx-lm`)"
            ) from e
        return None


def _replacements() -> Dict[type, type]:
    """mlx-lm layer class -> drop-in class, for the families this mlx-lm has.
    Qwen3.5-MoE reuses Qwen3.5's layer class."""
    table = {}
    for cls in DROP_INS:
        module, name = cls.MLX_LM_CLASS.split(":")
        mod = _import_mlx_lm(f"mlx_lm.models.{module}")
        if mod is not None and hasattr(mod, name):
            table[getattr(mod, name)] = cls
    return table


def _mlx_lm_update():
    return _import_mlx_lm("mlx_lm.models.gated_delta").gated_delta_update


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


def _put(container, key, new) -> None:
    if isinstance(container, nn.Module):
        setattr(container, key, new)
    elif isinstance(container, tuple):
        raise TypeError(f"cannot replace a gated delta layer held in a tuple (at key {key!r})")
    else:
        container[key] = new


def _family(model: nn.Module, layer: nn.Module) -> str:
    """The mlx-lm model module's short name ("qwen3_5_moe"), else the layer class's module's."""
    where = type(model).__module__
    if not where.startswith("mlx_lm.models."):
        where = type(layer).__module__
    return where.rsplit(".", 1)[-1]


def _family_of_drop_in(model: nn.Module, layer: DropInLayer) -> str:
    where = type(model).__module__
    if where.startswith("mlx_lm.models."):
        return where.rsplit(".", 1)[-1]
    return layer.MLX_LM_CLASS.split(":")[0]


# --------------------------------------------------------------------------------------------
# The binding swap for families without a drop-in


class _Binding:
    """Stands in for mlx-lm's ``gated_delta_update`` in a model module: same call, runs
    `mlx_gdn.gated_delta_update` on ``backend``, the ops path where
    the caller passes ``use_kernel=False`` (as mlx-lm's layers do in training)."""

    def __init__(self, original, backend: str):
        self.original = original
        self.backend = backend

    def __call__(self, q, k, v, a, b, A_log, dt_bias, state=None, mask=None, *, use_kernel=True,
                 lower_bound=None, allow_neg_eigval=False):
        return api.gated_delta_update(q, k, v, a, b, A_log, dt_bias, state, mask, lower_bound=lower_bound,
                                      allow_neg_eigval=allow_neg_eigval, backend=self.backend if use_kernel else "ops")


def _calls_binding(cls: type) -> bool:
    """Whether a method of `cls` (or of a base defined in the same module) names the binding."""
    for base in cls.__mro__:
        if base.__module__ != cls.__module__:
            continue
        for fn in vars(base).values():
            code = getattr(fn, "__code__", None)
            if code is not None and BINDING in code.co_names:
                return True
    return False


def _binding_modules(model: nn.Module, children: List[nn.Module], known: set) -> Dict[str, List[nn.Module]]:
    """Module name -> layers whose class calls its binding, for every module (the model's, each
    submodule class's) holding mlx-lm's ``gated_delta_update`` or our stand-in, except known families'."""
    original = _mlx_lm_update()
    found: Dict[str, List[nn.Module]] = {}
    for obj in [model] + children:
        name = type(obj).__module__
        if name in known:
            continue
        mod = sys.modules.get(name)
        fn = getattr(mod, BINDING, None)
        if fn is not original and not isinstance(fn, _Binding):
            continue
        layers = found.setdefault(name, [])
        if obj is not model and _calls_binding(type(obj)):
            layers.append(obj)
    return found


# --------------------------------------------------------------------------------------------


def patch(model: nn.Module, backend: str = "auto") -> PatchReport:
    """Put mlx-gdn's gated delta rule into an mlx-lm model, in place.

    Layers of qwen3_5, qwen3_5_moe, qwen3_next, kimi_linear, kimi_k3, bailing_moe_v3 and
    olmo_hybrid models are replaced by the drop-in classes of `mlx_gdn.models.layers`, which keep
    the original submodules and arrays (quantized projections stay quantized), training mode,
    frozen parameters and sharding. Any other model whose layer module imported mlx-lm's
    ``gated_delta_update`` by name has that binding swapped for `mlx_gdn.gated_delta_update`
    (this affects every model built from that module; `unpatch` restores it).
    ``backend`` ("auto", "metal", "cuda", "ops") is the backend passed to `gated_delta_update`.

    Returns a `PatchReport`: an int, the number of layers replaced by this call, mapping family ->
    layers. Calling it again replaces nothing (returns 0) and only sets the backend of what is
    already patched. On a model with no gated delta layers it warns and returns 0.
    """
    check_choice("backend", backend, BACKENDS)
    table = _replacements()
    known = {cls.__module__ for cls in table}
    families: Dict[str, int] = {}
    already = 0
    slots = list(_slots(model))
    for container, key, child in slots:
        if isinstance(child, DropInLayer):
            child.backend = backend
            already += 1
            continue
        new_cls = table.get(type(child))
        if new_cls is None:
            continue
        _put(container, key, new_cls.from_layer(child, backend))
        fam = _family(model, child)
        families[fam] = families.get(fam, 0) + 1
    for name, layers in _binding_modules(model, [c for _, _, c in slots], known).items():
        mod = sys.modules[name]
        fn = getattr(mod, BINDING)
        if isinstance(fn, _Binding):
            fn.backend = backend
            already += 1
            continue
        setattr(mod, BINDING, _Binding(fn, backend))
        families[f"module:{name}"] = len(layers)
    if not families and already == 0:
        warnings.warn(
            f"mlx_gdn.patch: {type(model).__name__} has no gated delta layers (mlx-lm qwen3_5, "
            "qwen3_5_moe, qwen3_next, kimi_linear, kimi_k3, bailing_moe_v3, olmo_hybrid, nor a layer "
            "module importing mlx-lm's gated_delta_update); nothing was replaced",
            stacklevel=2,
        )
    return PatchReport(families)


def unpatch(model: nn.Module) -> PatchReport:
    """Undo `patch` on `model`, in place: drop-in layers go back to their mlx-lm classes (same
    submodules and arrays) and swapped module bindings back to mlx-lm's ``gated_delta_update``.
    Returns a `PatchReport` of what it restored."""
    families: Dict[str, int] = {}
    slots = list(_slots(model))
    for container, key, child in slots:
        if isinstance(child, DropInLayer):
            _put(container, key, child.to_mlx_lm())
            fam = _family_of_drop_in(model, child)
            families[fam] = families.get(fam, 0) + 1
    for obj in [model] + [c for _, _, c in slots]:
        name = type(obj).__module__
        fn = getattr(sys.modules.get(name), BINDING, None)
        if isinstance(fn, _Binding):
            setattr(sys.modules[name], BINDING, fn.original)
            families[f"module:{name}"] = sum(
                1 for _, _, c in slots if type(c).__module__ == name and _calls_binding(type(c)))
    return PatchReport(families)
