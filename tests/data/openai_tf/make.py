"""Writes this directory's fixture: a tiny GPT-2 in the layout of OpenAI's TensorFlow release, saved by TensorFlow.

    pip install tensorflow-cpu && python tests/data/openai_tf/make.py    # (tensorflow 2.21.0 wrote the files here)

model.ckpt.* and hparams.json are what OpenAI's download_model.py fetches (names and shapes as in its model.py:
conv1d weights [1, in, out], LayerNorm g/b, tied wte), with as many layers as gpt2.
values.npz holds the same arrays as numpy wrote them, for tests to compare against without TensorFlow.
"""

import json
from pathlib import Path

import numpy as np
import tensorflow as tf

HERE = Path(__file__).resolve().parent
V, T, C, H, L = 64, 16, 8, 2, 12


def tensors() -> dict[str, tuple[int, ...]]:
    shapes = {"model/wte": (V, C), "model/wpe": (T, C), "model/ln_f/g": (C,), "model/ln_f/b": (C,)}
    for i in range(L):
        p = f"model/h{i}/"
        shapes.update({p + "ln_1/g": (C,), p + "ln_1/b": (C,), p + "attn/c_attn/w": (1, C, 3 * C),
                       p + "attn/c_attn/b": (3 * C,), p + "attn/c_proj/w": (1, C, C), p + "attn/c_proj/b": (C,),
                       p + "ln_2/g": (C,), p + "ln_2/b": (C,), p + "mlp/c_fc/w": (1, C, 4 * C),
                       p + "mlp/c_fc/b": (4 * C,), p + "mlp/c_proj/w": (1, 4 * C, C), p + "mlp/c_proj/b": (C,)})
    return shapes


def main() -> None:
    rng = np.random.default_rng(0)
    values = {name: (0.5 * rng.normal(size=shape)).astype(np.float32) for name, shape in tensors().items()}
    graph = tf.Graph()
    with graph.as_default():
        variables = [tf.compat.v1.get_variable(name, initializer=value) for name, value in values.items()]
        saver = tf.compat.v1.train.Saver(variables)  # what OpenAI's release was written with (TF 1's Saver, V2 format)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, str(HERE / "model.ckpt"), write_meta_graph=False)
    (HERE / "checkpoint").unlink(missing_ok=True)
    np.savez(HERE / "values.npz", **values)
    (HERE / "hparams.json").write_text(json.dumps({"n_vocab": V, "n_ctx": T, "n_embd": C, "n_head": H, "n_layer": L}))


if __name__ == "__main__":
    main()
