"""One rank of the tensor-parallel check in tests/test_families.py (run two of these).

    MLX_RANK=r MLX_HOSTFILE=hosts.json python tests/distributed_worker.py SEED OUT_DIR FAMILY...

Joins MLX's ring group, and for each family builds the tiny random model from SEED (the same
weights on every rank), runs it unsharded, then twice sharded with `model.shard(group)`: once
patched before sharding, once after. Writes OUT_DIR/rank<r>.npz with the logits of each run
(a prompt call and a cached prefill + token-by-token decode) and OUT_DIR/rank<r>.json with what
the sharded layers are (class, heads per rank).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # family_models
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # mlx_gdn from this tree

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

import mlx_gdn  # noqa: E402
from family_models import gdn_layers, prompt_and_decode, tiny_model, tokens  # noqa: E402
from mlx_gdn.models.layers import DropInLayer  # noqa: E402


def heads(layer) -> int:
    return getattr(layer, "num_v_heads", None) or layer.num_heads


def main() -> None:
    seed, out_dir, families = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    group = mx.distributed.init(backend="ring", strict=True)
    rank = group.rank()
    arrays, facts = {}, {"size": group.size(), "rank": rank}
    toks = tokens(seed, (2, 9))
    for family in families:
        full, steps = prompt_and_decode(tiny_model(family, seed), toks, 5)
        arrays[f"{family}/ref/full"], arrays[f"{family}/ref/steps"] = full, steps
        for order in ("before", "after"):
            model = tiny_model(family, seed)
            unsharded_heads = [heads(l) for l in gdn_layers(model)]
            if order == "before":
                report = mlx_gdn.patch(model)
                model.shard(group)
            else:
                model.shard(group)
                report = mlx_gdn.patch(model)
            layers = gdn_layers(model)
            facts[f"{family}/{order}"] = dict(
                report=dict(report.items()),
                drop_ins=[isinstance(l, DropInLayer) for l in layers],
                heads=[heads(l) for l in layers],
                unsharded_heads=unsharded_heads,
            )
            full, steps = prompt_and_decode(model, toks, 5)
            arrays[f"{family}/{order}/full"], arrays[f"{family}/{order}/steps"] = full, steps
    mx.eval(list(arrays.values()))
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **{k: np.asarray(v) for k, v in arrays.items()})
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(facts, f)


if __name__ == "__main__":
    main()
