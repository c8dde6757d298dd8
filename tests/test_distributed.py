"""Sharding over a ('data', 'model') mesh changes where tensors live, never what the model computes.

Runs on the 8 fake CPU devices of conftest.py. Each model/mesh pair costs a compile, so the cases
are few and the unsharded references are computed once per module.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tiny
from steer_jax import distributed, generate, load_model, load_tokenizer, steer
from steer_jax.modeling.module import param_shapes
from steer_jax.modeling.loading import read_config
from steer_jax.modeling.transformer import KVCache

MESHES = [(4, 2), (2, 4), (8, 1)]
TOKENS = [[1, 5, 9, 17, 33, 65, 100, 7, 3, 12, 44, 90]]


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    # The fallback is reported once per process; each test starts as a fresh process would.
    monkeypatch.setattr(distributed, "_warned", set())


def _fallbacks(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == distributed.__name__ and r.getMessage().startswith(f"replicating {name} ")]


def test_make_mesh_and_config():
    mesh = distributed.make_mesh(4, 2)
    assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": 4, "model": 2}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    with pytest.raises(ValueError, match=r"data=3 x model=2 = 6 devices.*8 devices"):
        distributed.make_mesh(3, 2)
    shape = lambda cfg: dict(distributed.mesh_from_config(cfg).shape)  # noqa: E731
    assert shape({}) == {"data": 8, "model": 1}
    assert shape({"mesh": {"model": 2}}) == {"data": 4, "model": 2}
    assert shape({"mesh": {"data": 2}}) == {"data": 2, "model": 4}
    assert shape({"mesh": {"data": 1, "model": 8}}) == {"data": 1, "model": 8}
    with pytest.raises(ValueError, match="mesh.model=3 does not divide the 8 devices"):
        distributed.mesh_from_config({"mesh": {"model": 3}})
    with pytest.raises(ValueError, match="unknown mesh keys"):
        distributed.mesh_from_config({"mesh": {"tensor": 2}})


def _configs(tiny_models):
    """Between them every parameter kind: Qwen2 (QKV bias, untied head, value head) and Gemma 3
    (QK-norm, sandwich norms)."""
    qwen = dataclasses.replace(read_config(tiny_models["qwen2_untied_gqa"][0]), value_head=True)
    return qwen, read_config(tiny_models["gemma3_text"][0])


def test_rules_cover_the_declared_tree(tiny_models):
    mesh = distributed.make_mesh(4, 2)  # every sharded dim of the tiny models divides 2
    expected = {  # the partition rules of the design, written out for a 4 x 2 mesh
        "embed": P("model", None), "lm_head": P("model", None),
        "q": P(None, "model", None), "k": P(None, "model", None), "v": P(None, "model", None),
        "o": P("model", None, None), "q_bias": P("model", None), "k_bias": P("model", None),
        "v_bias": P("model", None), "gate": P(None, "model"), "up": P(None, "model"),
        "down": P("model", None)}
    seen = set()
    for cfg in _configs(tiny_models):
        shapes = param_shapes(cfg)
        stacked = distributed.param_shardings(shapes, mesh)
        for path, sharding in jax.tree_util.tree_flatten_with_path(stacked)[0]:
            keys = [k.key for k in path]
            if keys[0] == "layers":
                name = keys[1]
                want = expected.get(name, P(*[None] * (len(sharding.spec) - 1)))
                assert sharding.spec == P(None, *want), name  # the stacked layer axis: whole
            else:
                name = ".".join(keys)
                assert sharding.spec == expected.get(name, P(*[None] * len(sharding.spec))), name
            seen.add(name)
    assert {"q_norm", "post_mlp_norm", "v_head.w", "v_head.b", "final_norm"} <= seen
    assert set(expected) <= seen


def test_a_tensor_without_a_rule_is_an_error():
    mesh = distributed.make_mesh(8, 1)
    with pytest.raises(ValueError, match="layers.rotary has no partition rule"):
        distributed.param_shardings({"layers": {"rotary": np.zeros((2, 4))}}, mesh)
    with pytest.raises(ValueError, match="layers.q has shape"):
        distributed.param_shardings({"layers": {"q": np.zeros((4, 4))}}, mesh)


@pytest.fixture(scope="module")
def models(tiny_models):
    """Qwen2 with unstacked layers (the CPU default) and Gemma 3 with stacked ones (TPU's)."""
    qwen = load_model(tiny_models["qwen2_untied_gqa"][0], "float32")
    gemma = load_model(tiny_models["gemma3_text"][0], "float32", scan_layers=True)
    assert isinstance(qwen.params["layers"], list) and isinstance(gemma.params["layers"], dict)
    return {"qwen2": (qwen, np.asarray(qwen.logits(TOKENS))),
            "gemma3": (gemma, np.asarray(gemma.logits(TOKENS)))}


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_sharded_logits_equal_unsharded(models, family, mesh_shape):
    model, reference = models[family]
    mesh = distributed.make_mesh(*mesh_shape)
    sharded = distributed.shard_model(model, mesh)
    embed = sharded.params["embed"]
    assert embed.sharding.mesh == mesh and len(embed.sharding.device_set) == 8
    # Each device holds 1/model of the vocabulary: the weights really are split.
    assert embed.addressable_shards[0].data.shape[0] == model.config.vocab_size // mesh_shape[1]
    np.testing.assert_allclose(np.asarray(sharded.logits(TOKENS)), reference, rtol=1e-5,
                               atol=1e-5)


def test_fallback_replicates_and_warns_once(models, caplog):
    model, reference = models["qwen2"]  # 4 query heads, 2 KV heads, 2 unstacked layers
    mesh = distributed.make_mesh(2, 4)
    with caplog.at_level(logging.WARNING, logger=distributed.__name__):
        first = distributed.shard_model(model, mesh).params
        distributed.shard_model(model, mesh)
    for name in ("layers.k", "layers.v", "layers.k_bias", "layers.v_bias"):
        messages = _fallbacks(caplog, name)
        assert len(messages) == 1, (name, messages)  # two calls: said once
        assert "size 2" in messages[0] and "'model' of size 4" in messages[0]
    assert not _fallbacks(caplog, "layers.q") and not _fallbacks(caplog, "embed")
    for layer in first["layers"]:
        assert layer["k"].sharding.is_fully_replicated
        # Split over 'model' along its heads (the spec may drop the trailing None).
        assert layer["q"].sharding.is_equivalent_to(NamedSharding(mesh, P(None, "model", None)),
                                                    3)


def test_shard_cache(models, caplog):
    cfg = models["gemma3"][0].config  # 2 KV heads
    mesh = distributed.make_mesh(4, 2)
    cache = KVCache.init(cfg, 8, 16, np.float32)
    cache = dataclasses.replace(cache, length=jax.numpy.arange(8, dtype=jax.numpy.int32))
    sharded = distributed.shard_cache(cache, mesh)
    # The page pool is shared by all rows: its KV heads split over 'model', its pages do not.
    assert sharded.k.sharding.spec == P(None, "model", None, None, None)
    assert sharded.v.sharding.spec == P(None, "model", None, None, None)
    assert sharded.pages.sharding.spec == P("data", None)
    assert sharded.length.sharding.spec == P("data")
    # The sliding layers' pool (Gemma keeps one) follows the same rules.
    assert sharded.k_local.sharding.spec == P(None, "model", None, None, None)
    assert sharded.pages_local.sharding.spec == P("data", None)
    assert sharded.free_local.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(sharded.length), np.arange(8))
    # Three rows over four 'data' devices: rows stay whole, heads are still split.
    with caplog.at_level(logging.WARNING, logger=distributed.__name__):
        odd = distributed.shard_cache(KVCache.init(cfg, 3, 16, np.float32), mesh)
    assert odd.k.sharding.spec == P(None, "model", None, None, None)
    assert odd.length.sharding.is_fully_replicated and odd.pages.sharding.is_fully_replicated
    assert not _fallbacks(caplog, "cache.k") and len(_fallbacks(caplog, "cache.length")) == 1
    assert len(_fallbacks(caplog, "cache.pages")) == 1
    assert len(_fallbacks(caplog, "cache.pages_local")) == 1


@pytest.fixture(scope="module")
def mha(tiny_models):
    """4 query and 4 KV heads: every head dim divides both 2 and 4 'model' devices."""
    model = load_model(tiny_models["qwen2_tied_mha"][0], "float32")
    prompts = [[1, 5, 9, 17], [3, 4, 100, 7, 8, 60, 61], [12], [44, 90, 91, 92, 93]]
    return model, prompts


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_sharded_generate_gives_identical_tokens(mha, temperature, caplog, monkeypatch):
    from steer_jax.decoding import sampler

    model, prompts = mha
    kw = dict(max_new_tokens=12, temperature=temperature, seed=3)
    reference = generate(model, prompts, **kw)
    assert len({tuple(t) for t in reference.tokens}) > 1  # not a degenerate constant output
    caches = []
    decode = sampler.decode
    monkeypatch.setattr(sampler, "decode",
                        lambda params, cfg, cache, *a, **k: (caches.append(cache),
                                                             decode(params, cfg, cache, *a,
                                                                    **k))[1])
    with caplog.at_level(logging.WARNING, logger=distributed.__name__):
        for shape in ((4, 2), (2, 4)):
            mesh = distributed.make_mesh(*shape)
            sharded = distributed.shard_model(model, mesh)
            out = generate(sharded, prompts, **kw)
            assert out.tokens == reference.tokens, shape
            # Four rows over 'data', four KV heads over 'model': both divide on either mesh.
            cache = caches[-1]
            assert cache.k.sharding.is_equivalent_to(
                NamedSharding(mesh, P(None, "model", None, None, None)), 5), shape
            assert cache.length.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 1)
            np.testing.assert_allclose(np.concatenate(out.max_logits),
                                       np.concatenate(reference.max_logits), rtol=1e-5)
    assert not _fallbacks(caplog, "")  # nothing had to fall back


STEER = dict(max_steps=3, max_step_tokens=8, max_new_tokens=24, temperature=0.7, seed=1,
             policy="percentile", percentile=0.5, refine="none")  # half go large per round
# Where a steer run's page pools live: both tiny models have 2 KV heads, which 4 'model' devices
# cannot split (replicated), and a 'model' axis of one device adds nothing.
CACHE_SPECS = {(4, 2): P(None, "model", None, None, None),
               (2, 4): P(None, None, None, None, None),
               (8, 1): P(None, None, None, None, None)}


@pytest.fixture(scope="module")
def steer_pair(tmp_path_factory):
    """The STEER pair, its prompts and the one-device reference run, built once."""
    small_dir, large_dir = tiny.steer_pair(tmp_path_factory.mktemp("pair"))
    tok = load_tokenizer(small_dir)
    prompts = tiny.chat_prompts(tok)
    small, large = load_model(small_dir, "float32"), load_model(large_dir, "float32")
    return dict(small=small, large=large, tok=tok, prompts=prompts,
                reference=steer(small, large, tok, prompts, **STEER))


@pytest.fixture(scope="module")
def sharded_steer(steer_pair):
    """(mesh, small, large, result, caches seen after each round) per mesh shape, run once: the
    tests of one mesh share its models and compiled programs."""
    runs = {}

    def get(shape):
        if shape not in runs:
            mesh = distributed.make_mesh(*shape)
            small, large = (distributed.shard_model(steer_pair[m], mesh) for m in ("small",
                                                                                   "large"))
            caches = []
            result = steer(small, large, steer_pair["tok"], steer_pair["prompts"],
                           on_round=lambda state: caches.append(
                               [(c.k.sharding, c.length.sharding) for c in state.caches]),
                           **STEER)
            runs[shape] = (mesh, small, large, result, caches)
        return runs[shape]

    return get


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sharded_steer_gives_identical_traces(steer_pair, sharded_steer, mesh_shape):
    reference = steer_pair["reference"]
    mesh, _, _, sharded, caches = sharded_steer(mesh_shape)
    models_of = lambda res: [[s.model for s in t.steps] for t in res.traces]  # noqa: E731
    assert {"small", "large"} <= {m for ms in models_of(reference) for m in ms}
    assert [t.tokens for t in sharded.traces] == [t.tokens for t in reference.traces]
    assert models_of(sharded) == models_of(reference)
    # Sharded matmuls sum in another order: confidences, and the mixtures fitted over them,
    # agree to float32 rounding.
    np.testing.assert_allclose([s.confidence for t in sharded.traces for s in t.steps],
                               [s.confidence for t in reference.traces for s in t.steps],
                               rtol=1e-5)
    assert [(m.round, m.group, m.model) for m in sharded.mixtures] == \
        [(m.round, m.group, m.model) for m in reference.mixtures]
    for a, b in zip(sharded.mixtures, reference.mixtures):
        for field in ("weights", "means", "variances", "confidences"):
            np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=1e-4,
                                       atol=1e-6, err_msg=f"round {a.round} {field}")
    # The caches stayed where the mesh puts them, round after round.
    want = NamedSharding(mesh, CACHE_SPECS[mesh_shape]), NamedSharding(mesh, P("data"))
    assert len(caches) == STEER["max_steps"]
    for rnd in caches:
        for k, length in rnd:
            assert k.is_equivalent_to(want[0], 5) and length.is_equivalent_to(want[1], 1), rnd


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sharded_mixture_fit_equals_one_device(mesh_shape):
    from steer_jax.calls import _mixture

    rng = np.random.default_rng(0)
    B, groups = 64, 4
    conf = np.concatenate([rng.normal(2.0, 0.3, B // 2), rng.normal(5.0, 0.5, B // 2)])
    conf = rng.permutation(conf).astype(np.float32)
    among, group = rng.random(B) < 0.8, np.arange(B) * groups // B
    one = _mixture(conf, among, group, groups=groups)
    mesh = distributed.make_mesh(*mesh_shape)
    rows = NamedSharding(mesh, P("data"))
    sharded = _mixture(*(jax.device_put(x, rows) for x in (conf, among, group)), groups=groups)
    assert sharded[1].sharding.mesh == mesh  # the fit really ran on the mesh
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(one)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_sharded_run_resumes_from_a_round_checkpoint(steer_pair, sharded_steer, tmp_path):
    """Saved with orbax and restored onto the mesh it ran on, a round state continues to the
    very traces of the uninterrupted sharded run."""
    from steer_jax.store import RoundCheckpoint

    mesh, small, large, whole, _ = sharded_steer((4, 2))
    checkpoint = RoundCheckpoint(tmp_path, 0, range(len(tiny.QUESTIONS)), 1, {}, mesh)

    class Preempted(Exception):
        pass

    def stop_after_two(done: int, running: int) -> None:
        if done == 2:
            raise Preempted

    args = (small, large, steer_pair["tok"], steer_pair["prompts"])
    with pytest.raises(Preempted):
        steer(*args, on_round=checkpoint, progress=stop_after_two, **STEER)
    state = checkpoint.latest()
    assert state.round == 2
    for cache in state.caches:
        assert cache.k.sharding.is_equivalent_to(NamedSharding(mesh, CACHE_SPECS[(4, 2)]), 5)
    resumed = steer(*args, resume_from=state, **STEER)
    assert resumed.traces == whole.traces and resumed.mixtures == whole.mixtures


@pytest.mark.parametrize("mesh_shape", [(4, 2), (2, 4)])
def test_page_pools_fit_the_budget_of_one_device(steer_pair, mesh_shape, monkeypatch):
    """Measured on placed arrays: the pools `pool_sizes` picks, placed on the mesh, take no
    more of one device than the budget it was given for that device. (With 4 over 'model' the
    tiny models' 2 KV heads do not divide: their pools stay whole per device.)"""
    from steer_jax import memory, runner

    mesh = distributed.make_mesh(*mesh_shape)
    models = [distributed.shard_model(steer_pair[m], mesh) for m in ("small", "large")]
    device = mesh.devices.flat[0]
    budget = 3 * 2**20
    seen = []
    monkeypatch.setattr(memory, "device_budget",
                        lambda devices=None: seen.append(devices) or budget)
    cfg = {"cache": {"page_size": 16, "pages": None}, "steer": {"max_new_tokens": 64}}
    pools = runner.pool_sizes(cfg, models, mesh)
    assert seen == [list(mesh.devices.flat)] and min(pools) > 0

    def on_device(pool: int, m) -> int:
        cache = distributed.shard_cache(KVCache.init(m.config, 1, 16, m.dtype, page_size=16,
                                                     pool=pool), mesh)
        return sum(sh.data.nbytes for f in ("k", "v") for sh in getattr(cache, f).addressable_shards
                   if sh.device == device)

    used = sum(on_device(p, m) for p, m in zip(pools, models))
    page = sum(on_device(p + 1, m) - on_device(p, m) for p, m in zip(pools, models))
    assert used <= budget < used + 2 * page  # the budget is filled to within a page a model


def test_initialize_maps_the_distributed_section(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    distributed.initialize({})
    distributed.initialize({"distributed": {}})
    assert calls == []
    distributed.initialize({"distributed": {"coordinator": "10.0.0.2:8476", "num_processes": 4,
                                            "process_id": "3"}})
    assert calls == [dict(coordinator_address="10.0.0.2:8476", num_processes=4, process_id=3)]
    distributed.initialize({"distributed": {"auto": True}})
    assert calls[-1] == {}
    with pytest.raises(ValueError, match="missing process_id"):
        distributed.initialize({"distributed": {"coordinator": "h:1", "num_processes": 2}})
    with pytest.raises(ValueError, match="auto excludes"):
        distributed.initialize({"distributed": {"auto": True, "process_id": 0}})


# Sharded loading: each device's shard comes from the files by slices.

@pytest.mark.parametrize("name, mesh_shape", [("qwen2_tied_mha", (2, 4)),
                                              ("gemma3_text", (4, 2))])
def test_sharded_loading_reads_shards_not_tensors(tiny_models, monkeypatch, name, mesh_shape):
    from steer_jax.modeling import loading

    path = tiny_models[name][0]
    cfg = read_config(path)
    mesh = distributed.make_mesh(*mesh_shape)
    shardings = distributed.param_shardings(param_shapes(cfg), mesh)
    whole = loading.load_params(path, cfg, "float32")
    regions = []
    original = loading._read_tensor
    monkeypatch.setattr(loading, "_read_tensor",
                        lambda h, n, r: (regions.append((n, r)), original(h, n, r))[1])
    sharded = loading.load_params(path, cfg, "float32", shardings)
    for (p, a), b, s in zip(jax.tree_util.tree_flatten_with_path(sharded)[0],
                            jax.tree.leaves(whole), jax.tree.leaves(shardings)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(p))
        assert a.sharding.is_equivalent_to(s, a.ndim), p
    # The query projection is split over 'model' by heads: no read spans all of its rows.
    q_rows = [r[0] for n, r in regions if n.endswith("self_attn.q_proj.weight")]
    full = cfg.num_heads * cfg.head_dim
    assert q_rows and all(r.stop - r.start == full // mesh_shape[1] for r in q_rows)


def test_sharded_loading_peak_memory_stays_near_one_copy(tmp_path):
    """A ~250 MB float32 checkpoint loads sharded over 8 devices without a second host copy."""
    import subprocess
    import sys
    import textwrap

    import torch
    import transformers as tf

    config = tf.Qwen2Config(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                            num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
                            tie_word_embeddings=True)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in tf.Qwen2ForCausalLM(config).parameters())
    torch.manual_seed(0)
    tf.Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    script = textwrap.dedent(f"""
        import threading, time
        from steer_jax import distributed
        from steer_jax.modeling import loading
        from steer_jax.modeling.module import param_shapes

        def anon():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        peak, done = [0], [False]
        def watch():
            while not done[0]:
                peak[0] = max(peak[0], anon()); time.sleep(0.002)
        cfg = loading.read_config({str(tmp_path)!r})
        shardings = distributed.param_shardings(param_shapes(cfg),
                                                distributed.make_mesh(1, 8))
        base = anon()
        t = threading.Thread(target=watch); t.start()
        params = loading.load_params({str(tmp_path)!r}, cfg, "float32", shardings)
        done[0] = True; t.join()
        print(peak[0] - base)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    grown = int(out.stdout.strip().splitlines()[-1])
    model_bytes = 4 * n_params
    assert model_bytes > 200e6
    # One copy on the (fake) devices plus a shard in flight; a whole-model host buffer beside
    # the device copy would be two copies.
    assert grown < 1.3 * model_bytes, (grown, model_bytes)


def test_converted_checkpoint_restores_into_the_mesh(tiny_models, tmp_path):
    from steer_jax.cli import main
    from steer_jax.modeling import CheckpointError
    from steer_jax.modeling.convert import convert

    path = tiny_models["qwen2_tied_mha"][0]
    assert main(["convert", str(path), str(tmp_path / "conv"), "--dtype", "float32"]) == 0
    with pytest.raises(CheckpointError, match="already exists"):
        convert(path, tmp_path / "conv")
    reference = load_model(path, "float32")
    mesh = distributed.make_mesh(2, 4)
    restored = load_model(tmp_path / "conv", "float32", mesh=mesh)
    expected = distributed.param_shardings(param_shapes(restored.config), mesh)
    stacked = load_model(tmp_path / "conv", "float32", scan_layers=True, mesh=mesh)
    for a, s in zip(jax.tree.leaves(stacked.params), jax.tree.leaves(expected)):
        assert a.sharding.is_equivalent_to(s, a.ndim)
    np.testing.assert_allclose(np.asarray(restored.logits(TOKENS)),
                               np.asarray(reference.logits(TOKENS)), rtol=1e-5, atol=1e-5)


def test_two_processes_write_the_traces_of_one(shared_data, tmp_path):
    """Two processes on loopback, 4 fake CPU devices each, talking through gloo, each running
    its 2 traces on a mesh of its own 4 devices and restoring the large model's converted (orbax)
    copy into it; both fit every round's mixture over all 4 traces. (Without a mesh,
    tests/test_checkpointing.py's two processes write the one-process traces exactly.)"""
    import json
    import socket
    import subprocess
    import sys

    import yaml

    from steer_jax.modeling.convert import convert
    from steer_jax.runner import run

    small, large = tiny.steer_pair(tmp_path / "pair")
    cfg = {"small": str(small), "large": str(large), "dtype": "float32",
           "benchmark": {"name": "musique", "path": str(shared_data / "musique"), "limit": 4},
           "steer": {"max_steps": 3, "max_step_tokens": 8, "max_new_tokens": 24},
           "batch": {"size": 2}}
    run(cfg, tmp_path / "one")
    converted = convert(large, tmp_path / "large-orbax", dtype="float32")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = tiny.cpu_process_env(devices=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "steer_jax.cli", "run", str(tmp_path / "run.yaml"), "--out",
         str(tmp_path / "two"), "--set", f"distributed.coordinator=127.0.0.1:{port}",
         "--set", "distributed.num_processes=2", "--set", f"distributed.process_id={i}",
         "--set", f"large={converted}", "--set", "mesh.data=2", "--set", "mesh.model=2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    outputs = tiny.outputs(procs, timeout=400)
    assert [p.returncode for p in procs] == [0, 0], outputs
    one, two = ([json.loads(x) for x in (tmp_path / d / "traces.jsonl").read_text().splitlines()]
                for d in ("one", "two"))
    assert len(one) == len(two) == 4
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["layout"] == \
        {"platform": "cpu", "processes": 2, "mesh": {"data": 2, "model": 2}}
    # Sharded matmuls sum in another order: confidences agree to float32 rounding only.
    for a, b in zip(one, two):
        assert (a["output"], [(s["model"], s["tokens"]) for s in a["steps"]]) == \
            (b["output"], [(s["model"], s["tokens"]) for s in b["steps"]])
        np.testing.assert_allclose([s["confidence"] for s in a["steps"]],
                                   [s["confidence"] for s in b["steps"]], rtol=1e-5)
    # Both processes fitted each round's mixtures over all 4 traces, as the one process did.
    one, two = ([json.loads(x) for x in (tmp_path / d / "rounds.jsonl").read_text().splitlines()]
                for d in ("one", "two"))
    assert [(m["round"], m["group"], m["model"], len(m["confidences"])) for m in one] == \
        [(m["round"], m["group"], m["model"], len(m["confidences"])) for m in two]
    assert {len(m["confidences"]) for m in one if m["round"] == 0} == {4}
    for a, b in zip(one, two):
        for key in ("confidences", "means", "weights"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6)
