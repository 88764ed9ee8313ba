"""GPT2JaxLM against the harness's own HFLM on the Hugging Face export of the same random weights, offline."""

import os

import pytest

pytest.importorskip("lm_eval")
os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"  # local files only, before the imports read it

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from gpt2_jax import convert  # noqa: E402
from gpt2_jax.lm_eval import GPT2JaxLM  # noqa: E402
from gpt2_jax.tokenizer import get_tokenizer  # noqa: E402

BLOCK = 64
LONG = " ".join(f"Sentence {i} has wörds, 数字 and numbers like {i * 37}." for i in range(20))  # > 3 windows


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import transformers
    from transformers.initialization import no_init_weights
    from transformers.integrations.tiktoken import convert_tiktoken_to_fast

    from gpt2_jax.torch_ref import randomize_

    tmp = tmp_path_factory.mktemp("lm_eval")
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=BLOCK, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=50256,
                                  eos_token_id=50256)
    with no_init_weights():
        model = transformers.GPT2LMHeadModel(cfg)
    model.tie_weights()
    randomize_(model, seed=7, std=0.3).save_pretrained(tmp / "torch")
    config, params = convert.load(tmp / "torch")
    convert.export_hf(config, params, tmp / "hf")  # the export of our weights is what HFLM reads
    convert_tiktoken_to_fast(get_tokenizer().encoding, tmp / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp / "hf")
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.save_pretrained(tmp / "hf")
    hf = HFLM(pretrained=str(tmp / "hf"), batch_size=1, device="cpu", dtype="float32")
    assert hf.max_length == BLOCK
    return GPT2JaxLM(config=config, params=params, batch_size=4), hf


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def greedy_pairs(hf: HFLM) -> list[tuple[str, str]]:
    """(context, the model's own greedy continuation): requests whose is_greedy must come out True."""
    contexts = ["The capital of France is", "Once upon a time", "1, 2, 3,"]
    gens = hf.generate_until(requests("generate_until", [(c, {"until": [], "max_gen_toks": 3, "do_sample": False})
                                                         for c in contexts]))
    tok = get_tokenizer()
    return [(c, g) for c, g in zip(contexts, gens) if g and tok.encode(c + g) == tok.encode(c) + tok.encode(g)]


def test_loglikelihood_matches_hflm(models):
    ours, hf = models
    greedy = greedy_pairs(hf)
    assert greedy, "no context's greedy continuation round-trips through the tokenizer"
    args = [("The cat sat on the", " mat"), ("Question: 2+2=? Answer: ", "4"), ("", "Hello world"),
            ("Zoë ordered a café au lait", " and 東京のケーキ."), (LONG, " The end."),  # truncated on the left
            ("A", " " + "very long continuation " * 8), ("end<|endoftext|>", "start again"), *greedy]
    expected = hf.loglikelihood(requests("loglikelihood", args))
    got = ours.loglikelihood(requests("loglikelihood", args))
    assert [g for _, g in got] == [g for _, g in expected]
    assert any(g for _, g in expected) and not all(g for _, g in expected)
    for (logp, _), (ref, _) in zip(got, expected):
        assert logp == pytest.approx(ref, abs=1e-4)


def test_loglikelihood_rolling_matches_hflm(models):
    ours, hf = models
    args = [("Hello",), ("Two short sentences. And a second one!",), (LONG,), (LONG[:300] + "\n\n" + LONG[:150],)]
    assert len(get_tokenizer().encode(LONG)) > 3 * BLOCK
    expected = hf.loglikelihood_rolling(requests("loglikelihood_rolling", args))
    got = ours.loglikelihood_rolling(requests("loglikelihood_rolling", args))
    for logp, ref in zip(got, expected):
        assert logp == pytest.approx(ref, abs=1e-4, rel=1e-6)  # float32 sums of ~1,000 nats


def test_generate_until_matches_hflm(models):
    ours, hf = models
    free = hf.generate_until(requests("generate_until", [("In the beginning", {"max_gen_toks": 20,
                                                                               "do_sample": False})]))[0]
    stop = free[8:11]  # a stop string that the greedy continuation is sure to meet
    assert len(free) > 12 and stop
    args = [("In the beginning", {"max_gen_toks": 20, "do_sample": False}),
            ("In the beginning", {"until": [stop, "never"], "max_gen_toks": 20, "do_sample": False}),
            ("Zoë ordered a café", {"until": ["\n"], "max_gen_toks": 10}),
            (LONG, {"until": ["."], "max_gen_toks": 16, "do_sample": False}),  # context truncated on the left
            ("x", {"until": "zzz", "max_gen_toks": 5, "temperature": 0.0})]
    expected = hf.generate_until(requests("generate_until", args))
    assert expected[1] == free[:free.index(stop)] and expected[0] == free
    assert ours.generate_until(requests("generate_until", args)) == expected


def test_sampling_and_bad_arguments_are_refused(models):
    ours, _ = models
    with pytest.raises(ValueError, match="generates greedily"):
        ours.generate_until(requests("generate_until", [("x", {"do_sample": True, "temperature": 0.7})]))
    with pytest.raises(ValueError, match="must be less than the model's block_size 64"):
        ours.generate_until(requests("generate_until", [("x", {"max_gen_toks": 64})]))
    with pytest.raises(ValueError, match="init_from"):
        GPT2JaxLM()


TASK = """task: tiny_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{endings}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_command_runs_a_local_task_as_hflm_scores_it(models, tmp_path, capsys, monkeypatch):
    import json

    import lm_eval
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    from gpt2_jax import lm_eval as ours_module

    # Indexing the harness's thousands of built-in task files takes each side's TaskManager tens of seconds, and
    # this task is in --include_path alone: both sides index only that directory.
    local_only = lambda include_path: TaskManager(include_path=include_path, include_defaults=False)  # noqa: E731
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", local_only)
    ours, hf = models
    rows = [{"ctx": f"Item {i}: the {w} is", "endings": [" red", " on the table", " gone.", " 東京"], "label": i % 4}
            for i, w in enumerate(["cup", "cat", "book", "Zoë's pen", "sky", "café"])]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_local.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    weights = tmp_path / "weights"
    convert.export_hf(ours.config, ours.params, weights)
    assert ours_module.main([f"--init_from={weights}", "--tasks=tiny_local", f"--include_path={tmp_path / 'tasks'}",
                             f"--output={tmp_path / 'results.json'}", "--batch_size=3"]) == 0
    got = json.loads((tmp_path / "results.json").read_text())["results"]["tiny_local"]
    expected = lm_eval.simple_evaluate(model=hf, tasks=["tiny_local"],
                                       task_manager=local_only(str(tmp_path / "tasks")))
    expected = expected["results"]["tiny_local"]
    assert (got["acc,none"], got["acc_norm,none"]) == (expected["acc,none"], expected["acc_norm,none"])
    assert "tiny_local" in capsys.readouterr().out  # the harness's table
