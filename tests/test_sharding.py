"""gpt2_jax.sharding: mesh parsing and rules in-process; sharded training, sampling and restore on 8 CPU devices.

The 8-device checks run tests/sharding_worker.py once in a subprocess (the device count is fixed when jax is
imported) and compare its JSON with the unsharded reference it also computes.
"""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from gpt2_jax import sharding as sh
from gpt2_jax.config import ModelConfig, TrainConfig
from gpt2_jax.model import init_params

ROOT = Path(__file__).resolve().parent.parent
MESHES = ("data:8", "fsdp:8", "data:2,fsdp:2,tensor:2")
GPT2_PARAMS = 124_439_808  # GPT-2 small with tied embeddings, as Hugging Face counts it


def tiny_param_count(V=512, T=64, C=32, L=2):
    """Hand count: embeddings, L blocks (12C^2 weights + 13C biases/LayerNorm), final LayerNorm."""
    return V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C


def abstract_mesh(data=1, fsdp=1, tensor=1):
    return AbstractMesh((data, fsdp, tensor), sh.MESH_AXES)


def test_parse_mesh_orders_axes_and_fills_missing_with_one():
    assert sh.parse_mesh("data:4,fsdp:2") == (("data", 4), ("fsdp", 2), ("tensor", 1))
    assert sh.parse_mesh("tensor:2, data:-1") == (("data", -1), ("fsdp", 1), ("tensor", 2))


@pytest.mark.parametrize("spec, words", [
    ("model:2", "'model'"), ("data:2,data:2", "twice"), ("data:x", "integer"), ("data", "integer"),
    ("fsdp:0", "size 0"), ("data:-1,fsdp:-1", "at most one"), (",,,", "names no axis"),
])
def test_parse_mesh_rejects_bad_specs(spec, words):
    with pytest.raises(ValueError, match=words):
        sh.parse_mesh(spec)


def test_make_mesh_names_both_counts_when_product_differs():
    n = len(jax.devices())
    with pytest.raises(ValueError, match=rf"needs {2 * n} devices but there are {n}"):
        sh.make_mesh(f"data:{2 * n}")
    assert dict(sh.make_mesh().shape) == {"data": n, "fsdp": 1, "tensor": 1}


def test_rules_map_logical_names_and_replicate_indivisible_dims():
    mesh = abstract_mesh(2, 2, 2)
    assert sh.logical_to_mesh_spec(P("vocab", "embed"), (50304, 768), mesh) == (P("tensor", "fsdp"), [])
    spec, notes = sh.logical_to_mesh_spec(P("vocab", "embed"), (50257, 768), mesh)
    assert spec == P(None, "fsdp") and notes == ["vocab=50257 is not divisible by tensor=2"]
    assert sh.logical_to_mesh_spec(P("batch", None), (8, 16), mesh)[0] == P(("data", "fsdp"), None)
    assert sh.logical_to_mesh_spec(P("batch", None), (6, 16), mesh)[0] == P(None, None)
    # Size-1 axes are left out, and "layers"/"head_dim" are never split.
    spec, _ = sh.logical_to_mesh_spec(P("layers", None, "heads", "head_dim", "embed"), (12, 3, 12, 64, 768),
                                      abstract_mesh(fsdp=8))
    assert spec == P(None, None, None, None, "fsdp")


def test_check_batch_size_names_the_split():
    with pytest.raises(ValueError, match=r"batch_size 6 must be divisible by data\*fsdp = 4"):
        sh.check_batch_size(abstract_mesh(2, 2, 2), 6)


@pytest.fixture
def no_cluster_env(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_initialize_distributed_is_a_no_op_for_one_process(no_cluster_env):
    assert sh.initialize_distributed() is False
    assert jax.process_count() == 1 and sh.is_main_process()


def test_initialize_distributed_names_what_is_missing(no_cluster_env):
    no_cluster_env.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="needs coordinator_address, process_id"):
        sh.initialize_distributed()
    with pytest.raises(ValueError, match=r"process_id 2 must be in \[0, num_processes=2\)"):
        sh.initialize_distributed("127.0.0.1:1234", process_id=2)
    no_cluster_env.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer; got 'two'"):
        sh.initialize_distributed()


# Prints the process count and the GPUs that jax.distributed.initialize made visible (a config update, so it
# shows on a CPU-only jax too). argv: nothing (SLURM detection alone), or the coordinator address and process id.
VISIBLE_GPUS = """
import sys
import jax
import jax._src.distributed as distributed
from gpt2_jax import sharding
seen = []
update = distributed.config.update
distributed.config.update = lambda k, v: seen.append(v) if k == "jax_cuda_visible_devices" else update(k, v)
if len(sys.argv) > 1:
    sharding.initialize_distributed(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
else:
    sharding.initialize_distributed()
print(jax.process_count(), seen)
"""


def slurm_tasks_visible_gpus(address=None, **env) -> list[str]:
    """What 2 tasks of a SLURM job step that SLURM numbered as one task per node (SLURM_LOCALID 0) print."""
    job = str(random.randrange(10_000, 60_000))  # SLURM's coordinator port comes from the job id
    runs = [subprocess.Popen([sys.executable, "-c", VISIBLE_GPUS, *((address, str(i)) if address else ())],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env=dict(os.environ, JAX_PLATFORMS="cpu", SLURM_JOB_ID=job,
                                      SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2", SLURM_PROCID=str(i),
                                      SLURM_LOCALID="0", **env)) for i in range(2)]
    return [run.communicate(timeout=120)[0].strip() for run in runs]


def test_slurm_gives_each_task_one_gpu_unless_jax_local_device_ids():
    """docs/scaling.md's SLURM recipe rests on this: one task per node would drive one GPU, not the node's 8."""
    assert slurm_tasks_visible_gpus() == ["2 ['0']"] * 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert slurm_tasks_visible_gpus(f"127.0.0.1:{port}") == ["2 ['0']"] * 2  # also with the cluster flags
    assert slurm_tasks_visible_gpus(JAX_LOCAL_DEVICE_IDS="0,1,2,3,4,5,6,7") == ["2 ['0,1,2,3,4,5,6,7']"] * 2


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "report.json"
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "sharding_worker.py"), str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("spec", MESHES)
def test_five_sharded_steps_match_one_device(eight_devices, spec):
    ref, got = eight_devices["reference"], eight_devices["meshes"][spec]
    assert ref["n_params"] == tiny_param_count()
    assert len(got["losses"]) == 5
    assert max(abs(a - b) for a, b in zip(got["losses"], ref["losses"])) < 1e-5
    assert got["max_param_diff"] < 1e-5
    assert got["max_opt_diff"] < 1e-5
    assert got["specs_kept"]  # the step's outputs keep the rules' shardings (no silent gather)


@pytest.mark.parametrize("spec", MESHES)
def test_the_step_never_gathers_the_whole_batch(eight_devices, spec):
    # Without the activation layout, fsdp:8 all-reduced the whole batch's logits [8, 32, 512] and all-gathered
    # its [8, 32, 128] MLP activations; only weights, gradients and tensor's per-row partial sums should move.
    assert eight_devices["meshes"][spec]["whole_batch_collectives"] == []


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_greedy_decoding_matches_one_device(eight_devices, spec):
    ref = eight_devices["reference"]["tokens"]
    assert len(ref) == 2 and all(len(row) == 12 for row in ref)
    assert eight_devices["reference"]["generate_tokens"] == ref  # sampling.generate, one device, top_k=1
    assert eight_devices["meshes"][spec]["tokens"] == ref  # sampling.generate on the sharded params


def test_kv_cache_laid_out_by_cache_shardings_decodes_the_same(eight_devices):
    got = eight_devices["meshes"]["data:2,fsdp:2,tensor:2"]["cached_tokens"]
    assert got == eight_devices["reference"]["tokens"]


def test_each_axis_splits_what_the_rules_say(eight_devices):
    m = eight_devices["meshes"]
    assert m["data:8"]["wte_spec"] == "P(None, None)"
    assert m["fsdp:8"]["wte_spec"] == "P(None, 'fsdp')" and m["fsdp:8"]["mu_wte_spec"] == "P(None, 'fsdp')"
    mixed = m["data:2,fsdp:2,tensor:2"]
    assert mixed["wte_spec"] == "P('tensor', 'fsdp')"
    assert mixed["c_attn_spec"] == "P(None, None, 'tensor', None, 'fsdp')"
    assert mixed["c_fc_spec"] == "P(None, 'tensor', 'fsdp')"
    assert eight_devices["mesh_minus_one"] == {"data": 4, "fsdp": 1, "tensor": 2}


def test_fsdp8_holds_an_eighth_of_the_state_per_device(eight_devices):
    tiny_bytes = tiny_param_count() * 4
    assert eight_devices["reference"]["bytes"]["params"] == tiny_bytes
    assert eight_devices["meshes"]["data:8"]["bytes"]["params"] == tiny_bytes  # data parallel replicates
    got = eight_devices["meshes"]["fsdp:8"]
    assert got["bytes"] == got["abstract_bytes"]
    # Only the qkv and MLP biases (no embed axis) stay whole: 2 * (96 + 128) floats of 43,904.
    assert got["bytes"]["params"] == (tiny_bytes - 2 * (96 + 128) * 4) // 8 + 2 * (96 + 128) * 4
    gpt2 = eight_devices["memory"]["gpt2"]
    assert gpt2["n_params"] == GPT2_PARAMS and gpt2["data:8"]["params"] == GPT2_PARAMS * 4
    assert 1 / 8 <= gpt2["fsdp:8"]["params"] / (GPT2_PARAMS * 4) < 1.01 / 8
    # AdamW keeps two moments per parameter, plus a few int32 step counters.
    assert 0 <= gpt2["fsdp:8"]["opt_state"] - 2 * gpt2["fsdp:8"]["params"] < 64


def test_fallbacks_are_reported_for_gpt2_xl_heads(eight_devices):
    notes = eight_devices["memory"]["gpt2-xl"]["fallbacks_fsdp:4,tensor:2"]
    assert "h.attn.c_attn.weight: heads=25 is not divisible by tensor=2; replicated" in notes
    assert "wte: vocab=50257 is not divisible by tensor=2; replicated" in notes


def test_checkpoint_saved_on_data8_resumes_on_fsdp4(eight_devices):
    r = eight_devices["restore"]
    assert r["restored_equal"] and r["restored_step"] == 5
    assert r["restored_devices"] == 4
    assert r["restored_wte_spec"] == "P(None, 'fsdp')" and r["restored_mu_spec"] == "P(None, 'fsdp')"
    assert r["resumed_loss_diff"] < 1e-5 and r["resumed_param_diff"] < 1e-5


def test_create_sharded_state_from_given_params_keeps_them():
    cfg = ModelConfig.from_preset("tiny", vocab_size=256)
    params = init_params(cfg, jax.random.PRNGKey(3))
    state = sh.create_sharded_state(cfg, TrainConfig(), sh.make_mesh(), jax.random.PRNGKey(0),
                                    params=jax.tree.map(np.asarray, params))
    assert int(state.step) == 0
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)))
    mu = state.opt_state[1][0].mu
    assert all(not np.any(np.asarray(m)) for m in jax.tree.leaves(mu))  # fresh Adam moments are zero


def test_shard_params_names_the_wrong_key():
    cfg = ModelConfig.from_preset("tiny", vocab_size=256)
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.PRNGKey(0)))
    params["wpe"] = params["wpe"][:10]
    with pytest.raises(ValueError, match=r"wpe: \(10, 32\) \(expected \(64, 32\)\)"):
        sh.shard_params(cfg, params, sh.make_mesh())


def test_memory_summary_reports_hand_counted_bytes():
    cfg = ModelConfig.from_preset("tiny", vocab_size=512)
    state = sh.abstract_state(cfg, TrainConfig(), sh.make_mesh())
    params_kb = tiny_param_count() * 4 / 1e3  # one device: nothing is split
    # Adam's two moments, plus its int32 step counter (4 bytes) that the kB rounding hides.
    opt_kb = 2 * params_kb
    line = sh.memory_summary(state)
    assert line == (f"per device: params {params_kb:.4g} kB, optimizer state {opt_kb:.4g} kB "
                    f"(unsharded: {params_kb:.4g} kB, {opt_kb:.4g} kB)")


@pytest.mark.parametrize("n, text", [(0, "0 B"), (999, "999 B"), (812_345, "812.3 kB"), (62_400_000, "62.4 MB"),
                                     (12_460_900_000, "12.46 GB")])
def test_format_bytes_keeps_four_digits_in_decimal_units(n, text):
    assert sh.format_bytes(n) == text


def test_any_process_is_the_flag_itself_for_one_process():
    assert sh.any_process(True) is True and sh.any_process(False) is False


def test_host_local_to_global_takes_train_and_eval_shapes():
    mesh = sh.make_mesh()
    x_ABT = np.arange(2 * 4 * 3).reshape(2, 4, 3)
    np.testing.assert_array_equal(np.asarray(sh.host_local_to_global(x_ABT, mesh, 4)), x_ABT)
    np.testing.assert_array_equal(np.asarray(sh.host_local_to_global(x_ABT[0], mesh, 4)), x_ABT[0])
    with pytest.raises(ValueError, match=r"rows 0:4 as \[A, 4, T\] or \[4, T\]; got shape \(2, 3, 3\)"):
        sh.host_local_to_global(x_ABT[:, :3], mesh, 4)
