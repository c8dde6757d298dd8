"""The NNX port's one parameter declaration, and everything derived from it.

The references here are independent of `modeling.module`: the hand tables the declaration
replaced (partition axes, dense inputs), the family HF rule tables, hand-computed shapes, the
pure `transformer.forward`, and transformers' own logits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P

from steer_jax import distributed, load_model
from steer_jax.modeling import execution, families, gemma3, module, qwen2, transformer
from steer_jax.modeling.config import Execution
from steer_jax.modeling.kv_cache import KVCache

# The hand tables that stood in distributed.py and panel_matmul.py before the declaration: what
# the derived metadata must reproduce. Layer axes are without the leading 'layers'.
OLD_TOP_AXES = {"embed": ("vocab", "embed"), "lm_head": ("vocab", "embed"),
                "final_norm": ("embed",), "v_head.w": ("embed",), "v_head.b": ()}
OLD_LAYER_AXES = {
    "attn_norm": ("embed",), "q": ("embed", "heads", "head_dim"),
    "k": ("embed", "kv_heads", "head_dim"), "v": ("embed", "kv_heads", "head_dim"),
    "o": ("heads", "head_dim", "embed"), "q_bias": ("heads", "head_dim"),
    "k_bias": ("kv_heads", "head_dim"), "v_bias": ("kv_heads", "head_dim"),
    "q_norm": ("head_dim",), "k_norm": ("head_dim",), "post_attn_norm": ("embed",),
    "mlp_norm": ("embed",), "gate": ("embed", "mlp"), "up": ("embed", "mlp"),
    "down": ("mlp", "embed"), "post_mlp_norm": ("embed",)}
OLD_DENSE_INPUTS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}
OLD_RULES = {"batch": "data", "heads": "model", "kv_heads": "model", "mlp": "model",
             "vocab": "model"}


def _full(family: str):
    """A real config of `family` with every parameter it can have (untied; Qwen2: a value head)."""
    if family == "qwen2":
        return dataclasses.replace(families.known("Qwen2.5-7B-Instruct"), value_head=True)
    return dataclasses.replace(families.known("gemma-3-4b-it"), tie_embeddings=False)


def _tiny(family: str, **kw):
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=8, sliding_layers=(family == "gemma3", False),
                 sliding_window=4 if family == "gemma3" else None)
    return dataclasses.replace(_full(family), **{**small, **kw})


def test_declared_axes_and_dense_inputs_equal_the_old_tables():
    specs = module.param_specs()
    got_top = {".".join(p): s.axes for p, s in specs.items() if p[0] != "layers"}
    got_layer = {p[1]: s.axes[1:] for p, s in specs.items() if p[0] == "layers"}
    assert got_top == OLD_TOP_AXES
    assert got_layer == OLD_LAYER_AXES
    assert all(s.axes[0] == "layers" for p, s in specs.items() if p[0] == "layers")
    assert module.dense_inputs() == OLD_DENSE_INPUTS
    assert distributed.RULES == OLD_RULES


def _old_spec(axes, shape, mesh) -> P:
    """The partition spec the old tables gave: a named dim on its mesh axis where it divides."""
    out = []
    for size, name in zip(shape, axes):
        axis = OLD_RULES.get(name)
        ok = axis is not None and mesh.shape[axis] > 1 and size % mesh.shape[axis] == 0
        out.append(axis if ok else None)
    return P(*out)


def _old_axes(keys) -> tuple[str, ...]:
    if keys[0] == "layers":
        return ("layers",) + OLD_LAYER_AXES[keys[1]]
    return OLD_TOP_AXES[".".join(keys)]


# (1, 1) is the one-device layout; the rest run on conftest's 8 fake CPU devices. The real 7B
# and 4B shapes leave some dims not dividing 8 (28 heads, 4 KV heads), so fallbacks are covered.
@pytest.mark.parametrize("mesh_shape", [(1, 1), (4, 2), (1, 8)])
@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_shardings_from_metadata_equal_the_old_tables(family, mesh_shape, monkeypatch):
    monkeypatch.setattr(distributed, "_warned", set())
    devices = jax.devices()[: mesh_shape[0] * mesh_shape[1]]
    mesh = distributed.make_mesh(*mesh_shape, devices=devices)
    shapes = module.param_shapes(_full(family), jnp.bfloat16)
    shardings = distributed.param_shardings(shapes, mesh)
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    leaves = jax.tree.leaves(shapes)
    assert len(flat) == len(leaves)
    for (path, sharding), leaf in zip(flat, leaves):
        keys = tuple(k.key for k in path)
        assert sharding.spec == _old_spec(_old_axes(keys), leaf.shape, mesh), keys


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_every_declared_parameter_has_exactly_one_hf_rule(family):
    rules = {"qwen2": qwen2.RULES, "gemma3": gemma3.RULES}[family]
    paths = [r.path for r in rules]
    assert len(paths) == len(set(paths)), "a parameter named by two rules"
    declared = set(module.param_specs(_full(family)))
    assert set(paths) == declared
    # And nothing in any family's table names a parameter the module never declares.
    assert set(paths) <= set(module.param_specs())


def test_shapes_follow_the_config_by_hand():
    cfg = _tiny("qwen2")
    shapes = jax.tree.map(lambda s: s.shape, module.param_shapes(cfg))
    L, D, F, H, K, hd, V = 2, 32, 48, 4, 2, 8, 64
    assert shapes["embed"] == shapes["lm_head"] == (V, D) and shapes["final_norm"] == (D,)
    lay = shapes["layers"]
    assert (lay["q"], lay["k"], lay["v"], lay["o"]) == ((L, D, H, hd), (L, D, K, hd),
                                                         (L, D, K, hd), (L, H, hd, D))
    assert (lay["gate"], lay["up"], lay["down"]) == ((L, D, F), (L, D, F), (L, F, D))
    assert (lay["q_bias"], lay["k_bias"]) == ((L, H, hd), (L, K, hd))
    assert shapes["v_head"] == {"w": (D,), "b": ()}
    assert "q_norm" not in lay and "post_attn_norm" not in lay
    tied = module.param_shapes(dataclasses.replace(cfg, tie_embeddings=True, value_head=False))
    assert "lm_head" not in tied and "v_head" not in tied
    per_layer = 2 * D + D * H * hd * 2 + 2 * D * K * hd + 3 * D * F + H * hd + 2 * K * hd
    assert module.num_params(cfg) == 2 * V * D + D + L * per_layer + D + 1


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_init_values(family):
    cfg = _tiny(family, vocab_size=4096)
    params = module.init_params(cfg, jax.random.key(0))
    again = module.init_params(cfg, jax.random.key(0))
    other = module.init_params(cfg, jax.random.key(1))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params),
                                                    jax.tree.leaves(again)))
    assert not np.array_equal(params["embed"], other["embed"])
    neutral = 0.0 if family == "gemma3" else 1.0
    for name, x in {**params["layers"], "final_norm": params["final_norm"]}.items():
        if "norm" in name:
            np.testing.assert_array_equal(x, neutral)
    embed = np.asarray(params["embed"], np.float64)  # 131072 draws: std within 1% of 0.02
    assert abs(embed.std() - 0.02) < 2e-4 and abs(embed.mean()) < 2e-4
    assert not np.array_equal(params["layers"]["q"][0], params["layers"]["k"][0, :, :4])
    bf16 = module.init_params(cfg, jax.random.key(0), jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
    abstract = module.param_shapes(cfg, jnp.bfloat16)
    assert jax.tree.structure(abstract) == jax.tree.structure(bf16)
    assert [(s.shape, s.dtype) for s in jax.tree.leaves(abstract)] == \
        [(x.shape, x.dtype) for x in jax.tree.leaves(bf16)]
    if family == "qwen2":
        np.testing.assert_array_equal(params["v_head"]["b"], 0.0)


def test_init_draws_one_key_per_random_parameter_in_declaration_order():
    # The documented contract (module.py): the key split in 16, normal(0.02) in float32 then
    # cast, in the order q, k, v, o, gate, up, down, biases, embed, lm_head, v_head.w.
    cfg = _tiny("qwen2")
    got = module.init_params(cfg, jax.random.key(7), jnp.bfloat16)
    keys = jax.random.split(jax.random.key(7), 16)
    order = [("layers", n) for n in ("q", "k", "v", "o", "gate", "up", "down", "q_bias",
                                     "k_bias", "v_bias")] + [("embed",), ("lm_head",),
                                                             ("v_head", "w")]
    for key, path in zip(keys, order):
        value = got
        for k in path:
            value = value[k]
        want = (0.02 * jax.random.normal(key, value.shape, jnp.float32)).astype(jnp.bfloat16)
        np.testing.assert_array_equal(value, want, err_msg=".".join(path))


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_module_call_equals_pure_forward_and_split_merge_round_trips(family):
    cfg = _tiny(family)
    model = module.Transformer(cfg, jax.random.key(3))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    assert jax.tree.structure(params) == jax.tree.structure(module.param_shapes(cfg))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 7)), jnp.int32)
    cache = KVCache.init(cfg, 2, 16, jnp.float32)

    @jax.jit
    def through_module(st, t, c):  # the module rebuilt inside jit from its state pytree
        return nnx.merge(graphdef, st)(t, c)

    @jax.jit
    def pure(p, t, c):
        return transformer.forward(p, cfg, t, c)

    (h1, c1), (h2, c2) = through_module(state, tokens, cache), pure(params, tokens, cache)
    np.testing.assert_array_equal(h1, h2)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(c1), jax.tree.leaves(c2)))
    merged = nnx.merge(graphdef, state)
    assert merged.config == cfg
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(merged.params()),
                                                    jax.tree.leaves(params)))
    # Decoding in a while_loop: only the state pytree and the cache cross the loop.
    step = jnp.zeros((2, 1), jnp.int32)

    @jax.jit
    def greedy(st, c, first):
        def body(_, carry):
            c, tok = carry
            m = nnx.merge(graphdef, st)
            h, c = m(tok, c)
            return c, m.logits(h)[:, -1:].argmax(-1).astype(jnp.int32)
        return jax.lax.fori_loop(0, 3, body, (c, first))

    _, got = greedy(state, c2, step)
    c, tok = c2, step
    for _ in range(3):
        h, c = transformer.forward(params, cfg, tok, c)
        tok = transformer.logits(params, cfg, h)[:, -1:].argmax(-1).astype(jnp.int32)
    np.testing.assert_array_equal(got, tok)


@pytest.mark.parametrize("name", ["qwen2_untied_gqa", "gemma3_text"])
def test_module_from_a_checkpoint_gives_transformers_logits(tiny_models, name):
    path, hf = tiny_models[name]
    loaded = load_model(path, "float32", scan_layers=True, cpu_kernels=False)
    model = module.from_params(loaded.config, loaded.params)
    ids = np.random.default_rng(1).integers(3, 120, (2, 11))
    hidden, _ = model(jnp.asarray(ids, jnp.int32),
                      KVCache.init(loaded.config, 2, 11, jnp.float32))
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(ids)).logits.float().numpy()
    got = np.asarray(model.logits(hidden))
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-5
    # Any execution's layout gives the same module; a tree of other shapes is an error.
    packed = load_model(path, "float32", scan_layers=False)
    assert packed.config.execution == Execution(scan_layers=False, cpu_kernels=True)
    again = module.from_params(packed.config, packed.params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again.params()),
                                                     jax.tree.leaves(model.params())))
    one_layer = {**loaded.params, "layers": jax.tree.map(lambda a: a[:1], loaded.params["layers"])}
    with pytest.raises(ValueError, match="not the parameter tree of this config"):
        module.from_params(loaded.config, one_layer)


@pytest.mark.parametrize("family, tied", [("qwen2", False), ("gemma3", True)])
def test_every_execution_holds_the_declared_tree_and_reads_it_back(family, tied):
    cfg = _tiny(family, tie_embeddings=tied)
    params = module.init_params(cfg, jax.random.key(3))
    for how in (Execution(s, k) for s in (True, False) for k in (False, True)):
        run = dataclasses.replace(cfg, execution=how)
        held = module.layout(run, params)
        assert isinstance(held["layers"], dict) == how.scan_layers, how
        back = execution.canonical(run, held)
        assert jax.tree.structure(back) == jax.tree.structure(params), how
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back),
                                                         jax.tree.leaves(params))), how
        assert transformer.Model(run, held).num_params == module.num_params(cfg), how


def test_only_the_execution_seam_asks_which_layout_a_model_holds():
    """Outside modeling/execution.py (and panel_matmul.py, the kernels' own file) no code in the
    package reads an execution's choices, names the packed weight type or re-lays a cache."""
    import ast
    from pathlib import Path

    import steer_jax

    asks = {"scan_layers", "cpu_kernels", "Panels", "per_layer"}
    found = []
    for path in sorted(Path(steer_jax.__file__).parent.rglob("*.py")):
        if path.name in ("execution.py", "panel_matmul.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in asks:
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert found == []
