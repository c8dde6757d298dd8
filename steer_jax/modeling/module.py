"""The model as a `flax.nnx` module: every parameter declared once, everything else derived.

One `Transformer` over a `ModelConfig` covers Qwen2 / Qwen2.5 / Qwen2.5-Math and Gemma 3 text
through the config's switches (qkv_bias, qk_norm, sandwich_norms, tie_embeddings, value_head,
norm_plus_one). Each parameter is one `nnx.Param` created in `__init__` with:

- its logical axes as `out_sharding` metadata ('vocab', 'embed', 'heads', 'kv_heads',
  'head_dim', 'mlp', and 'layers' in front of a layer parameter). Its shape is those axes'
  sizes in the config, so the shape and the sharding cannot disagree. The names are logical,
  not mesh axes: `distributed` maps them onto a mesh (replicating a dimension that does not
  divide), so eager sharding is off and building a module needs no mesh;
- `contracts` metadata on the layers' dense weights: how many axes after 'layers' the matmul
  contracts ('o' contracts heads and head_dim), which `panel_matmul` packs by;
- its initializer: normal(0.02) drawn in float32 and cast, for matrices, embeddings and biases;
  the family's neutral norm (0 where RMSNorm scales by 1 + w, else 1); a value head's bias 0.

Derived from that declaration: `init_params`, `param_shapes` (`nnx.eval_shape`, no memory),
`num_params`, `param_specs` (path -> logical axes and contraction: the mesh shardings of
`distributed`, the CPU kernels' packing (`layout`), the walk of `export`), and the HF name map,
whose per-family tables (`weights.COMMON`, `qwen2.RULES`, `gemma3.RULES`) are keyed by these
module paths.

Decisions:
- The state is exactly the tree the pure `transformer.forward` reads:
  `nnx.to_pure_dict(nnx.state(module, nnx.Param))` is {embed, final_norm, layers: {q, k, ...},
  lm_head, v_head: {w, b}}: the declared layout. `layout` puts it into the one a config's
  `execution` runs (per-layer arrays, CPU-kernel panels), and `execution.canonical` reads it
  back. The decode loop stays a pure function (`nnx.split` outside `jit`, `nnx.merge` or the
  state inside), and no Python object crosses a `while_loop`.
- `Layers` holds every decoder layer, each parameter stacked on a leading 'layers' axis (one
  array per name, as `lax.scan` takes them), not a list of per-layer modules.
- Random keys: the constructor takes one key, split in 16, and each random parameter takes the
  next in declaration order (layers' q, k, v, o, gate, up, down, biases; then embed, lm_head,
  v_head), so a seed's weights are those `steer-jax train-demo` started the shipped demo
  models (models/) from.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from steer_jax.modeling import execution, transformer
from steer_jax.modeling.config import Execution, ModelConfig, RopeConfig
from steer_jax.modeling.kv_cache import KVCache

Params = dict[str, Any]
Path = tuple[str, ...]
_STD = 0.02


def _normal(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return (_STD * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class _Declare:
    """Makes one `nnx.Param` from its logical axes: shape, initializer and metadata together."""

    def __init__(self, cfg: ModelConfig, key: jax.Array, dtype: Any) -> None:
        self.sizes = dict(layers=cfg.num_layers, vocab=cfg.vocab_size, embed=cfg.hidden_size,
                          heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                          mlp=cfg.intermediate_size)
        self.neutral = 0.0 if cfg.norm_plus_one else 1.0
        self.keys, self.dtype = iter(jax.random.split(key, 16)), dtype

    def _param(self, axes: tuple[str, ...], init: Callable[[tuple[int, ...]], jax.Array],
               **metadata: Any) -> nnx.Param:
        value = init(tuple(self.sizes[a] for a in axes))
        return nnx.Param(value, out_sharding=axes, eager_sharding=False, **metadata)

    def normal(self, *axes: str, contracts: int | None = None) -> nnx.Param:
        meta = {} if contracts is None else {"contracts": contracts}
        return self._param(axes, lambda s: _normal(next(self.keys), s, self.dtype), **meta)

    def norm(self, *axes: str) -> nnx.Param:
        return self._param(axes, lambda s: jnp.full(s, self.neutral, self.dtype))

    def zeros(self, *axes: str) -> nnx.Param:
        return self._param(axes, lambda s: jnp.zeros(s, self.dtype))


class Layers(nnx.Module):
    """Every decoder layer's parameters, each stacked on a leading 'layers' axis."""

    def __init__(self, cfg: ModelConfig, p: _Declare) -> None:
        L = "layers"
        self.attn_norm = p.norm(L, "embed")
        self.q = p.normal(L, "embed", "heads", "head_dim", contracts=1)
        self.k = p.normal(L, "embed", "kv_heads", "head_dim", contracts=1)
        self.v = p.normal(L, "embed", "kv_heads", "head_dim", contracts=1)
        self.o = p.normal(L, "heads", "head_dim", "embed", contracts=2)
        self.mlp_norm = p.norm(L, "embed")
        self.gate = p.normal(L, "embed", "mlp", contracts=1)
        self.up = p.normal(L, "embed", "mlp", contracts=1)
        self.down = p.normal(L, "mlp", "embed", contracts=1)
        if cfg.qkv_bias:
            self.q_bias = p.normal(L, "heads", "head_dim")
            self.k_bias = p.normal(L, "kv_heads", "head_dim")
            self.v_bias = p.normal(L, "kv_heads", "head_dim")
        if cfg.qk_norm:
            self.q_norm, self.k_norm = p.norm(L, "head_dim"), p.norm(L, "head_dim")
        if cfg.sandwich_norms:
            self.post_attn_norm, self.post_mlp_norm = p.norm(L, "embed"), p.norm(L, "embed")


class ValueHead(nnx.Module):
    """A process reward model's linear head on the last hidden state."""

    def __init__(self, p: _Declare) -> None:
        self.w = p.normal("embed")
        self.b = p.zeros()


class Transformer(nnx.Module):
    """A decoder-only transformer of either family; `params()` is the pure forward's tree.

    `key`: split for the random parameters (see the module docstring); `dtype`: the weights'."""

    def __init__(self, cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32) -> None:
        self.config = cfg
        p = _Declare(cfg, key, dtype)
        self.layers = Layers(cfg, p)
        self.embed = p.normal("vocab", "embed")
        self.final_norm = p.norm("embed")
        if not cfg.tie_embeddings:
            self.lm_head = p.normal("vocab", "embed")
        if cfg.value_head:
            self.v_head = ValueHead(p)

    def params(self) -> Params:
        """The parameters as the plain pytree `transformer.forward` and the decoder read."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def __call__(self, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """`transformer.forward` on this module's own parameters."""
        return transformer.forward(layout(self.config, self.params()), self.config, tokens, cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return transformer.logits(layout(self.config, self.params()), self.config, hidden)


def _abstract(cfg: ModelConfig, dtype: Any = jnp.float32) -> Transformer:
    return nnx.eval_shape(lambda: Transformer(cfg, jax.random.key(0), dtype))


def init_params(cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Random parameters in the steer-jax layout (tests, benchmarks, the demo trainer)."""
    return Transformer(cfg, key, dtype).params()


def param_shapes(cfg: ModelConfig, dtype: Any = jnp.float32) -> Params:
    """Abstract parameters (`jax.ShapeDtypeStruct`), no memory: the model's parameter tree."""
    return _abstract(cfg, dtype).params()


def num_params(cfg: ModelConfig) -> int:
    """Total parameter count; tied embeddings are counted once (they are one tensor)."""
    return int(sum(x.size for x in jax.tree.leaves(param_shapes(cfg))))


def layout(cfg: ModelConfig, params: Params) -> Params:
    """The declared tree `params` in the layout `cfg.execution` runs (`execution.layout`, with
    each dense weight's contraction from this declaration)."""
    return execution.layout(cfg, params, dense_inputs())


def from_params(cfg: ModelConfig, params: Params) -> Transformer:
    """The module holding `params`, in any execution's layout (`Model(cfg, params)`'s);
    ValueError if they are not `cfg`'s parameter tree."""
    params = execution.canonical(cfg, params)
    cfg = dataclasses.replace(cfg, execution=Execution())
    module = _abstract(cfg)
    want = jax.tree.map(lambda s: s.shape, module.params())
    got = jax.tree.map(lambda x: tuple(getattr(x, "shape", ())), params)
    if got != want:
        raise ValueError(f"params are not the parameter tree of this config: expected shapes "
                         f"{want}, got {got}")
    state = nnx.state(module, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(module, state)
    return module


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter's declaration as the rest of the code reads it."""

    axes: tuple[str, ...]  # logical axes; a layer parameter's start with 'layers'
    contracts: int | None = None  # a dense weight: how many axes after 'layers' a matmul contracts


# Every optional parameter switched on, so its module declares every parameter any config can.
_EVERY_PARAMETER = ModelConfig(
    family="qwen2", vocab_size=1, hidden_size=1, intermediate_size=1, num_layers=1, num_heads=1,
    num_kv_heads=1, head_dim=2, rms_norm_eps=1e-6, tie_embeddings=False, sliding_layers=(False,),
    sliding_window=None, rope_global=RopeConfig(1.0), rope_local=RopeConfig(1.0),
    max_position_embeddings=1, qkv_bias=True, qk_norm=True, sandwich_norms=True, value_head=True)


@functools.cache
def _specs(cfg: ModelConfig) -> tuple[tuple[Path, ParamSpec], ...]:
    flat = nnx.to_flat_state(nnx.state(_abstract(cfg), nnx.Param))
    return tuple((tuple(str(k) for k in path), ParamSpec(tuple(v.get_metadata()["out_sharding"]),
                                                         v.get_metadata().get("contracts")))
                 for path, v in flat)


def param_specs(cfg: ModelConfig | None = None) -> dict[Path, ParamSpec]:
    """Module path -> declaration, for `cfg`'s parameters; None: every parameter any config
    declares (a sharding or packing rule asked about a tree without its config)."""
    return dict(_specs(_EVERY_PARAMETER if cfg is None else cfg))


def dense_inputs() -> dict[str, int]:
    """Layer weight name -> how many leading axes its matmul contracts (`execution.dense`)."""
    return {path[1]: spec.contracts for path, spec in param_specs().items()
            if path[0] == "layers" and spec.contracts is not None}
