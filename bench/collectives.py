"""What a sharded train step communicates: the collectives of the compiled step, by kind and by per-device shape.

    python bench/collectives.py [--mesh=fsdp:8] [--devices=8] [--n_layer=2] [--n_head=12] [--n_embd=768]
                                [--vocab_size=50304] [--block_size=256] [--batch_size=16] [--scan_unroll=2]

Compiles sharding.make_sharded_train_step on `devices` simulated CPU devices (nothing is run) and lists every
all-reduce, all-gather, reduce-scatter, all-to-all and collective-permute in the partitioned HLO with the
per-device shapes it moves. A layer's ops appear once per layer with scan_unroll = n_layer, once in all with 1.
What to expect: fsdp gathers weights and reduces gradients, tensor all-reduces [B/(data*fsdp), T, C]
activations, and where data * fsdp > 1 no collective holds the whole batch's [batch_size, block_size, ...]
activations (with tensor alone, the whole batch is every device's batch). The last line is JSON.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import flags as flags_module  # bench/flags.py

DEFAULTS = {"mesh": "fsdp:8", "devices": 8, "n_layer": 2, "n_head": 12, "n_embd": 768, "vocab_size": 50304,
            "block_size": 256, "batch_size": 16, "scan_unroll": 2}
def main(flags: dict) -> dict:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={flags['devices']}")
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import jax
    import numpy as np

    from gpt2_jax import sharding
    from gpt2_jax.config import ModelConfig, TrainConfig

    sharding.order_host_collectives()
    cfg = ModelConfig(n_layer=flags["n_layer"], n_head=flags["n_head"], n_embd=flags["n_embd"],
                      vocab_size=flags["vocab_size"], block_size=flags["block_size"], dropout=0.0,
                      scan_unroll=flags["scan_unroll"])
    train_cfg = TrainConfig(batch_size=flags["batch_size"], mesh=flags["mesh"])
    mesh = sharding.make_mesh(flags["mesh"])
    state = sharding.abstract_state(cfg, train_cfg, mesh)
    batch = jax.ShapeDtypeStruct((1, flags["batch_size"], flags["block_size"]), np.int32,
                                 sharding=sharding.batch_sharding(mesh))
    rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=sharding.replicated(mesh))
    step = sharding.make_sharded_train_step(cfg, train_cfg, mesh).lower(state, batch, batch, rng).compile()
    hlo = step.as_text()
    found = sharding.collectives(hlo)
    return {"mesh": flags["mesh"], "counts": {k: sum(v.values()) for k, v in found.items()},
            "shapes": {k: dict(v.most_common()) for k, v in found.items()},
            "whole_batch": sharding.whole_batch_collectives(hlo, flags["batch_size"], flags["block_size"])}


if __name__ == "__main__":
    result = main(flags_module.parse_flags(sys.argv[1:], DEFAULTS))
    print(f"{result['mesh']}: {result['counts']}")
    for kind, shapes in result["shapes"].items():
        print(f"  {kind}:")
        for shape, n in shapes.items():
            print(f"    {n:3d} x {shape[:150]}")
    print(f"collectives of the whole batch's activations: {result['whole_batch'] or 'none'}")
    print(json.dumps(result))
