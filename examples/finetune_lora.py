"""LoRA fine-tuning of tiny random mlx-lm models with mlx-lm's own trainer, patched and unpatched.

    python examples/finetune_lora.py                      # 20 steps, bfloat16, every model
    python examples/finetune_lora.py --steps 3 --dtype float32 --models qwen3_5
    python examples/finetune_lora.py --models qwen3_5_9b --steps 4 --batch 1 --length 1024 \
        --lora-layers 16 --no-f32                        # a Qwen3.5-9B shape, on a GPU

For each model: LoRA adapters on its last layers (`mlx_lm.tuner.linear_to_lora_layers`), then
`mlx_lm.tuner.trainer.train` (the loop `mlx_lm.lora` runs) on the same token batches, once with
mlx-lm's own Gated DeltaNet layers and once with them replaced by `mlx_gdn.patch` (whose training
gradients come from the package's chunked backward). The loss curves must agree within the dtype's
tolerance (in bfloat16, against a float32 run: see `run_model`); prints tokens per second and peak
memory of both runs.

Models are entries of MODELS: a builder of a tiny random model. An entry whose layers
`mlx_gdn.patch` does not replace (it patches none) is reported and skipped.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import warnings
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

import mlx_gdn

VOCAB = 256


def _finish(model, dtype):
    """Weights in `dtype` except A_log (as mlx-lm's loader keeps it), evaluated, eval mode."""
    if dtype != mx.float32:
        params = [(k, v if k.endswith("A_log") else v.astype(dtype)) for k, v in tree_flatten(model.parameters())]
        model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    model.eval()
    return model


def tiny_qwen3_5(dtype):
    """Qwen3.5: 3 Gated DeltaNet layers and 1 attention layer."""
    from mlx_lm.models import qwen3_5

    text = dict(
        model_type="qwen3_5_text", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=32,
        linear_value_head_dim=16, linear_conv_kernel_dim=4, full_attention_interval=4,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    return _finish(qwen3_5.Model(qwen3_5.ModelArgs.from_dict(dict(model_type="qwen3_5", text_config=text))), dtype)


def tiny_kimi_linear(dtype):
    """Kimi Linear: 3 Kimi Delta Attention layers (per-key gates) and 1 MLA attention layer; dense
    MLPs only (MLX's CPU gather-matmul of the experts takes float32 only)."""
    from mlx_lm.models import kimi_linear

    args = dict(
        model_type="kimi_linear", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, intermediate_size=128, head_dim=16,
        rope_theta=10000.0, rms_norm_eps=1e-6, model_max_length=512,
        linear_attn_config=dict(kda_layers=[1, 2, 3], full_attn_layers=[4], num_heads=2, head_dim=32,
                                short_conv_kernel_size=4),
        num_experts=4, num_experts_per_token=2, moe_intermediate_size=32, num_shared_experts=1,
        first_k_dense_replace=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    )
    return _finish(kimi_linear.Model(kimi_linear.ModelArgs.from_dict(args)), dtype)


def qwen3_5_9b(dtype):
    """Qwen3.5-9B's shape with random weights: 32 layers (24 Gated DeltaNet, 8 attention), hidden
    4096, linear heads Hk=16, Hv=32, Dk=Dv=128, its 248,320-token vocabulary. For a GPU."""
    from mlx_lm.models import qwen3_5

    text = dict(
        model_type="qwen3_5_text", hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
        num_attention_heads=16, num_key_value_heads=4, head_dim=256, vocab_size=248320,
        linear_num_value_heads=32, linear_num_key_heads=16, linear_key_head_dim=128,
        linear_value_head_dim=128, linear_conv_kernel_dim=4, full_attention_interval=4,
        rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=32768,
    )
    return _finish(qwen3_5.Model(qwen3_5.ModelArgs.from_dict(dict(model_type="qwen3_5", text_config=text))), dtype)


MODELS = {"qwen3_5": tiny_qwen3_5, "kimi_linear": tiny_kimi_linear, "qwen3_5_9b": qwen3_5_9b}
# What runs without --models: the tiny ones (the 9B shape needs a GPU's memory).
DEFAULT_MODELS = ("qwen3_5", "kimi_linear")
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


def dataset(n: int, length: int, seed: int):
    """Token sequences with structure to learn (runs of arithmetic progressions), as the trainer
    takes them: (tokens, offset) pairs."""
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(n):
        start, step = rng.integers(0, VOCAB), rng.integers(1, 8)
        data.append(((start + step * np.arange(length)) % VOCAB).tolist())
    return [(d, 0) for d in data]


class Recorder:
    """The trainer's callback: each step's loss, tokens per second and peak memory."""

    def __init__(self):
        self.losses, self.tokens_per_s, self.peak_gb = [], [], 0.0

    def on_train_loss_report(self, info):
        self.losses.append(info["train_loss"])
        self.tokens_per_s.append(info["tokens_per_second"])
        self.peak_gb = max(self.peak_gb, info["peak_memory"])

    def on_val_loss_report(self, info):
        pass


def finetune(model, data, steps: int, batch: int, seed: int, adapter_file: Path) -> Recorder:
    """`steps` steps of mlx-lm's trainer on `data` (fixed batch order) with Adam; returns the record."""
    from mlx_lm.tuner.trainer import TrainingArgs, iterate_batches, train

    mx.random.seed(seed)
    mx.reset_peak_memory()
    args = TrainingArgs(
        batch_size=batch, iters=steps, steps_per_report=1, steps_per_eval=10**9, steps_per_save=10**9,
        max_seq_length=2048, adapter_file=str(adapter_file),
    )
    rec = Recorder()
    train(
        model, optim.Adam(learning_rate=2e-3), data, None, args=args,
        iterate_batches=partial(iterate_batches, seed=seed), training_callback=rec,
    )
    return rec


def lora_model(name: str, dtype: str, lora_layers: int, seed: int):
    """The tiny model `name` in `dtype` with frozen weights and LoRA adapters, drawn from `seed`."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(seed)
    model = MODELS[name](getattr(mx, dtype))
    model.freeze()
    linear_to_lora_layers(model, lora_layers, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    mx.eval(model.parameters())
    return model


def run_model(name: str, steps: int, batch: int, length: int, dtype: str, lora_layers: int, seed: int,
              f32_reference: bool = True, json_out=None) -> bool:
    """Train one model unpatched and patched; print the curves; True when they agree.

    float32: the two curves within 1e-4 of each other at every step. bfloat16: the runs drift
    apart as training goes on (each rounds differently, and the updates compound it), so each is
    compared with a float32 run of the unpatched model instead: the patched curve must be within
    2e-2 of it at every step, or no further from it than mlx-lm's own bfloat16 curve is.
    Without `f32_reference` (a model too big to train twice more) the bfloat16 curves are compared
    with each other, within 2e-2. `json_out`: a list the run's record is appended to.
    """
    base = lora_model(name, dtype, lora_layers, seed)
    patched = copy.deepcopy(base)  # the same weights and the same LoRA initialisation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a model without layers to replace is reported below
        n = mlx_gdn.patch(patched)
    if n == 0:
        print(f"{name}: mlx_gdn.patch replaces none of this model's layers in this version; skipped")
        return True
    trainable = sum(v.size for _, v in tree_flatten(base.trainable_parameters()))
    data = dataset(4 * batch, length, seed)
    with tempfile.TemporaryDirectory() as tmp:
        ref = finetune(base, data, steps, batch, seed, Path(tmp) / "ref.safetensors")
        new = finetune(patched, data, steps, batch, seed, Path(tmp) / "new.safetensors")
        f32 = None
        if dtype != "float32" and f32_reference:
            f32 = finetune(lora_model(name, "float32", lora_layers, seed), data, steps, batch, seed, Path(tmp) / "f32.safetensors")
    print(f"\n{name} ({dtype}, {n} layers patched, {trainable} trainable LoRA parameters, batch {batch} x {length} tokens)")
    truth = f32.losses if f32 else ref.losses
    rel = lambda a, b: abs(a - b) / abs(b)  # noqa: E731
    head = f"{'step':>4} {'mlx-lm loss':>12} {'patched loss':>13}"
    print(head + (f" {'mlx-lm f32':>11} {'mlx-lm vs f32':>14} {'patched vs f32':>15}" if f32 else f" {'rel diff':>9}"))
    for i, (a, b, t) in enumerate(zip(ref.losses, new.losses, truth), 1):
        line = f"{i:>4} {a:>12.5f} {b:>13.5f}"
        print(line + (f" {t:>11.5f} {rel(a, t):>14.1e} {rel(b, t):>15.1e}" if f32 else f" {rel(b, a):>9.1e}"))
    # The first step compiles the training step: its speed is not representative.
    speed = lambda r: np.median(r.tokens_per_s[1:] or r.tokens_per_s)  # noqa: E731
    print(f"tokens/s (median over steps 2..): mlx-lm {speed(ref):.0f}, patched {speed(new):.0f}")
    print(f"peak memory: mlx-lm {ref.peak_gb * 1e3:.1f} MB, patched {new.peak_gb * 1e3:.1f} MB")
    ok = len(ref.losses) == len(new.losses) == len(truth) == steps
    ok = ok and all(np.isfinite(ref.losses + new.losses + truth))
    worst_new = max(rel(b, t) for b, t in zip(new.losses, truth))
    if f32:
        worst_ref = max(rel(a, t) for a, t in zip(ref.losses, truth))
        ok = ok and (worst_new <= TOLERANCE[dtype] or worst_new <= 1.25 * worst_ref)
        what = f"patched {dtype} within {worst_new:.1e} of float32 (mlx-lm {dtype}: {worst_ref:.1e}; bound {TOLERANCE[dtype]:.0e} or 1.25x mlx-lm's)"
    else:
        ok = ok and worst_new <= TOLERANCE[dtype]
        what = f"loss curves agree to {worst_new:.1e} (bound {TOLERANCE[dtype]:.0e})"
    print(f"CHECK {'ok' if ok else 'FAILED'}: {what}")
    if json_out is not None:
        json_out.append(dict(model=name, dtype=dtype, steps=steps, batch=batch, length=length, lora_layers=lora_layers,
                             patched_layers=n, trainable=int(trainable), mlx_lm_loss=ref.losses, patched_loss=new.losses,
                             mlx_lm_tokens_per_s=float(speed(ref)), patched_tokens_per_s=float(speed(new)),
                             mlx_lm_peak_gb=ref.peak_gb, patched_peak_gb=new.peak_gb, check=what, ok=bool(ok)))
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--dtype", choices=sorted(TOLERANCE), default="bfloat16")
    ap.add_argument("--lora-layers", type=int, default=4, help="layers (from the last) given adapters")
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(DEFAULT_MODELS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-f32", action="store_true", help="bfloat16: compare the two bfloat16 curves, no float32 run")
    ap.add_argument("--json", help="write each model's record (losses, tokens/s, peak memory) here")
    a = ap.parse_args()
    records = []
    results = [run_model(m, a.steps, a.batch, a.length, a.dtype, a.lora_layers, a.seed, not a.no_f32, records)
               for m in a.models]
    if a.json:
        from mlx_gdn.bench.env import environment

        with open(a.json, "w") as f:
            json.dump(dict(environment=environment(), command=" ".join(["python"] + sys.argv),
                           runs=records), f, indent=1)
    raise SystemExit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
