"""train.main from given weights: fine-tuning Hugging Face and saved weights, --eval_only, HellaSwag at each eval,
--log_health's update ratios, and the FLOPs peak table."""

import json
import re
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
from conftest import MODEL_FLAGS, VOCAB, forward, hand_loss, host_devices, main_error, records, resolve, run_train
from gpt2_jax import checkpoint, cpu_kernels, data
from gpt2_jax.config import ConfigError, ModelConfig, TrainConfig
from gpt2_jax.flops import peak_flops
from gpt2_jax.metrics import Figure, Metrics
from gpt2_jax.model import GPT2, init_params
from gpt2_jax.tokenizer import get_tokenizer
from gpt2_jax.training import update_ratios


def test_eval_only_losses_of_hugging_face_weights_are_transformers_losses(tmp_path, data_dir, capsys):
    # The same token batches (TokenShards.batch of the run's seed) through transformers' own GPT2LMHeadModel.
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from conftest import hf_model

    model = hf_model(ModelConfig.from_preset("tiny", vocab_size=VOCAB, block_size=32), seed=3)
    model.save_pretrained(tmp_path / "hf")
    assert train.main(["--eval_only=true", f"--init_from={tmp_path / 'hf'}", f"--data={data_dir}", "--seed=5",
                       "--eval_iters=2", "--batch_size=4", f"--out_dir={tmp_path / 'unused'}"]) == 0
    got = re.search(r"train loss (\S+), val loss (\S+) \(the first 2 batches of 4 x 32", capsys.readouterr().out)
    for value, split in zip(got.groups(), ("train", "val")):
        losses = []
        for i in range(2):
            x, y = (torch.tensor(a[0], dtype=torch.long) for a in data.open_split(data_dir, split).batch(5, i, 4, 32))
            with torch.no_grad():
                logits = model(x).logits
            losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
        assert float(value) == pytest.approx(np.mean(losses), abs=1e-4), split


@pytest.mark.parametrize("attention", ["xla", "cpu_kernel"])
def test_eval_only_runs_an_attention_that_has_no_dropout(attention, tmp_path, data_dir, capsys):
    # The weights' dropout (0.1) is a training setting: an evaluation has none, so attention="cpu_kernel" runs it.
    if attention == "cpu_kernel" and not cpu_kernels.available():
        pytest.skip(f"no attention kernel here: {cpu_kernels.unavailable_reason()}")
    model_cfg = ModelConfig.from_preset("tiny", vocab_size=VOCAB, block_size=32, dropout=0.1)
    params = init_params(model_cfg, jax.random.PRNGKey(0))
    checkpoint.save_weights(tmp_path / "weights", model_cfg, params)
    assert train.main(["--eval_only=true", f"--init_from={tmp_path / 'weights'}", f"--out_dir={tmp_path / 'out'}",
                       f"--data={data_dir}", "--eval_iters=1", f"--attention={attention}"]) == 0
    got = re.search(r"train loss (\S+), val loss (\S+)", capsys.readouterr().out)
    for value, split in zip(got.groups(), ("train", "val")):
        expected = hand_loss(model_cfg, params, data.open_split(data_dir, split), TrainConfig().seed, 1, 8)
        assert float(value) == pytest.approx(expected, abs=1e-4)


def test_a_weights_directory_is_evaluated_but_not_resumed(tmp_path, data_dir, capsys):
    # save_weights writes no train_config: --eval_only reads the weights; a resume says why it cannot (no KeyError).
    model_cfg = ModelConfig.from_preset("tiny", vocab_size=VOCAB, block_size=32)
    checkpoint.save_weights(tmp_path / "weights", model_cfg, init_params(model_cfg, jax.random.PRNGKey(0)))
    flags = ["--init_from=resume", f"--out_dir={tmp_path / 'weights'}", f"--data={data_dir}", "--num_samples=0"]
    assert train.main(["--eval_only=true", "--eval_iters=1", *flags]) == 0
    assert f"step 0 of {tmp_path / 'weights'}: train loss" in capsys.readouterr().out
    assert (f"{tmp_path / 'weights'}/0 holds weights only (no optimizer state); it cannot be resumed, but "
            f"--init_from={tmp_path / 'weights'} fine-tunes from it") in main_error(capsys, *flags)


def test_fine_tunes_from_saved_weights_with_a_shorter_context(tmp_path, data_dir, capsys):
    source_cfg = ModelConfig.from_preset("tiny", vocab_size=VOCAB, block_size=64)
    params = init_params(source_cfg, jax.random.PRNGKey(7))
    checkpoint.save_weights(tmp_path / "weights", source_cfg, params)
    out = tmp_path / "tuned"
    argv = [f"--init_from={tmp_path / 'weights'}", "--block_size=32", f"--data={data_dir}", f"--out_dir={out}",
            "--max_iters=1", "--log_interval=1", "--eval_iters=1", "--batch_size=4", "--num_samples=0"]
    assert train.main(argv) == 0, capsys.readouterr()
    assert (f"initialised from the weights in {tmp_path / 'weights'} (wpe cut to its first 32 of 64 positions)"
            in capsys.readouterr().out)
    meta = checkpoint.read_meta(out)
    assert meta["model_config"] == ModelConfig.from_preset("tiny", vocab_size=VOCAB, block_size=32).to_dict()
    # A longer context than the weights' wpe cannot be made up: the error says so (and nothing claims a load).
    with pytest.raises(ConfigError, match=r"--block_size=128 is longer than the 64 positions of the weights"):
        resolve([f"--init_from={tmp_path / 'weights'}", "--block_size=128", f"--out_dir={tmp_path / 'long'}"])
    assert "initialised" not in capsys.readouterr().out
    # The first loss is that of the loaded weights (first 32 positions) on the first batch, computed here by hand.
    x, y = data.open_split(data_dir, "train").batch(meta["train_config"]["seed"], 0, 4, 32)
    cropped = dict(params, wpe=params["wpe"][:32])
    logits = GPT2(ModelConfig(**meta["model_config"])).apply({"params": cropped}, jnp.asarray(x[0]))
    logp = jax.nn.log_softmax(logits, axis=-1)
    expected = -np.mean(np.take_along_axis(np.asarray(logp), y[0][..., None], axis=-1))
    assert records(out)[0]["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("grad_clip", [1e-3, 1e3])
def test_the_logged_grad_norm_is_torchs_clip_grad_norm(grad_clip, random_hf, tmp_path, data_dir, capsys):
    """grad_norm is the global norm before clipping, as torch.nn.utils.clip_grad_norm_ returns it for the same
    weights and batch; clipped says whether it exceeded grad_clip."""
    torch = pytest.importorskip("torch")
    model = random_hf(seed=4, vocab_size=VOCAB, n_positions=32)
    model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "tuned"
    argv = [f"--init_from={tmp_path / 'hf'}", f"--data={data_dir}", f"--out_dir={out}", f"--grad_clip={grad_clip}",
            "--max_iters=1", "--log_interval=1", "--eval_iters=1", "--batch_size=4", "--num_samples=0"]
    assert train.main(argv) == 0, capsys.readouterr()
    x, y = data.open_split(data_dir, "train").batch(TrainConfig().seed, 0, 4, 32)
    logits = model(torch.from_numpy(x[0]).long()).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), torch.from_numpy(y[0]).long().ravel()).backward()
    expected = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    logged = records(out)[0]
    assert logged["grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert logged["clipped"] == (expected > grad_clip)


@pytest.mark.parametrize("tie", [True, False])
def test_fine_tunes_hf_weights_with_another_pad_vocab_to(tie, random_hf, tmp_path, data_dir, capsys):
    """--pad_vocab_to pads the loaded token table (and head) with zero rows: the first loss is transformers'."""
    torch = pytest.importorskip("torch")
    model = random_hf(seed=3, tie=tie, vocab_size=VOCAB, n_positions=32)
    model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "tuned"
    argv = [f"--init_from={tmp_path / 'hf'}", "--pad_vocab_to=96", f"--data={data_dir}", f"--out_dir={out}",
            "--max_iters=1", "--log_interval=1", "--eval_iters=1", "--batch_size=4", "--num_samples=0"]
    assert train.main(argv) == 0, capsys.readouterr()
    cfg, params = checkpoint.load_weights(out)
    assert (cfg.pad_vocab_to, cfg.tie_embeddings, params["wte"].shape[0]) == (96, tie, 288)
    x, y = data.open_split(data_dir, "train").batch(checkpoint.read_meta(out)["train_config"]["seed"], 0, 4, 32)
    with torch.no_grad():
        logits = model(torch.from_numpy(x[0]).long()).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), torch.from_numpy(y[0]).long().ravel())
    assert records(out)[0]["loss"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("kind, dtype, tflops", [
    ("NVIDIA GB200", "bfloat16", 2500.0), ("NVIDIA B200", "bfloat16", 2250.0), ("NVIDIA H100 NVL", "bfloat16", 835.0),
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.0), ("NVIDIA H100 PCIe", "bfloat16", 756.0),
    ("AMD Instinct MI300X", "bfloat16", 1307.4), ("TPU v5 lite", "bfloat16", 197.0),
])
def test_peak_flops_takes_the_most_specific_datasheet_row(monkeypatch, kind, dtype, tflops):
    """The first matching name wins, so "gb200" must not be read as "b200", nor "h100 nvl" as "h100"."""
    monkeypatch.setattr(jax, "local_devices", lambda: [types.SimpleNamespace(device_kind=kind)])
    peak, source = peak_flops(ModelConfig.from_preset("tiny", dtype=dtype))
    assert (peak, source) == (tflops * 1e12, f"{kind} datasheet")


def hellaswag_file(path: Path, n: int) -> Path:
    """n lines in the release's format (ctx, endings (4), label and its other fields); endings that differ late."""
    lines = []
    for i in range(n):
        ctx = f"A {['man', 'woman', 'dog', 'child'][i % 4]} {['opens', 'paints', 'carries'][i % 3]} the"
        endings = [f"box and then {word}." for word in ("sits down", "runs away", "naïve smiles", "waves")]
        lines.append(json.dumps({"ind": i, "activity_label": "Test", "ctx": ctx, "endings": endings,
                                 "label": (3 * i) % 4, "split": "val"}, ensure_ascii=i % 2 == 0))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def hand_hellaswag(model_cfg: ModelConfig, params, path: Path, n: int) -> tuple[float, float]:
    """(acc, acc_norm) of the first n examples: each candidate a whole unpadded row through GPT2, its ending's
    summed and mean cross entropy from the full log-softmax (llm.c's scoring, without the cache or buckets)."""
    tok = get_tokenizer()
    right, right_norm = 0, 0
    for line in path.read_text(encoding="utf-8").splitlines()[:n]:
        r = json.loads(line)
        context, losses = tok.encode(r["ctx"]), []
        for ending in r["endings"]:
            cont = tok.encode(" " + ending)
            row = np.array([context + cont])
            logits = forward(model_cfg, params, jnp.asarray(row[:, :-1]))[0, :, :tok.n_vocab]
            logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), np.float64)
            total = -sum(logp[len(context) - 1 + k, t] for k, t in enumerate(cont))
            losses.append((total, total / len(cont)))
        losses = np.array(losses)
        right += int(np.argmin(losses[:, 0]) == r["label"])
        right_norm += int(np.argmin(losses[:, 1]) == r["label"])
    return right / n, right_norm / n


def test_hellaswag_is_scored_at_every_eval_on_the_params_of_that_step(tmp_path, data_dir, capsys):
    path = hellaswag_file(tmp_path / "hellaswag.jsonl", 6)
    out = tmp_path / "run"
    argv = ["--config=tiny", "--vocab_size=50257", f"--data={data_dir}", f"--out_dir={out}", "--max_iters=4",
            "--eval_interval=2", "--log_interval=2", "--eval_iters=1", "--batch_size=4", "--num_samples=0",
            f"--hellaswag={path}", "--hellaswag_limit=5", "--hellaswag_batch_size=2"]
    assert train.main(argv) == 0, capsys.readouterr()
    evals = [r for r in records(out) if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        model_cfg, params = checkpoint.load_weights(out, r["step"])
        acc, acc_norm = hand_hellaswag(model_cfg, params, path, 5)
        assert (r["hellaswag_acc"], r["hellaswag_acc_norm"]) == (pytest.approx(acc), pytest.approx(acc_norm))
    assert "hellaswag acc" in capsys.readouterr().out
    # --eval_only scores the same examples of the last step's weights
    assert train.main(["--eval_only=true", "--init_from=resume", f"--out_dir={out}", f"--hellaswag={path}",
                       "--hellaswag_limit=5"]) == 0
    assert (f"hellaswag acc {evals[-1]['hellaswag_acc']:.4f}, acc_norm {evals[-1]['hellaswag_acc_norm']:.4f} "
            f"(5 examples of {path})") in capsys.readouterr().out


def test_hellaswag_inputs_are_checked_before_training(tmp_path, data_dir, capsys):
    path = hellaswag_file(tmp_path / "hellaswag.jsonl", 3)
    out = tmp_path / "run"
    flags = ["--config=tiny", "--vocab_size=50257", f"--data={data_dir}", f"--out_dir={out}", "--num_samples=0"]
    assert (f"--hellaswag={tmp_path / 'none.jsonl'}: no such file; expected a HellaSwag JSONL file"
            in main_error(capsys, *flags, f"--hellaswag={tmp_path / 'none.jsonl'}"))
    assert "hellaswag_limit must be >= 0; got -1" in main_error(capsys, *flags, f"--hellaswag={path}",
                                                               "--hellaswag_limit=-1")
    assert ("--hellaswag needs a model with GPT-2's tokenizer's 50257 token ids to score text; this one has "
            f"vocab_size {VOCAB}") in main_error(capsys, *MODEL_FLAGS, *flags[2:], f"--hellaswag={path}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(path.read_text() + '{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 4}\n')
    assert f"{bad}:4: label must be an integer 0..3; got 4" in main_error(capsys, *flags, f"--hellaswag={bad}")
    assert not out.exists()  # every refusal came before the run made its out_dir


def test_the_curve_draws_the_hellaswag_scores_of_the_eval_steps(tmp_path, monkeypatch):
    savefig, drawn = Figure.savefig, []

    def kept(fig, path, **kwargs):
        drawn.append(fig)
        savefig(fig, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", kept)
    metrics = Metrics(tmp_path, start_step=0)
    metrics.log({"step": 5, "loss": 3.0, "grad_norm": 1.0})
    metrics.log({"step": 10, "loss": 2.5, "grad_norm": 0.5, "val_loss": 2.6})
    metrics.plot()
    assert len(drawn[-1].axes) == 2  # a run without --hellaswag: loss and grad norm only
    metrics.log({"step": 20, "loss": 2.0, "grad_norm": 0.4, "val_loss": 2.1, "hellaswag_acc": 0.25,
                 "hellaswag_acc_norm": 0.5})
    metrics.plot()
    lines = {line.get_label(): line.get_xydata().tolist() for line in drawn[-1].axes[2].get_lines()}
    assert lines == {"acc": [[20, 0.25]], "acc_norm": [[20, 0.5]]}


def test_hellaswag_is_scored_on_a_mesh_of_the_runs_devices(tmp_path, data_dir, env):
    # Four CPU devices, params split over fsdp: the scores are those of the saved weights, computed here whole.
    path = hellaswag_file(tmp_path / "hellaswag.jsonl", 4)
    mesh_env = host_devices(env, 4)
    flags = ["--config=tiny", "--vocab_size=50257", f"--data={data_dir}", "--max_iters=2", "--eval_interval=2",
             "--eval_iters=1", "--batch_size=4", "--num_samples=0", "--mesh=data:2,fsdp:2", f"--hellaswag={path}"]
    rc, log = run_train(*flags, "--hellaswag_batch_size=6", out=tmp_path / "odd", env=mesh_env)
    assert rc == 2 and "--hellaswag_batch_size: batch_size 6 must be divisible by data*fsdp = 4" in log, log
    out = tmp_path / "run"
    rc, log = run_train(*flags, out=out, env=mesh_env)  # batches of the global batch_size, 4
    assert rc == 0, log
    (record,) = [r for r in records(out) if "val_loss" in r]
    acc, acc_norm = hand_hellaswag(*checkpoint.load_weights(out, 2), path, 4)
    assert (record["hellaswag_acc"], record["hellaswag_acc_norm"]) == (pytest.approx(acc), pytest.approx(acc_norm))


def numpy_update_ratios(old, new, groups):
    """The update:weight norm ratio of each group of flattened parameter names, in float64 numpy."""
    flat_old, flat_new = (dict(jax.tree_util.tree_flatten_with_path(p)[0]) for p in (old, new))
    ratios = {}
    for group, member in groups.items():
        keys = [k for k in flat_old if member(jax.tree_util.keystr(k))]
        update = sum(np.sum((np.float64(flat_new[k]) - np.float64(flat_old[k])) ** 2) for k in keys)
        ratios[f"update_ratio/{group}"] = np.sqrt(update / sum(np.sum(np.float64(flat_old[k]) ** 2) for k in keys))
    return ratios


HEALTH_GROUPS = {"wte": lambda k: k.startswith("['wte']"), "wpe": lambda k: k.startswith("['wpe']"),
                 "ln": lambda k: "['ln" in k, "lm_head": lambda k: k.startswith("['lm_head']"),
                 **{f"{a}.{b}": (lambda k, a=a, b=b: f"['{a}']['{b}']" in k)
                    for a, b in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))}}


def test_update_ratios_of_hand_made_params_are_numpys():
    rng = np.random.default_rng(0)
    shapes = {"wte": (5, 4), "wpe": (3, 4), "ln_f": {"weight": (4,), "bias": (4,)}, "lm_head": {"weight": (5, 4)},
              "h": {"ln_1": {"weight": (2, 4)}, "ln_2": {"bias": (2, 4)},
                    "attn": {"c_attn": {"weight": (2, 12, 4), "bias": (2, 12)}, "c_proj": {"weight": (2, 4, 4)}},
                    "mlp": {"c_fc": {"weight": (2, 16, 4)}, "c_proj": {"weight": (2, 4, 16), "bias": (2, 4)}}}}
    old = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                       is_leaf=lambda s: isinstance(s, tuple))
    new = jax.tree.map(lambda a: a + rng.normal(scale=1e-2, size=a.shape).astype(np.float32), old)
    logged = update_ratios(old, new)
    expected = numpy_update_ratios(old, new, HEALTH_GROUPS)
    assert sorted(logged) == sorted(expected)
    for key, value in expected.items():
        assert float(logged[key]) == pytest.approx(value, rel=1e-5), key


@pytest.mark.parametrize("tie", [True, False])
def test_log_health_logs_the_update_ratios_between_checkpoints(tie, tmp_path, data_dir, capsys):
    """Each eval step's update_ratio/<group> is the norm ratio of the params its step changed, from the checkpoints
    of that step and the one before (every step is an eval and a save)."""
    out = tmp_path / "out"
    argv = [*MODEL_FLAGS, f"--tie_embeddings={str(tie).lower()}", f"--data={data_dir}", f"--out_dir={out}",
            "--log_health=true", "--max_iters=3", "--eval_interval=1", "--eval_iters=1", "--batch_size=4",
            "--num_samples=0", "--keep_checkpoints=3"]
    assert train.main(argv) == 0, capsys.readouterr()
    logged = {r["step"]: r for r in records(out)}
    groups = {g: m for g, m in HEALTH_GROUPS.items() if g != "lm_head" or not tie}
    for step in (2, 3):
        before, after = (checkpoint.load_weights(out, s)[1] for s in (step - 1, step))
        expected = numpy_update_ratios(before, after, groups)
        assert sorted(k for k in logged[step] if k.startswith("update_ratio/")) == sorted(expected)
        for key, value in expected.items():
            assert logged[step][key] == pytest.approx(value, rel=1e-5), (step, key)
