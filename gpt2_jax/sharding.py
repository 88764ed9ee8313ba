"""Device meshes, the one logical-axis -> mesh-axis rules table, sharded state creation and multi-host input.

A mesh always has the three axes (data, fsdp, tensor); an axis left out of `--mesh` has size 1.
  data    batch split, parameters replicated (plain data parallelism)
  fsdp    batch split AND parameters + optimizer state split on their embed dimension (ZeRO-3 style)
  tensor  Megatron split: attention heads, MLP hidden units and vocabulary rows over devices
A parameter dimension that the rule's mesh axes do not divide evenly is replicated instead (e.g. vocab 50257
over tensor:2; use pad_vocab_to=128). `sharding_fallbacks` lists every such case.

jit with NamedSharding replaces pmap: the same program runs on one device or a pod, and XLA inserts the
collectives that the input and output shardings imply.
"""

from __future__ import annotations

import collections
import math
import os
import re
import sys
import threading
from functools import lru_cache, partial
from typing import Callable, Sequence

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from gpt2_jax.config import ConfigError, ModelConfig, TrainConfig
from gpt2_jax.model import KVCache, abstract_params, activation_layout, logical_axes
from gpt2_jax.optim import make_optimizer
from gpt2_jax.training import TrainState, init_train_state, make_eval_step, make_train_step

# Outermost first: data may cross hosts (slow links), tensor needs the fastest links, so it is innermost.
MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# The one rules table: logical axis name -> mesh axes that split it (None = replicated).
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "embed": ("fsdp",),
    "head_dim": None,
    "layers": None,
}


def order_host_collectives() -> None:
    """Before the backend starts: keep XLA:CPU's collectives in one order when XLA_FLAGS splits the host.

    With --xla_force_host_platform_device_count=N > 1, XLA:CPU's concurrency-optimised scheduler lets a step's
    independent collectives start in different orders on different host devices; they then wait on each other
    until XLA aborts the process (seen: train.py --mesh=data:4,tensor:2 on 8 host devices, wte replicated, at the
    first step, every run). With the scheduler off, the same runs complete with the same losses. The flag is
    read when the backend starts, so this only helps before the first device is touched.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    forced = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
    if forced and int(forced.group(1)) > 1 and "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_enable_concurrency_optimized_scheduler=false".strip()


def runtime_error_cause(error: Exception) -> tuple[str, str | None]:
    """(first line of an XLA runtime error, its likely cause: "memory", "process" or None).

    "memory": the device (or host) could not allocate a buffer. "process": a multi-process run, where a failed
    collective most often means another process stopped.
    """
    lines = str(error).strip().splitlines()
    first = lines[0].rstrip(".") if lines else type(error).__name__
    if "RESOURCE_EXHAUSTED" in first or "out of memory" in first.lower():
        return first, "memory"
    return first, "process" if jax.process_count() > 1 else None


def parse_mesh(spec: str) -> tuple[tuple[str, int], ...]:
    """'data:4,fsdp:2' -> (('data', 4), ('fsdp', 2), ('tensor', 1)); one size may be -1 (= the remaining devices)."""
    sizes = {name: 1 for name in MESH_AXES}
    seen = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, size = part.partition(":")
        name = name.strip()
        if name not in MESH_AXES:
            raise ValueError(f"mesh axis {name!r} in {spec!r} is unknown; axes are {', '.join(MESH_AXES)}")
        if name in seen:
            raise ValueError(f"mesh axis {name!r} appears twice in {spec!r}")
        try:
            value = int(size)
        except ValueError:
            raise ValueError(f"mesh axis {name!r} in {spec!r} needs an integer size, written {name}:N") from None
        if value == 0 or value < -1:
            raise ValueError(f"mesh axis {name!r} has size {value}; sizes are positive (or -1 for the rest)")
        seen.add(name)
        sizes[name] = value
    if not seen:
        raise ValueError(f"mesh {spec!r} names no axis; write it like data:4,fsdp:2")
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"at most one mesh axis may have size -1; got {spec!r}")
    return tuple(sizes.items())


def make_mesh(spec: str | Sequence[tuple[str, int]] | None = None, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default all); default spec puts every device on data."""
    devices = list(jax.devices() if devices is None else devices)
    axes = parse_mesh(spec or "data:-1") if spec is None or isinstance(spec, str) else tuple(spec)
    sizes = dict(axes)
    known = math.prod(s for s in sizes.values() if s != -1)
    for name, size in sizes.items():
        if size == -1:
            if len(devices) % known:
                raise ValueError(f"mesh {spec!r}: {len(devices)} devices are not divisible by the fixed axes ({known})")
            sizes[name] = len(devices) // known
    shape = tuple(sizes[name] for name in MESH_AXES)
    if math.prod(shape) != len(devices):
        axes_text = ",".join(f"{n}:{s}" for n, s in zip(MESH_AXES, shape))
        raise ValueError(f"mesh {spec!r} ({axes_text}) needs {math.prod(shape)} devices "
                         f"but there are {len(devices)}")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_mesh_spec(logical: P, shape: Sequence[int], mesh: Mesh, rules=None) -> tuple[P, list[str]]:
    """Map one PartitionSpec of logical names onto mesh axes; also return why a dimension stayed replicated."""
    rules = RULES if rules is None else rules
    out, notes, used = [], [], set()
    for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical))):
        axes = tuple(a for a in (rules.get(name) or ()) if mesh.shape[a] > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in axes)
        if axes and dim % size:
            notes.append(f"{name}={dim} is not divisible by {'*'.join(axes)}={size}")
            axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out), notes


def param_shardings(model_cfg: ModelConfig, mesh: Mesh, rules=None):
    """A NamedSharding for every parameter, from model.logical_axes and the rules table."""
    shapes = _param_shapes(model_cfg)
    return jax.tree.map(lambda spec, x: NamedSharding(mesh, logical_to_mesh_spec(spec, x.shape, mesh, rules)[0]),
                        _logical_axes(model_cfg), shapes, is_leaf=lambda s: isinstance(s, P))


def sharding_fallbacks(model_cfg: ModelConfig, mesh: Mesh, rules=None) -> list[str]:
    """One line per parameter dimension that its rule could not split evenly and is therefore replicated."""
    shapes = _param_shapes(model_cfg)
    found = []

    def visit(path, spec, x):
        for note in logical_to_mesh_spec(spec, x.shape, mesh, rules)[1]:
            found.append(f"{jax.tree_util.keystr(path, simple=True, separator='.')}: {note}; replicated")
        return spec

    jax.tree_util.tree_map_with_path(visit, _logical_axes(model_cfg), shapes, is_leaf=lambda s: isinstance(s, P))
    return found


def state_shardings(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh, rules=None) -> TrainState:
    """Shardings of a whole TrainState: optimizer moments mirror their parameter, scalars are replicated."""
    abstract = state_shapes(model_cfg, train_cfg)
    params = param_shardings(model_cfg, mesh, rules)
    opt = optax.tree_map_params(make_optimizer(train_cfg), lambda _, s: s, abstract.opt_state, params,
                                transform_non_params=lambda _: replicated(mesh),
                                is_leaf=lambda s: isinstance(s, NamedSharding))
    return TrainState(step=replicated(mesh), params=params, opt_state=opt)


def abstract_state(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh, rules=None) -> TrainState:
    """ShapeDtypeStructs with shardings: the target for an orbax restore onto this mesh (any saving mesh)."""
    abstract = state_shapes(model_cfg, train_cfg)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, state_shardings(model_cfg, train_cfg, mesh, rules))


def create_sharded_state(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh, rng, params=None,
                         rules=None) -> TrainState:
    """A step-0 TrainState created directly in its shards: no device ever holds the whole model."""
    shardings = state_shardings(model_cfg, train_cfg, mesh, rules)
    if params is None:
        init = jax.jit(partial(init_train_state, model_cfg, train_cfg), out_shardings=shardings)
        return init(rng)
    params = shard_params(model_cfg, params, mesh, rules)
    # Not donated: device_put may hand back the caller's own arrays when they are already laid out right.
    init = jax.jit(lambda r, p: init_train_state(model_cfg, train_cfg, r, params=p), out_shardings=shardings)
    return init(rng, params)


def shard_params(model_cfg: ModelConfig, params, mesh: Mesh, rules=None):
    """Place loaded parameters (host arrays, identical on every process) onto the mesh by the rules."""
    expected, got = flat_shapes(_param_shapes(model_cfg)), flat_shapes(params)
    wrong = [f"{k}: {got.get(k)} (expected {v})" for k, v in expected.items() if got.get(k) != v]
    wrong += [f"{k}: unexpected" for k in got.keys() - expected.keys()]
    if wrong:
        raise ValueError(f"params do not fit the model config: {'; '.join(sorted(wrong)[:5])}")
    if jax.process_count() > 1:  # each process cuts its own devices' shards out of its host copy
        params = jax.device_get(params)
    return jax.device_put(params, param_shardings(model_cfg, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 3) -> NamedSharding:
    """Sharding of x, y [A, B, T] (or [B, T] with ndim=2): B split over data and fsdp, replicated over tensor."""
    return NamedSharding(mesh, P(*(None,) * (ndim - 2), BATCH_AXES, None))


def check_batch_size(mesh: Mesh, batch_size: int) -> None:
    """Raise unless batch_size splits evenly over the data and fsdp axes."""
    ways = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if batch_size % ways:
        raise ValueError(f"batch_size {batch_size} must be divisible by data*fsdp = {ways} "
                         f"(mesh {dict(mesh.shape)})")


def cache_shardings(model_cfg: ModelConfig, mesh: Mesh, batch_size: int, max_len: int) -> KVCache:
    """Shardings of a KVCache (per layer k [B, H, D, S], v [B, H, S, D]): rows like the batch, heads like the
    attention weights."""
    B, H, D, L = batch_size, model_cfg.n_head, model_cfg.head_dim, model_cfg.n_layer
    k_spec, _ = logical_to_mesh_spec(P("batch", "heads", "head_dim", None), (B, H, D, max_len), mesh)
    v_spec, _ = logical_to_mesh_spec(P("batch", "heads", None, "head_dim"), (B, H, max_len, D), mesh)
    return KVCache(k=(NamedSharding(mesh, k_spec),) * L, v=(NamedSharding(mesh, v_spec),) * L,
                   index=replicated(mesh))


_COLLECTIVE = re.compile(r"=\s+(.*?)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                         r"(?:-start)?\(")


def collectives(hlo: str) -> dict[str, collections.Counter]:
    """{kind: Counter(per-device result type)} of the collectives in a compiled step's HLO text."""
    found = collections.defaultdict(collections.Counter)
    for line in hlo.splitlines():
        op = _COLLECTIVE.search(line)
        if op:
            found[op.group(2)][re.sub(r"\{[^}]*\}|/\*[^*]*\*/", "", op.group(1))] += 1
    return found


def whole_batch_collectives(hlo: str, batch_size: int, seq_len: int) -> list[str]:
    """The collectives of a compiled step that move a [batch_size, seq_len, ...] array: with the rows split over
    data and fsdp, the whole batch's activations, which a step should never gather."""
    leading = re.compile(rf"\[{batch_size},{seq_len}[,\]]")
    return [f"{kind} {t}" for kind, types in collectives(hlo).items() for t in types if leading.search(t)]


def with_activation_layout(fn, mesh: Mesh, rules=None):
    """fn traced with the model's activations laid out on the mesh by the same rules: rows over data and fsdp,
    heads, MLP units and vocabulary over tensor, the rest (embed included) whole on each device.

    Left to XLA's propagation from the weights alone, fsdp's split of the embed dimension spread onto the
    activations: the compiled gpt2-width fsdp:8 step (2 layers, B=16, T=256) all-gathered [B, T, 4C] activations
    of the whole batch and all-reduced the whole batch's [B, T, V] logits (824 MB), instead of gathering weights.
    """
    def constrain(x, axes):
        spec, _ = logical_to_mesh_spec(P(*axes), x.shape, mesh, rules)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    def laid_out(*args):
        with activation_layout(constrain):
            return fn(*args)

    return laid_out


def make_sharded_train_step(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh, rules=None):
    """jit(train_step) with state sharded by the rules, x/y by batch_sharding, and the state donated."""
    state_sh = state_shardings(model_cfg, train_cfg, mesh, rules)
    batch, rep = batch_sharding(mesh), replicated(mesh)
    step = with_activation_layout(make_train_step(model_cfg, train_cfg), mesh, rules)
    return jax.jit(step, in_shardings=(state_sh, batch, batch, rep), out_shardings=(state_sh, rep), donate_argnums=0)


def make_sharded_eval_step(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh, rules=None):
    """jit(eval_step) for x, y [B, T] split over data and fsdp."""
    params_sh = param_shardings(model_cfg, mesh, rules)
    rows = batch_sharding(mesh, ndim=2)
    step = with_activation_layout(make_eval_step(model_cfg, train_cfg), mesh, rules)
    return jax.jit(step, in_shardings=(params_sh, rows, rows), out_shardings=replicated(mesh))


def tree_bytes_per_device(tree) -> int:
    """Bytes of one device's shard of every leaf (the whole leaf where it has no sharding)."""
    total = 0
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def state_bytes_per_device(state: TrainState) -> dict[str, int]:
    """Per-device bytes of the parameters and of the optimizer state (arrays or abstract_state)."""
    return {"params": tree_bytes_per_device(state.params), "opt_state": tree_bytes_per_device(state.opt_state)}


def memory_summary(state: TrainState) -> str:
    """One line for train.py's start: per-device bytes of params and optimizer state, and the unsharded sizes."""
    def whole(tree) -> int:
        return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))

    per = state_bytes_per_device(state)
    return (f"per device: params {format_bytes(per['params'])}, optimizer state {format_bytes(per['opt_state'])} "
            f"(unsharded: {format_bytes(whole(state.params))}, {format_bytes(whole(state.opt_state))})")


def format_bytes(n: int) -> str:
    """4 significant digits in the largest decimal unit that keeps the number >= 1: 812.3 kB, 6.23 GB."""
    units = ("B", "kB", "MB", "GB", "TB")
    power = 0
    while power + 1 < len(units) and n >= 1000 ** (power + 1):
        power += 1
    return f"{n / 1000**power:.4g} {units[power]}"


MAX_JOIN_TIMEOUT_S = 7 * 24 * 3600


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, join_timeout_s: float = 300.0,
                           on_timeout: Callable[[str], None] | None = None) -> bool:
    """Join a multi-process run; returns False (and does nothing) for a single process.

    Values come from the arguments, else JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
    coordinator_address="auto", or a SLURM job step of several tasks, lets JAX detect everything
    (SLURM, Open MPI, Cloud TPU pods). Must run before anything touches a device. When not every process has
    joined after join_timeout_s, on_timeout(message) is called from another thread (JAX itself would end the
    process with a C++ check failure a minute later); it should report and end the process.
    """
    if not 0 < join_timeout_s <= MAX_JOIN_TIMEOUT_S:  # (JAX takes a C int of seconds)
        raise ValueError(f"join_timeout must be a number of seconds in (0, {MAX_JOIN_TIMEOUT_S}] (a week); "
                         f"got {join_timeout_s!r}")
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    slurm_tasks = _env_int("SLURM_NTASKS") or 0
    # CPU processes exchange collectives through gloo; GPU and TPU use their own and ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if address == "auto" or (address is None and num is None and pid is None and slurm_tasks > 1):
        _join(join_timeout_s, on_timeout, "the processes of the cluster that JAX detected",
              "check that every task of the job started")
        return True
    if address is None and num is None and pid is None:
        return False
    missing = [n for n, v in (("coordinator_address", address), ("num_processes", num), ("process_id", pid))
               if v is None]
    if missing:
        raise ValueError(f"multi-process run needs {', '.join(missing)} too (flags or JAX_COORDINATOR_ADDRESS, "
                         "JAX_NUM_PROCESSES, JAX_PROCESS_ID), or coordinator_address=auto")
    if not 0 <= pid < num:
        raise ValueError(f"process_id {pid} must be in [0, num_processes={num})")
    _join(join_timeout_s, on_timeout, f"process {pid}: the {num} processes at {address}",
          "start the same command on every host with the same coordinator address and process count and a "
          "distinct process id", coordinator_address=address, num_processes=num, process_id=pid)
    return True


# Flags that say how to join a multi-process run (their text, as given); no config records them.
CLUSTER_FLAGS = ("coordinator_address", "num_processes", "process_id", "join_timeout")


def join_cluster(flags: dict[str, str]) -> bool:
    """initialize_distributed from the text of CLUSTER_FLAGS (absent ones from the environment); a ConfigError
    names a flag that is not a number. A process that waits past join_timeout prints why and exits 1."""
    numbers = {}
    for key in ("num_processes", "process_id"):
        if key in flags:
            try:
                numbers[key] = int(flags[key])
            except ValueError:
                raise ConfigError(f"--{key} must be an integer; got {flags[key]!r}") from None
    try:
        timeout = float(flags.get("join_timeout", 300))
    except ValueError:
        raise ConfigError(f"--join_timeout must be a number of seconds; got {flags['join_timeout']!r}") from None
    try:
        return initialize_distributed(flags.get("coordinator_address"), numbers.get("num_processes"),
                                      numbers.get("process_id"), timeout, on_timeout=_give_up_joining)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _give_up_joining(message: str) -> None:
    """Called from a timer thread while the main thread waits inside jax.distributed.initialize."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def _join(timeout_s: float, on_timeout: Callable[[str], None] | None, who: str, advice: str, **where) -> None:
    timer = None
    if on_timeout is not None:
        message = f"{who} did not all join within {timeout_s:g} s; {advice}, or allow longer with --join_timeout"
        timer = threading.Timer(timeout_s, on_timeout, args=(message,))
        timer.daemon = True
        timer.start()
    try:
        # JAX's own deadline a minute later, so that on_timeout speaks first.
        jax.distributed.initialize(**where, initialization_timeout=math.ceil(timeout_s) + 60)
    finally:
        if timer is not None:
            timer.cancel()


def is_main_process() -> bool:
    """True on the one process that prints, writes metrics and draws progress bars."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any one (a Ctrl-C or SIGTERM that reached only some)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def process_batch_rows(mesh: Mesh, batch_size: int) -> slice:
    """The rows of each global batch [A, B, T] that this process reads (its devices' shards of B)."""
    check_batch_size(mesh, batch_size)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((1, batch_size, 1))
    rows = sorted({i for idx in index_map.values() for i in range(batch_size)[idx[1]]})
    if rows != list(range(rows[0], rows[-1] + 1)):
        raise ValueError(f"process {jax.process_index()} owns non-contiguous batch rows {rows}; "
                         "order the mesh so that each host's devices are adjacent on data/fsdp")
    return slice(rows[0], rows[-1] + 1)


def host_local_to_global(local, mesh: Mesh, batch_size: int) -> jax.Array:
    """This process's rows [A, b, T] or [b, T] (from process_batch_rows) -> the global [A, batch_size, T] or
    [batch_size, T]."""
    rows = process_batch_rows(mesh, batch_size)
    local = np.asarray(local)
    n = rows.stop - rows.start
    if local.ndim not in (2, 3) or local.shape[-2] != n:
        raise ValueError(f"process {jax.process_index()} must pass its rows {rows.start}:{rows.stop} as "
                         f"[A, {n}, T] or [{n}, T]; got shape {local.shape}")
    global_shape = (*local.shape[:-2], batch_size, local.shape[-1])
    return jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim), local, global_shape)


# Tracing a Flax init takes a noticeable fraction of a second; configs are frozen, so cache the shapes.
@lru_cache(maxsize=16)
def _param_shapes(model_cfg: ModelConfig):
    return abstract_params(model_cfg)


@lru_cache(maxsize=16)
def _logical_axes(model_cfg: ModelConfig):
    return logical_axes(model_cfg)


@lru_cache(maxsize=16)
def state_shapes(model_cfg: ModelConfig, train_cfg: TrainConfig) -> TrainState:
    """The shapes and dtypes of a TrainState (jax.ShapeDtypeStruct leaves), without allocating it."""
    return jax.eval_shape(partial(init_train_state, model_cfg, train_cfg), jax.random.PRNGKey(0))


def flat_shapes(tree) -> dict[str, tuple[int, ...]]:
    """{"h/attn/c_attn/kernel": shape} of a tree's leaves, the same names for a dict, a dataclass or an orbax
    metadata tree of the same structure."""
    def name(key) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(name(k) for k in path): tuple(np.shape(leaf)) for path, leaf in leaves}


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer; got {text!r}") from None
