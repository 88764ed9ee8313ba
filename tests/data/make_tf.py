"""Writes the TensorFlow fixtures of tests/data: tiny GPT-2s in the layout of OpenAI's TensorFlow release.

    pip install tensorflow-cpu && python tests/data/make_tf.py    # (tensorflow 2.21.0 wrote the files)

openai_tf/: model.ckpt.* and hparams.json as OpenAI's download_model.py fetches them (names and shapes as in its
model.py: conv1d weights [1, in, out], LayerNorm g/b, tied wte), with as many layers as gpt2.
tf_finetuned/: a one-layer model after one Adam step, saved by TF's Saver as a fine-tuning run (gpt-2-simple)
saves it: model-1.* with global_step, beta1_power/beta2_power and the Adam slots, and the `checkpoint` file that
names the latest checkpoint by its absolute path on the machine that wrote it.
Each values.npz holds the model's arrays as numpy has them, for tests to compare against without TensorFlow.
"""

import json
from pathlib import Path

import numpy as np
import tensorflow as tf

DATA = Path(__file__).resolve().parent
V, T, C, H = 64, 16, 8, 2


def tensors(n_layer: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model/wte": (V, C), "model/wpe": (T, C), "model/ln_f/g": (C,), "model/ln_f/b": (C,)}
    for i in range(n_layer):
        p = f"model/h{i}/"
        shapes.update({p + "ln_1/g": (C,), p + "ln_1/b": (C,), p + "attn/c_attn/w": (1, C, 3 * C),
                       p + "attn/c_attn/b": (3 * C,), p + "attn/c_proj/w": (1, C, C), p + "attn/c_proj/b": (C,),
                       p + "ln_2/g": (C,), p + "ln_2/b": (C,), p + "mlp/c_fc/w": (1, C, 4 * C),
                       p + "mlp/c_fc/b": (4 * C,), p + "mlp/c_proj/w": (1, 4 * C, C), p + "mlp/c_proj/b": (C,)})
    return shapes


def write(out: Path, n_layer: int, adam_steps: int, seed: int) -> None:
    out.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    values = {name: (0.5 * rng.normal(size=shape)).astype(np.float32) for name, shape in tensors(n_layer).items()}
    with tf.Graph().as_default():
        variables = [tf.compat.v1.get_variable(name, initializer=value) for name, value in values.items()]
        if adam_steps:
            step = tf.compat.v1.train.get_or_create_global_step()
            loss = tf.add_n([tf.reduce_sum(tf.sin(v)) for v in variables])
            train = tf.compat.v1.train.AdamOptimizer(1e-2).minimize(loss, global_step=step)
        saver = tf.compat.v1.train.Saver(None if adam_steps else variables)  # None: every variable
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            for _ in range(adam_steps):
                session.run(train)
            values = dict(zip(values, session.run(variables)))
            if adam_steps:
                saver.save(session, str(out / "model"), global_step=step, write_meta_graph=False)
            else:
                saver.save(session, str(out / "model.ckpt"), write_meta_graph=False)
                (out / "checkpoint").unlink()
    np.savez(out / "values.npz", **values)
    hparams = {"n_vocab": V, "n_ctx": T, "n_embd": C, "n_head": H, "n_layer": n_layer}
    (out / "hparams.json").write_text(json.dumps(hparams))


if __name__ == "__main__":
    write(DATA / "openai_tf", n_layer=12, adam_steps=0, seed=0)
    write(DATA / "tf_finetuned", n_layer=1, adam_steps=1, seed=1)
