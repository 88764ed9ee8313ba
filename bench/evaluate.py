"""HellaSwag scoring speed on this CPU: ours (gpt2_jax.evaluate) against the same scoring in PyTorch.

gpt2 124M with random weights, a synthetic set in HellaSwag's shape (contexts of 30 to 90 tokens, endings of 10 to
40), batch_size examples (4 rows each) a batch. Both score the same batches: gpt2_jax.evaluate.batch_order, and
torch on transformers' GPT2LMHeadModel (the Hugging Face export of the same weights) as llm.c's hellaswag.py does:
each batch right-padded to its own longest row, logits at every position, cross entropy of the ending tokens.
Ours pads to gpt2_jax.evaluate's length buckets, reads each context once into a KV cache that its four endings
attend to, and computes logits at the ending positions only. Both use the same number of threads. Compilation is timed apart (a first pass); then each side scores the set `repeats` times,
alternating, and the best pass counts. Prints one JSON line last.

    python bench/evaluate.py [--examples=48] [--batch_size=8] [--repeats=2]   # about 5 minutes on 2 cores
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from flags import parse_flags  # noqa: E402  (bench/flags.py)
from gpt2_jax import convert, evaluate  # noqa: E402
from gpt2_jax.config import ModelConfig  # noqa: E402
from gpt2_jax.model import init_params  # noqa: E402
from gpt2_jax.tokenizer import get_tokenizer  # noqa: E402

DEFAULTS = {"examples": 48, "batch_size": 8, "repeats": 2, "seed": 0}


def synthetic_examples(n: int, seed: int) -> list[evaluate.Example]:
    """n examples of HellaSwag's lengths, made of random ordinary token ids (decodable text is not needed)."""
    rng = np.random.default_rng(seed)
    n_vocab = get_tokenizer().n_vocab - 1  # no <|endoftext|>
    examples = []
    for i in range(n):
        context = tuple(int(t) for t in rng.integers(0, n_vocab, rng.integers(30, 91)))
        endings = tuple(tuple(int(t) for t in rng.integers(0, n_vocab, rng.integers(10, 41)))
                        for _ in range(evaluate.N_ENDINGS))
        examples.append(evaluate.Example(i + 1, context, endings, int(rng.integers(0, evaluate.N_ENDINGS))))
    return examples


def torch_losses(model, examples, batch_size: int) -> np.ndarray:
    """[N, 4] summed ending losses, scored as llm.c's hellaswag.py does, over batch_order's batches."""
    loss_N4 = np.zeros((len(examples), evaluate.N_ENDINGS))
    for ids in evaluate.batch_order(examples, batch_size):
        rows = [(examples[i].context, e) for i in ids for e in examples[i].endings]
        T = max(len(c) + len(e) for c, e in rows)
        tokens = torch.zeros((len(rows), T), dtype=torch.long)
        mask = torch.zeros((len(rows), T))
        for r, (c, e) in enumerate(rows):
            tokens[r, :len(c) + len(e)] = torch.tensor(c + e)
            mask[r, len(c):len(c) + len(e)] = 1
        with torch.inference_mode():
            logits = model(tokens).logits
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(),
                                                       reduction="none").view(len(rows), T - 1)
            loss_R = (losses * mask[:, 1:]).sum(1)
        loss_N4[ids] = loss_R.double().numpy().reshape(-1, evaluate.N_ENDINGS)
    return loss_N4


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str]) -> None:
    flags = parse_flags(argv, DEFAULTS)
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    cfg = ModelConfig()  # gpt2 124M
    params = init_params(cfg, jax.random.PRNGKey(flags["seed"]))
    with tempfile.TemporaryDirectory() as tmp:
        convert.export_hf(cfg, params, tmp)
        import transformers

        model = transformers.GPT2LMHeadModel.from_pretrained(tmp, attn_implementation="sdpa").eval()
    examples = synthetic_examples(flags["examples"], flags["seed"])
    B = flags["batch_size"]

    def ours():
        return evaluate.candidate_losses(cfg, params, examples, B)[0]

    compile_s, first = timed(ours)
    torch_first_s, reference = timed(lambda: torch_losses(model, examples, B))
    ours_s, torch_s = [], [torch_first_s]
    for _ in range(flags["repeats"]):
        ours_s.append(timed(ours)[0])
        torch_s.append(timed(lambda: torch_losses(model, examples, B))[0])
    n = len(examples)
    result = {"ours_examples_per_s": n / min(ours_s), "torch_examples_per_s": n / min(torch_s),
              "ratio": min(torch_s) / min(ours_s), "examples": n, "batch_size": B, "threads": threads,
              "ours_first_pass_s": compile_s, "max_abs_loss_diff": float(np.max(np.abs(first - reference))),
              "same_acc_picks": bool((np.argmin(first, 1) == np.argmin(reference, 1)).all()),
              "device": jax.devices()[0].device_kind, "torch": torch.__version__, "jax": jax.__version__}
    print(f"ours {result['ours_examples_per_s']:.2f} examples/s, torch {result['torch_examples_per_s']:.2f} "
          f"examples/s: ratio {result['ratio']:.2f} (gpt2 124M, {n} examples, batch {B}, {threads} threads; "
          f"first pass with compilation {compile_s:.1f} s; losses differ by at most {result['max_abs_loss_diff']:.1e})")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
