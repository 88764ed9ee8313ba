"""The decode engine against independent references: transformers' generate and scores, a full forward per token,
and itself at other batch sizes and prompt orders (batch invariance)."""

import functools
import random

import numpy as np
import pytest

from conftest import hf_model, ran_at_full_optimisation, random_params
from gpt2_jax import cpu_kernels, sampling
from gpt2_jax import engine as engine_module
from gpt2_jax.config import ModelConfig
from gpt2_jax.strategies import TOP_K_STATIC
from gpt2_jax.sampling import Engine, Request, Sampler, row_key
from test_sampling import random_prompts, uncached_greedy

GREEDY = Sampler(0.0)


@functools.lru_cache(maxsize=None)
def hf_tiny():
    """A tiny transformers GPT-2 and the same weights in our layout."""
    from test_model import params_from_hf

    cfg = ModelConfig.from_preset("tiny")  # block_size 64
    model = hf_model(cfg, seed=4)
    return cfg, model, params_from_hf(model, cfg)


def requests_of(prompts, limits, sampler=GREEDY, n=1, seed=0):
    return [Request(i, tuple(p), tuple(row_key(seed, (i, j)) for j in range(n)), m, sampler)
            for i, (p, m) in enumerate(zip(prompts, limits))]


def by_id(samples):
    return {(s.request.id, s.index): s for s in samples}


def test_greedy_equals_transformers_generate_and_its_scores():
    torch = pytest.importorskip("torch")
    cfg, model, params = hf_tiny()
    prompts = random_prompts((7, 30, 1, 12, 50), seed=4)
    limits = (20, 3, 14, 9, 15)
    engine = Engine(cfg, params, batch_size=2, stop_tokens=(), logprobs=5, echo=True)
    samples = by_id(engine.run(requests_of(prompts, limits)))
    for i, (prompt, n) in enumerate(zip(prompts, limits)):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
            prompt_logits = model(torch.tensor([prompt])).logits[0]
        sample = samples[i, 0]
        assert sample.tokens == ref.sequences[0, len(prompt):].tolist() and sample.finish_reason == "length"
        logprobs = torch.log_softmax(torch.cat(ref.logits).double(), -1).numpy()  # [n, V]
        np.testing.assert_allclose(sample.logprobs, logprobs[np.arange(n), sample.tokens], atol=2e-5, rtol=0)
        top = np.argsort(-logprobs, axis=-1)[:, :5]
        assert [[t for t, _ in row] for row in sample.top_logprobs] == top.tolist()
        np.testing.assert_allclose([[p for _, p in row] for row in sample.top_logprobs],
                                   np.take_along_axis(logprobs, top, -1), atol=2e-5, rtol=0)
        echo = torch.log_softmax(prompt_logits.double(), -1).numpy()
        assert sample.prompt_logprobs[0] is None and sample.prompt_top_logprobs[0] is None
        np.testing.assert_allclose(sample.prompt_logprobs[1:], echo[np.arange(len(prompt) - 1), prompt[1:]],
                                   atol=2e-5, rtol=0)
        if len(prompt) > 1:
            assert [t for t, _ in sample.prompt_top_logprobs[-1]] == np.argsort(-echo[-2])[:5].tolist()


def test_greedy_equals_a_full_forward_per_token_with_a_sliding_window():
    cfg = ModelConfig.from_preset("tiny", block_size=32)
    params = random_params(cfg, seed=7)
    prompts = random_prompts((3, 20, 40, 9), seed=7)  # the 40-token prompt starts already cropped
    engine = Engine(cfg, params, batch_size=3, stop_tokens=(), sliding_window=True)
    samples = by_id(engine.run(requests_of(prompts, (70, 30, 45, 5))))
    for i, (prompt, n) in enumerate(zip(prompts, (70, 30, 45, 5))):
        assert samples[i, 0].tokens == uncached_greedy(cfg, params, prompt, n, sliding_window=True)


# Mixed lengths, limits and settings: greedy, top-k within and beyond TOP_K_STATIC, top-p, and n = 3 samples.
MIXED_SAMPLERS = (GREEDY, Sampler(0.9, top_k=40, top_p=0.9), Sampler(1.2, top_k=TOP_K_STATIC + 100),
                  Sampler(0.8, top_p=0.7), Sampler(1.0))


def mixed_requests(cfg):
    prompts = random_prompts((5, 33, 1, 17, 60, 9, 24), seed=5, vocab=cfg.vocab_size)
    limits = (12, 30, 7, 25, 4, 18, 9)
    return [Request(f"r{i}", tuple(p), tuple(row_key(3, (i, j)) for j in range(3 if i == 1 else 1)), m,
                    MIXED_SAMPLERS[i % len(MIXED_SAMPLERS)]) for i, (p, m) in enumerate(zip(prompts, limits))]


def outputs(engine, requests):
    return {(s.request.id, s.index): (s.tokens, s.logprobs, s.top_logprobs, s.finish_reason, s.prompt_logprobs,
                                      s.prompt_top_logprobs) for s in engine.run(requests)}


@pytest.mark.parametrize("kernel", [True, False])
def test_samples_do_not_depend_on_batch_size_slot_or_neighbours(kernel, monkeypatch, request):
    """With the panel kernel every decode matmul is row by row: tokens and log-probabilities, the prompts' too, are
    bitwise equal at batch 1, 8 and 16 in any order, with prompts prefilled alone (batch 1) or up to 4 a call,
    checked in programs compiled as users' are (ran_at_full_optimisation). With XLA's matmuls (whose GEMM differs
    from its matrix-vector product) greedy tokens are equal."""
    if kernel and not cpu_kernels.available():
        pytest.skip(f"no panel kernel here: {cpu_kernels.unavailable_reason()}")
    if kernel and ran_at_full_optimisation(request):
        return
    prefill, prompts_a_call = engine_module._prefill, []

    def counted_prefill(*args):  # the last two arguments: each row's tokens (0: a padding row) and cache row
        prompts_a_call.append(int(np.count_nonzero(args[-2])))
        return prefill(*args)
    if kernel:
        monkeypatch.setattr(engine_module, "CPU_PREFILL_ROWS", 4)
        monkeypatch.setattr(engine_module, "_prefill", counted_prefill)
    else:
        monkeypatch.setattr(cpu_kernels, "_state", {"error": "switched off by the test"})
    cfg = ModelConfig.from_preset("tiny", block_size=128)
    params = random_params(cfg, seed=5)
    requests = mixed_requests(cfg)
    if not kernel:
        requests = [r for r in requests if r.sampler.greedy]
    shuffled = random.Random(0).sample(requests, len(requests))
    runs = [outputs(Engine(cfg, params, batch_size=b, stop_tokens=(), logprobs=2, echo=True), rs)
            for b, rs in ((1, requests), (8, shuffled), (16, requests))]
    assert len(runs[0]) == (len(requests) + 2 if kernel else len(requests))
    if kernel:
        assert runs[0] == runs[1] == runs[2]
        # The test has power: the three samples of r1 differ, and so do the settings' outputs; prompts were
        # prefilled alone and together.
        assert len({tuple(runs[0]["r1", j][0]) for j in range(3)}) == 3
        assert min(prompts_a_call) == 1 and max(prompts_a_call) >= 3
    else:
        for run in runs[1:]:
            assert {k: v[0] for k, v in run.items()} == {k: v[0] for k, v in runs[0].items()}


def test_a_greedy_request_beside_a_sampled_one_is_greedy():
    cfg, _, params = hf_tiny()
    prompt = random_prompts((11,), seed=6)[0]
    greedy = Request("g", tuple(prompt), (row_key(0, 0),), 16, GREEDY)
    hot = Request("s", tuple(prompt), (row_key(0, 1),), 16, Sampler(1.5))
    samples = by_id(Engine(cfg, params, batch_size=2, stop_tokens=()).run([greedy, hot]))
    assert samples["g", 0].tokens == uncached_greedy(cfg, params, prompt, 16)
    assert samples["s", 0].tokens != samples["g", 0].tokens


def test_continuous_refills_slots_that_buckets_leave_idle():
    cfg = ModelConfig.from_preset("tiny", n_layer=1)
    params = random_params(cfg, seed=8)
    prompts = random_prompts((4, 6, 8, 10, 12, 14), seed=8)
    limits = (40, 3, 3, 3, 3, 28)
    got = {}
    for schedule in ("continuous", "buckets"):
        before = sampling.compile_count()
        engine = Engine(cfg, params, batch_size=2, stop_tokens=(), schedule=schedule)
        samples = by_id(engine.run(requests_of(prompts, limits)))
        got[schedule] = engine.occupancy, {k: s.tokens for k, s in samples.items()}
        # One prefill program (all prompts pad to 16 tokens) and one decode program, compiled once.
        assert sampling.compile_count() - before <= (2 if schedule == "continuous" else 0)
    # By hand: continuous decodes 40 + 3 * 4 + 28 = 80 tokens in 40 steps of 2 slots (the last sample starts
    # after step 12); buckets (prompts already in length order) runs (40, 3), (3, 3), (3, 28): 40 + 3 + 28 steps.
    assert got["continuous"][1] == got["buckets"][1]
    assert got["continuous"][0] == 1.0 and got["buckets"][0] == pytest.approx(80 / (2 * 71))


def test_a_host_stop_test_ends_a_sample_and_its_slot_is_refilled():
    cfg, _, params = hf_tiny()
    prompts = random_prompts((5, 9, 13), seed=9)
    free = by_id(Engine(cfg, params, batch_size=1, stop_tokens=()).run(requests_of(prompts, (20, 20, 20))))
    marker = free[0, 0].tokens[6]
    stopped = [Request(i, tuple(p), (row_key(0, (i, 0)),), 20, GREEDY, lambda t: marker in t)
               for i, p in enumerate(prompts)]
    engine = Engine(cfg, params, batch_size=1, stop_tokens=(), check_every=1)
    samples = by_id(engine.run(stopped))
    for i in range(3):
        want = free[i, 0].tokens
        if marker in want:
            assert (samples[i, 0].tokens, samples[i, 0].finish_reason) == (want[:want.index(marker) + 1], "stop")
        else:
            assert (samples[i, 0].tokens, samples[i, 0].finish_reason) == (want, "length")


@pytest.mark.parametrize("make, message", [
    (lambda c, p: Engine(c, p, logprobs=21), r"logprobs must be an integer in \[0, 20\]"),
    (lambda c, p: Engine(c, p, schedule="fifo"), "schedule must be 'continuous' or 'buckets'; got 'fifo'"),
    (lambda c, p: Engine(c, p, batch_size=0), "batch_size must be an integer >= 1; got 0"),
    (lambda c, p: Engine(c, p, echo=1), "echo must be True or False; got 1"),
    (lambda c, p: list(Engine(c, p).run([Request("a", (), (row_key(0, 0),), 4)])), "request 'a': the prompt is empty"),
    (lambda c, p: list(Engine(c, p).run([Request(7, (1, 2), (), 4)])), "request 7: keys must hold one PRNG key"),
    (lambda c, p: list(Engine(c, p).run([Request("b", (1, 99999), (row_key(0, 0),), 4)])),
     r"request 'b': the prompt has token id 99999 outside \[0, 50257\)"),
    (lambda c, p: list(Engine(c, p).run([Request("c", (1,) * 60, (row_key(0, 0),), 8)])),
     "request 'c': the prompt has 60 tokens; with max_new_tokens=8 the model reads 67, more than block_size 64"),
    (lambda c, p: list(Engine(c, p).run([Request("d", (1,), (row_key(0, 0),), 0)])),
     "request 'd': max_new_tokens must be an integer >= 1; got 0"),
    (lambda c, p: list(Engine(c, p).run([Request("e", (1,), (row_key(0, 0),), 2, sampler=0.5)])),
     "request 'e': sampler must be a Sampler; got float"),
])
def test_bad_engine_settings_and_requests_are_named(make, message):
    cfg, _, params = hf_tiny()
    with pytest.raises(ValueError, match=message):
        make(cfg, params)
