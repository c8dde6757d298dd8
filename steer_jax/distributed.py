"""Mesh, partition rules and multi-host start: one place that says where every tensor lives.

Why logical axes: a parameter is described once by what its dimensions mean ('heads', 'mlp',
'vocab', ...), and one small table maps those meanings onto the ('data', 'model') mesh. Changing
the parallelism (more model parallelism for a 12B model, pure data parallelism for a 1.5B one)
is then a mesh shape, not an edit to every tensor, and the same code runs on 1 CPU device, 8 fake
CPU devices, a TPU host and a pod slice.

Weights are split over 'model' along heads, KV heads, the MLP width and the vocabulary (the
Megatron split: each device holds whole heads, so attention needs no communication inside a
head), and batch rows (KV cache, trace state) over 'data'. A dimension that does not divide its
mesh axis is replicated instead, with one warning per tensor and reason: a slower layout that
runs is better than a failed run on a mesh the checkpoint does not fit evenly.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from steer_jax.modeling import execution
from steer_jax.modeling.transformer import KVCache, Model, Params

log = logging.getLogger(__name__)

AXES = ("data", "model")

# Logical dimension name -> mesh axis. Names absent here ('embed', 'layers', 'head_dim', ...)
# are replicated: sharding the residual width would put a collective in every norm.
RULES: dict[str, str] = {
    "batch": "data",
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "vocab": "model",
}

# The page pool is one per model, shared by every row, so it is not split over 'data' (a row's
# pages may be anywhere in it); its KV heads split over 'model' as the weights' do.
CACHE_AXES: dict[str, tuple[str | None, ...]] = {
    "k": ("layers", "kv_heads", None, None, None),
    "v": ("layers", "kv_heads", None, None, None),
    "pages": ("batch", None),
    "length": ("batch",),
    "free": (None,),
    "stamp": ("batch",),
    "k_local": ("layers", "kv_heads", None, None, None),  # the sliding layers' pool, if any
    "v_local": ("layers", "kv_heads", None, None, None),
    "pages_local": ("batch", None),
    "free_local": (None,),
}

# (tensor name, reason) pairs already reported: a fallback is said once, not once per layer
# or per call.
_warned: set[tuple[str, str]] = set()


def make_mesh(data: int, model: int, devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'model') mesh over `devices`, by default all of `jax.devices()`."""
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    if data < 1 or model < 1 or data * model != n:
        raise ValueError(f"mesh data={data} x model={model} = {data * model} devices, but there "
                         f"are {n} devices: choose data * model == {n}")
    # Auto axes: the model code carries no sharding annotations; XLA propagates them from the
    # arguments. jax.make_mesh orders devices by the physical topology (ICI rings on TPU).
    return jax.make_mesh((data, model), AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


def mesh_from_config(cfg: dict[str, Any]) -> Mesh:
    """The mesh a run config asks for: `mesh.data`, `mesh.model`; a missing one takes the rest
    of the devices, and with neither every device is on 'data'.

    The devices are this process's: on one host all of them; in a multi-process run each
    process runs its slice of the traces on a mesh of its own devices (only the mixtures' few
    numbers per trace cross hosts, `Peers`), and `mesh.data` x `mesh.model` is one host's
    device count.
    """
    section = cfg.get("mesh") or {}
    unknown = set(section) - set(AXES)
    if unknown:
        raise ValueError(f"unknown mesh keys {sorted(unknown)}; use mesh.data and mesh.model")
    devices = jax.local_devices()
    n = len(devices)
    data, model = section.get("data"), section.get("model")
    if data is None and model is None:
        data, model = n, 1
    elif data is None or model is None:
        given, name = (model, "model") if data is None else (data, "data")
        if not isinstance(given, int) or given < 1 or n % given:
            raise ValueError(f"mesh.{name}={given} does not divide the {n} devices")
        data, model = (n // given, given) if data is None else (given, n // given)
    return make_mesh(data, model, devices)


def initialize(cfg: dict[str, Any]) -> None:
    """Join a multi-host run before anything touches a device, from the `distributed` section.

    With `coordinator` ('host:port' of process 0), `num_processes` and `process_id` given they
    are used as they are (GPU clusters, or TPUs with a chosen port); with `auto: true` JAX reads
    them from the environment (Cloud TPU metadata, SLURM). Without the section nothing happens:
    a single host needs no coordinator.
    """
    section = dict(cfg.get("distributed") or {})
    if not section:
        return
    if "cpu" in str(jax.config.jax_platforms or ""):  # CPU hosts talk through gloo
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    auto = section.pop("auto", False)
    keys = ("coordinator", "num_processes", "process_id")
    unknown = set(section) - set(keys)
    if unknown:
        raise ValueError(f"unknown distributed keys {sorted(unknown)}; use auto or {keys}")
    if auto:
        if section:
            raise ValueError(f"distributed.auto excludes {sorted(section)}: the environment "
                             "supplies them")
        jax.distributed.initialize()
        return
    missing = [k for k in keys if section.get(k) is None]
    if missing:
        raise ValueError(f"distributed needs {', '.join(keys)} together (or auto: true); "
                         f"missing {', '.join(missing)}")
    jax.distributed.initialize(coordinator_address=section["coordinator"],
                               num_processes=int(section["num_processes"]),
                               process_id=int(section["process_id"]))


def _spec(name: str, shape: tuple[int, ...], axes: tuple[str | None, ...],
          mesh: Mesh) -> PartitionSpec:
    """PartitionSpec of one tensor; a dim that does not divide its mesh axis stays whole."""
    if len(axes) != len(shape):
        raise ValueError(f"tensor {name} has shape {shape}, but its logical axes {axes} "
                         f"name {len(axes)} dims")
    spec: list[str | None] = []
    for dim, (size, logical) in enumerate(zip(shape, axes)):
        axis = RULES.get(logical) if logical else None
        if axis is not None and size % mesh.shape[axis]:
            reason = (f"dim {dim} ({logical}) of size {size} does not divide mesh axis "
                      f"'{axis}' of size {mesh.shape[axis]}")
            if (name, reason) not in _warned:
                _warned.add((name, reason))
                log.warning("replicating %s along %s: %s", name, logical, reason)
            axis = None
        # A mesh axis of size 1 adds nothing; leaving it out keeps the specs readable.
        spec.append(axis if axis is not None and mesh.shape[axis] > 1 else None)
    return PartitionSpec(*spec)


def _param_axes(path: tuple[Any, ...]) -> tuple[str, tuple[str, ...]]:
    """(name, logical axes) of the parameter at a path of the declared tree: the axes its
    `nnx.Param` declares (`modeling.module`)."""
    # The module (and flax) on first use, not at `import steer_jax` (see modeling/loading.py).
    from steer_jax.modeling.module import param_specs

    keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
    name = ".".join(str(k) for k in keys)
    declared = param_specs()
    if keys not in declared:
        raise ValueError(f"parameter {name} has no partition rule: "
                         "steer_jax.modeling.module declares no such parameter")
    return name, declared[keys].axes


def param_shardings(params: Params, mesh: Mesh) -> Params:
    """A NamedSharding per parameter of the declared tree (`param_shapes`,
    `execution.canonical`); a model that runs its layers unrolled slices them from there, and
    each slice keeps its share of the devices.

    Leaves only need a `.shape`, so `jax.eval_shape` / `param_shapes` trees work too: a loader
    can place each tensor on its devices as it reads it.
    """
    def one(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        name, axes = _param_axes(path)
        return NamedSharding(mesh, _spec(name, tuple(leaf.shape), axes, mesh))

    return jax.tree_util.tree_map_with_path(one, params)


def shard_params(params: Params, mesh: Mesh) -> Params:
    """Declared-layout params (`execution.canonical`) placed on `mesh` by the partition rules."""
    return jax.device_put(params, param_shardings(params, mesh))


def shard_model(model: Model, mesh: Mesh) -> Model:
    """The same model with its params placed on `mesh`: its layers as they ran, the CPU kernels
    (which run on one device) kept only on a one-device mesh."""
    from steer_jax.modeling.module import layout  # flax on first use (see _param_axes)

    cfg = model.config
    params = shard_params(execution.canonical(cfg, model.params), mesh)
    cfg = dataclasses.replace(cfg, execution=execution.on_devices(cfg.execution, mesh.size))
    return dataclasses.replace(model, config=cfg, params=layout(cfg, params))


def mesh_of(params: Params) -> Mesh | None:
    """The mesh the params are sharded on, or None when they live on one device.

    The engine takes its layout from the weights it is given, so callers shard a model once
    (`shard_model`, or `load_model(mesh=...)`) and every cache and batch follows it.
    """
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def place_cache(cache: KVCache, params: Params) -> KVCache:
    """`cache` sharded like the model whose `params` will fill it; unchanged off a mesh."""
    mesh = mesh_of(params)
    return cache if mesh is None else shard_cache(cache, mesh)


def cache_shardings(cache: KVCache, mesh: Mesh) -> KVCache:
    """A NamedSharding per KV cache field: rows over 'data', KV heads over 'model'."""
    return KVCache(**{f: NamedSharding(mesh, _spec(f"cache.{f}", tuple(getattr(cache, f).shape),
                                                   axes, mesh))
                      for f, axes in CACHE_AXES.items() if getattr(cache, f) is not None})


def shard_cache(cache: KVCache, mesh: Mesh) -> KVCache:
    """The KV cache placed on `mesh`."""
    return jax.device_put(cache, cache_shardings(cache, mesh))



@dataclasses.dataclass(frozen=True)
class Peers:
    """The processes that share one run's rounds, each holding a contiguous slice of its traces
    (`sizes[p]` traces of process p, in process order).

    A round's mixture is fitted over every running trace of the run, so each fit gathers every
    process's step confidences and membership flags (one float and one flag per trace) and every
    process fits the same mixture from the same numbers. One process gathers nothing.
    """

    sizes: tuple[int, ...] = ()
    index: int = 0

    @classmethod
    def of_run(cls, total: int) -> Peers:
        """This process's share of `total` traces: contiguous slices, sizes differing by <= 1."""
        n = jax.process_count()
        return cls(tuple((p + 1) * total // n - p * total // n for p in range(n)),
                   jax.process_index())

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.index])

    def gather(self, x: jax.Array) -> jax.Array:
        """[local] -> [run]: every process's values, in process order."""
        if len(self.sizes) <= 1:
            return x
        from jax.experimental import multihost_utils

        width = max(self.sizes)
        local = np.zeros((width,), np.asarray(x).dtype)
        local[: self.sizes[self.index]] = np.asarray(x)
        parts = np.asarray(multihost_utils.process_allgather(local))  # [processes, width]
        return jnp.asarray(np.concatenate([parts[p, :n] for p, n in enumerate(self.sizes)]))

    def local(self, x: jax.Array) -> jax.Array:
        """[run] -> this process's slice."""
        return x if len(self.sizes) <= 1 else x[self.offset: self.offset + self.sizes[self.index]]

    def smallest(self, value: int) -> int:
        """The smallest of every process's `value`, in every process."""
        if len(self.sizes) <= 1:
            return value
        from jax.experimental import multihost_utils

        return int(np.min(multihost_utils.process_allgather(np.int32(value))))

    def any(self, flag: bool) -> bool:
        """Whether any process's `flag` is set (so every process runs the same rounds)."""
        if len(self.sizes) <= 1:
            return flag
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
