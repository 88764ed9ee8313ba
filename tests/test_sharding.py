"""gpt2_jax.sharding in-process on one device: mesh parsing, the rules, distributed start-up, state creation and
memory accounting (the runs on several devices and processes are in test_multidevice.py)."""

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from gpt2_jax import sharding as sh
from gpt2_jax.config import ModelConfig, TrainConfig
from conftest import tiny_param_count
from gpt2_jax.model import init_params


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
    params_kb = tiny_param_count(V=512, T=64) * 4 / 1e3  # one device: nothing is split
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
