"""EleutherAI's lm-evaluation-harness on the jitted model: a model class and a command that runs the harness.

    pip install .[eval]
    python -m gpt2_jax.lm_eval --init_from=PATH --tasks=hellaswag,lambada_openai [--batch_size=16] [--limit=N]
        [--num_fewshot=K] [--output=results.json] [--mesh=data:8] [--include_path=my_tasks/]

GPT2JaxLM (registered with the harness as "gpt2-jax") answers the three request types as the harness's own
Hugging Face class (HFLM) does for GPT-2: loglikelihood with its context/continuation split and left truncation to
block_size + 1 tokens, loglikelihood_rolling over the harness's disjoint windows of block_size tokens, and
generate_until greedily with stop strings, through gpt2_jax.sampling. Tasks download their data as usual.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from gpt2_jax import evaluate, sharding
from gpt2_jax.config import DTYPES, ConfigError, FlagParser, ModelConfig, plain_warnings
from gpt2_jax.sampling import Sampler, generate_batch, row_key
from gpt2_jax.tokenizer import EOT_TOKEN, get_tokenizer

EOT_TEXT = "<|endoftext|>"


@register_model("gpt2-jax")
class GPT2JaxLM(TemplateLM):
    """A GPT-2 of this project as an lm-eval model: give init_from (a path convert.load reads) or config + params."""

    def __init__(self, init_from: str | None = None, config: ModelConfig | None = None, params=None,
                 batch_size: int | str = 8, max_gen_toks: int = 256, dtype: str = "float32", mesh: str = "",
                 **harness_args):
        super().__init__()
        unknown = set(harness_args) - {"device", "max_batch_size"}  # the harness passes these to every model
        if unknown:
            raise ValueError(f"GPT2JaxLM: unknown argument(s) {', '.join(sorted(unknown))}")
        if (init_from is None) == (config is None or params is None):
            raise ValueError("GPT2JaxLM needs init_from (a weights path) or config and params, not both")
        if init_from is not None:
            config, params = evaluate.load_model(init_from, dtype)
        self.config = evaluate.check_model(config)
        self.batch_size = int(batch_size)
        self._max_gen_toks = int(max_gen_toks)
        if self.batch_size < 1 or self._max_gen_toks < 1:
            raise ValueError(f"batch_size and max_gen_toks must be >= 1; got {batch_size}, {max_gen_toks}")
        self.mesh = sharding.make_mesh(mesh) if mesh else None
        if self.mesh is not None:
            sharding.check_batch_size(self.mesh, self.batch_size)
            params = sharding.shard_params(self.config, params, self.mesh)
        self.params = params
        self.tokenizer_ = get_tokenizer()

    @property
    def eot_token_id(self) -> int:
        return EOT_TOKEN

    @property
    def max_length(self) -> int:
        return self.config.block_size

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # Hugging Face's GPT-2 tokenizer reads "<|endoftext|>" in text as the token: so does HFLM
        return self.tokenizer_.encode(string, allow_special=True)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer_.decode(tokens)

    def _score_pairs(self, pairs: Sequence[tuple[list[int], list[int]]], disable_tqdm: bool) -> list[tuple]:
        """(sum of log p(continuation), is_greedy) per (context, continuation) of at most block_size + 1 tokens,
        batch_size rows a call, longest first."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        out: list[tuple] = [None] * len(pairs)
        for lo in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm or not sharding.is_main_process(),
                       desc="scoring"):
            ids = order[lo:lo + self.batch_size]
            rows = evaluate.make_rows([pairs[i] for i in ids], self.batch_size, self.max_length)
            logp_R, greedy_R = evaluate.score(self.config, self.params, rows, self.mesh)
            for r, i in enumerate(ids):
                out[i] = (float(logp_R[r]), bool(greedy_R[r]))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = []
        for _, context, continuation in requests:
            if not continuation or len(continuation) > self.max_length:
                raise ValueError(f"a continuation must have 1 to block_size={self.max_length} tokens; got "
                                 f"{len(continuation)}")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]  # HFLM's left truncation
            pairs.append((whole[:-len(continuation)], whole[-len(continuation):]))
        return self._score_pairs(pairs, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, request in enumerate(requests):
            (string,) = request.args
            for window in lm_utils.get_rolling_token_windows(self.tok_encode(string), self.prefix_token_id,
                                                             self.max_length, context_len=1):
                windows.append(lm_utils.make_disjoint_window(window))
                owner.append(i)
        scores = self._score_pairs(windows, disable_tqdm) if windows else []
        totals = np.zeros(len(requests))
        np.add.at(totals, np.asarray(owner, int), [logp for logp, _ in scores])
        return [float(t) for t in totals]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or not sharding.is_main_process(), desc="generating")
        for ids in groups.values():
            kwargs = normalize_gen_kwargs(requests[ids[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=EOT_TEXT)
            n_new = kwargs.pop("max_gen_toks")
            if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0:
                raise ValueError(f"GPT2JaxLM generates greedily; a task asks for sampling ({kwargs})")
            if not 1 <= n_new < self.max_length:
                raise ValueError(f"max_gen_toks {n_new} must be less than the model's block_size {self.max_length}")
            prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - n_new):] or [EOT_TOKEN]
                       for i in ids]
            for i, text in zip(ids, self._generate(prompts, n_new, until)):
                out[i] = text
                bar.update(1)
        bar.close()
        return out

    def _generate(self, prompts: list[list[int]], n_new: int, until: list[str]) -> list[str]:
        """Greedy continuations of prompts, batch_size at a time, cut before the first stop string."""
        def stopped(tokens):
            text = self.tok_decode(tokens)
            return any(stop in text for stop in until)

        texts = []
        for lo in range(0, len(prompts), self.batch_size):
            batch = prompts[lo:lo + self.batch_size]
            done = generate_batch(self.config, self.params, batch, [row_key(0, lo + b) for b in range(len(batch))],
                                  max_new_tokens=n_new, sampler=Sampler(temperature=0.0),
                                  batch_size=self.batch_size, is_finished=stopped)
            texts += [postprocess_generated_text(self.tok_decode(c.tokens), until, None) for c in done]
        return texts


def parse_args(argv: list[str]):
    p = FlagParser(prog="python -m gpt2_jax.lm_eval", description=__doc__)
    p.add_argument("--init_from", required=True, help="a train.py out_dir or a weights file/directory")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. hellaswag,arc_easy")
    p.add_argument("--batch_size", type=evaluate.AT_LEAST_1, default=8)
    p.add_argument("--max_gen_toks", type=evaluate.AT_LEAST_1, default=256, help="new tokens for generate_until tasks")
    p.add_argument("--num_fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="examples per task (or a fraction, < 1)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--mesh", default="", help="shard over this process's devices, e.g. data:8")
    p.add_argument("--include_path", help="a directory of extra task YAML files (lm-eval's --include_path)")
    p.add_argument("--output", help="write the harness's results JSON here")
    args = p.parse_args(argv)
    if not [t for t in args.tasks.split(",") if t.strip()]:
        p.fail("--tasks names no task")
    return args


def main(argv: list[str] | None = None) -> int:
    import lm_eval

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        lm = GPT2JaxLM(args.init_from, batch_size=args.batch_size, max_gen_toks=args.max_gen_toks,
                       dtype=args.dtype, mesh=args.mesh)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(model=lm, tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
                                      num_fewshot=args.num_fewshot, limit=args.limit,
                                      task_manager=TaskManager(include_path=args.include_path))
    if results is None or not sharding.is_main_process():
        return 0
    print(lm_utils.make_table(results))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    plain_warnings()
    sys.exit(main())
