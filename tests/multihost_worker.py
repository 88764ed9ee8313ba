"""One process of a CPU multi-process training run, started by tests/test_multihost.py.

    python tests/multihost_worker.py --devices=2 --mesh=data:2,fsdp:2 --start=0 --stop=2 --ckpt=DIR --save \
        --out=OUT.json --coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=I [--sample]

Trains steps [start, stop) of a tiny model on the global batches every process can regenerate, but each
process only slices out and feeds its own rows. With start > 0 it resumes from the orbax checkpoint in DIR
(onto --mesh, whatever mesh wrote it); with --save it saves at `stop`; with --sample it decodes greedily with
sampling.generate from the sharded parameters. Process 0 alone writes OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, required=True, help="CPU devices of this process")
    p.add_argument("--mesh", required=True)
    p.add_argument("--start", type=int, required=True)
    p.add_argument("--stop", type=int, required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--save", action="store_true")
    p.add_argument("--sample", action="store_true", help="also decode greedily with sampling.generate")
    p.add_argument("--out", required=True)
    p.add_argument("--coordinator_address")
    p.add_argument("--num_processes", type=int)
    p.add_argument("--process_id", type=int)
    return p.parse_args()


ARGS = parse_args()
# Before jax is imported: this process's device count, and the cheapest XLA backend optimisation (fast compiles).
os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={ARGS.devices}"
                           " --xla_backend_optimization_level=0")
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from gpt2_jax import sharding as sh  # noqa: E402
from gpt2_jax.config import ModelConfig, TrainConfig  # noqa: E402
from gpt2_jax.sampling import generate  # noqa: E402

MODEL = ModelConfig.from_preset("tiny", vocab_size=500, pad_vocab_to=64)
TRAIN = TrainConfig(batch_size=8, gradient_accumulation_steps=1, warmup_iters=1, learning_rate=1e-3, eps=1e-6)
SEQ = 32


def global_batch(step: int):
    """The whole batch of a step; every process can rebuild it, and each feeds only its rows."""
    rng = np.random.default_rng(1000 + step)
    tokens = rng.integers(0, MODEL.vocab_size, size=(1, TRAIN.batch_size, SEQ + 1), dtype=np.int32)
    return tokens[..., :-1], tokens[..., 1:]


def main() -> None:
    sh.initialize_distributed(ARGS.coordinator_address, ARGS.num_processes, ARGS.process_id)
    mesh = sh.make_mesh(ARGS.mesh)
    rows = sh.process_batch_rows(mesh, TRAIN.batch_size)
    print(f"process {jax.process_index()}/{jax.process_count()} devices {len(jax.local_devices())}"
          f"/{jax.device_count()} rows {rows.start}:{rows.stop}", flush=True)
    rng = jax.random.PRNGKey(0)
    manager = ocp.CheckpointManager(Path(ARGS.ckpt).absolute())
    if ARGS.start:
        state = manager.restore(ARGS.start, args=ocp.args.StandardRestore(sh.abstract_state(MODEL, TRAIN, mesh)))
    else:
        state = sh.create_sharded_state(MODEL, TRAIN, mesh, rng)
    step = sh.make_sharded_train_step(MODEL, TRAIN, mesh)
    losses = []
    for i in range(ARGS.start, ARGS.stop):
        x, y = global_batch(i)
        xs, ys = (sh.host_local_to_global(a[:, rows], mesh, TRAIN.batch_size) for a in (x, y))
        state, metrics = step(state, xs, ys, rng)
        losses.append(float(metrics["loss"]))  # a replicated scalar: every process can read it
    if ARGS.save:
        manager.save(ARGS.stop, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    manager.close()
    wte = state.params["wte"]
    # The first row of wte, gathered to every process, lets the test compare parameters across runs.
    wte_row = np.asarray(jax.jit(lambda w: w[0], out_shardings=sh.replicated(mesh))(wte)).tolist()
    tokens = None
    if ARGS.sample:
        tokens = generate(MODEL, state.params, [[1, 2, 3], [4, 5]], max_new_tokens=6, top_k=1, stop_tokens=())
    if sh.is_main_process():
        Path(ARGS.out).write_text(json.dumps({
            "losses": losses, "step": int(state.step), "wte_row": wte_row, "wte_spec": str(wte.sharding.spec),
            "tokens": tokens, "process_count": jax.process_count(), "device_count": jax.device_count()}))


if __name__ == "__main__":
    main()
