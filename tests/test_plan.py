"""Paged KV memory arithmetic (`steer_jax.memory`) and `steer-jax plan`.

Everything here is shapes and arithmetic (`jax.eval_shape`, no compiles); the real-config tests
read ../shared/data/hf (config.json files only) and skip without it.
"""

import gc
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh

from steer_jax import memory, plan
from steer_jax.cli import main
from steer_jax.distributed import param_shardings
from steer_jax.modeling import families
from steer_jax.modeling.module import num_params, param_shapes
from steer_jax.modeling.loading import load_model, read_config

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper"
GIB = 2**30


def tiny_config(layers: int = 2, kv_heads: int = 2, head_dim: int = 16, **extra) -> dict:
    return {"model_type": "qwen2", "vocab_size": 128, "hidden_size": 64,
            "intermediate_size": 96, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": kv_heads, "head_dim": head_dim, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 512, "tie_word_embeddings": True, **extra}


def tiny_folder(path: Path, **kw) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(tiny_config(**kw)))
    return path


def run_cli(capsys, *args: str) -> str:
    assert main(["plan", *map(str, args)]) == 0
    return capsys.readouterr().out


def cli_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(["plan", *map(str, args)])
    assert e.value.code == 2
    return capsys.readouterr().err


# ---- arithmetic ----------------------------------------------------------------------------------

def test_page_rounding_by_hand():
    a = families.from_hf_config(tiny_config())  # 2 layers x 2 KV heads x 16
    b = families.from_hf_config(tiny_config(layers=3, kv_heads=4))
    f32 = jnp.float32
    assert memory.kv_bytes_per_token(a, f32) == 2 * 2 * 2 * 16 * 4 == 512
    assert memory.kv_bytes_per_token(b, f32) == 2 * 3 * 4 * 16 * 4 == 1536
    assert memory.kv_bytes_per_token(a, jnp.bfloat16) == 256
    # Split over 'model' only where the KV heads divide it (b: 4 heads over 2 or 4; a: not 4).
    assert memory.kv_bytes_per_token(b, f32, model_shards=2) == 768
    assert memory.kv_bytes_per_token(a, f32, model_shards=4) == 512
    assert memory.page_bytes(a, f32, page_size=4) == 2048
    # ceil(n / page_size), at least one page: what a trace holds, nothing ahead.
    assert [memory.trace_pages(a, n, 4) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    # A call writing up to s more tokens adds pages(n + s) - pages(n) to a row while it runs:
    # ceil(s / page_size) or floor(s / page_size), by the room left in n's last page.
    assert [memory.call_pages(a, 14, 4, s) for s in (0, 2, 3, 6, 7, 8)] == [0, 0, 1, 1, 2, 2]
    assert [memory.call_pages(a, n, 4, 5) for n in (12, 13, 15, 16)] == [2, 1, 1, 2]
    # A trace of 14 tokens holds 4 pages of 4 in each pool; one trace is 4 * (2048 + 6144)
    # bytes, and each pool's null page comes off the budget first.
    per_trace, nulls = 4 * (2048 + 6144), 2048 + 6144
    budget = nulls + 10 * per_trace + 100
    assert memory.pool_pages([a, b], f32, budget, 4, 14) == [40, 40]
    assert memory.resident_traces([a, b], f32, budget, 4, 14) == 10
    assert memory.resident_traces([a, b], f32, nulls + per_trace - 1, 4, 14) == 0
    assert memory.pool_pages([a, b], f32, nulls - 1, 4, 14) == [0, 0]
    # With calls of 7 tokens ahead (2 pages a row) the pools split the same way (equal shares:
    # 4 + 2/8 pages a trace each) and hold 9: 9 * 4 + ceil(9 / 8) * 2 = 40; 10 would need 44.
    assert memory.pool_pages([a, b], f32, budget, 4, 14, max_step_tokens=7) == [40, 40]
    assert memory.resident_traces([a, b], f32, budget, 4, 14, max_step_tokens=7) == 9
    # Dense: ceil((prompt + max_new + 2) / 64) * 64 slots: 5 + 100 + 2 = 107 -> 128.
    assert memory.dense_trace_bytes(a, f32, 5, 100) == 128 * 512


def test_resident_in_pool_by_hand():
    # 18 pages a trace, 4 more a row during a call: 54 * 18 + ceil(54 / 8) * 4 = 972 + 28 = 1000;
    # 55 would need 990 + 28. The 28 spare pages give calls of 7 rows: 8 calls for 54.
    assert memory.resident_in_pool(1000, 18, 4) == 54
    assert memory.calls_per_round(1000, 18, 4, 54) == 8
    assert memory.resident_in_pool(1000, 18, 0) == 55  # nothing ahead: pool // held
    assert memory.calls_per_round(1000, 18, 0, 55) == 1
    assert memory.resident_in_pool(21, 18, 4) == 0 and memory.resident_in_pool(22, 18, 4) == 1
    assert memory.calls_per_round(22, 18, 4, 1) == 1 and memory.calls_per_round(21, 18, 4, 0) == 0
    for pool in range(0, 400, 7):  # the largest R with R * held + ceil(R / 8) * extra <= pool
        for held, extra in ((1, 0), (3, 1), (5, 2), (18, 5)):
            r = memory.resident_in_pool(pool, held, extra)
            assert r * held + -(-r // 8) * extra <= pool
            assert (r + 1) * held + -(-(r + 1) // 8) * extra > pool


def engine_round(pool: int, held: list[int], new: int, cap: int) -> tuple[list[int], bool]:
    """`calls._plan`'s rule as arithmetic: each call takes rows in order while their new pages
    fit the free ones, if that is >= 1/8 of the rows all of whose pages fit the pool (at most
    `cap`); else it would evict. Returns each call's rows and whether any call evicted."""
    calls, left, evicted = [], len(held), False
    while left:
        free = pool - sum(held)
        fit_free = min(left, cap, free // new if new else left)
        fit_pool, total = 0, 0
        for h in held[:min(left, cap)]:
            total += h + new
            if total > pool:
                break
            fit_pool += 1
        if 8 * fit_free < fit_pool:
            evicted = True
            fit_free = fit_pool
        calls.append(fit_free)
        left -= fit_free
    return calls, evicted


@pytest.mark.parametrize("pool,held,extra", [(10714, 18, 4), (1349, 20, 4), (930, 20, 4),
                                             (40, 4, 2), (300, 7, 5)])
def test_resident_traces_run_a_round_without_evicting(pool, held, extra):
    r = memory.resident_in_pool(pool, held, extra)
    calls, evicted = engine_round(pool, [held] * r, extra, cap=r)
    assert not evicted and len(calls) == memory.calls_per_round(pool, held, extra, r)
    assert min(calls[:-1] or calls) * 8 >= r  # every full call holds an eighth of them or more


def test_plan_by_hand():
    a = families.from_hf_config(tiny_config())
    b = families.from_hf_config(tiny_config(layers=3, kv_heads=4))
    weights = memory.weight_bytes(a, "float32") + memory.weight_bytes(b, "float32")
    mem = 10 * 2**20
    p = plan.plan([a, b], "float32", mem, names=["small", "large"], page_size=16,
                    prompt_tokens=30, mean_tokens=50, max_step_tokens=20, max_new_tokens=60,
                    benchmark_size=1000)
    usable = int(0.9 * mem) - weights
    assert p.usable_bytes == usable
    # 30 + 50 = 80 tokens held -> 5 pages of 16; a call reaches 100 -> 7 pages: 2 more a row.
    assert p.tokens_per_trace == 80 and p.call_tokens == 20
    assert [(m.trace_pages, m.call_pages) for m in p.models] == [(5, 2), (5, 2)]
    page = 16 * (512 + 1536)
    pool = (usable - page) // page  # equal shares (5 + 2/8 pages a trace): a page each per page
    assert [m.pool_pages for m in p.models] == [pool, pool]
    r = p.resident_traces
    assert r * 5 + -(-r // 8) * 2 <= pool < (r + 1) * 5 + -(-(r + 1) // 8) * 2
    spare_rows = (pool - r * 5) // 2
    assert spare_rows * 8 >= r
    assert [m.calls_per_round for m in p.models] == [-(-r // spare_rows)] * 2
    assert p.dense_traces == usable // (128 * (512 + 1536))  # 30 + 60 + 2 -> 128 slots
    assert p.sub_batches == -(-1000 // p.resident_traces)
    # A call reserves within the trace's page table (longest prompt + max_new + 2, rounded to
    # 64): 62 + 62 + 2 -> 128 slots, so at 124 tokens only 4 more.
    q = plan.plan([a, b], "float32", mem, page_size=16, prompt_tokens=62, mean_tokens=62,
                    max_step_tokens=20, max_new_tokens=62)
    assert q.call_tokens == 4 and [m.call_pages for m in q.models] == [0, 0]
    with pytest.raises(ValueError, match="max_new_tokens"):
        plan.plan([a], "float32", mem, mean_tokens=61, max_new_tokens=60)


@pytest.mark.parametrize("name", ["Qwen2.5-Math-1.5B-Instruct", "Qwen2.5-Math-7B-Instruct",
                                  "Qwen2.5-1.5B-Instruct", "Qwen2.5-7B-Instruct",
                                  "gemma-3-4b-it", "gemma-3-12b-it"])
def test_weight_bytes_match_params_and_partition_rules(name):
    from test_modeling import PUBLISHED

    cfg = families.known(name)
    assert memory.weight_bytes(cfg, jnp.bfloat16) == 2 * num_params(cfg)
    assert memory.weight_bytes(cfg, jnp.bfloat16) / 2 == pytest.approx(PUBLISHED[name], rel=0.01)
    # The shard shapes distributed.param_shardings gives on an 8-way 'model' mesh (abstract: no
    # devices), summed over the tensors: what one device holds.
    shapes = param_shapes(cfg, jnp.bfloat16)
    placed = param_shardings(shapes, AbstractMesh((1, 8), ("data", "model")))
    expected = sum(2 * jnp.prod(jnp.array(s.shard_shape(x.shape))).item()
                   for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(placed)))
    assert memory.weight_bytes(cfg, jnp.bfloat16, model_shards=8) == expected
    assert expected < memory.weight_bytes(cfg, jnp.bfloat16) / 4


def test_parse_bytes():
    assert memory.parse_bytes("80GiB") == 80 * GIB
    assert memory.parse_bytes("141GB") == 141 * 10**9
    assert memory.parse_bytes("16GiB") == 16 * GIB
    assert memory.parse_bytes("1.5 TiB") == int(1.5 * 2**40)
    for bad in ("80 gigs", "GiB", "-1GiB", "0GB", "", "8e9"):
        with pytest.raises(ValueError, match="memory size"):
            memory.parse_bytes(bad)


# ---- device_budget: each byte once ---------------------------------------------------------------

def test_device_budget_counts_loaded_weights_once(monkeypatch):
    """The host as the CPU sees it: a fixed total, minus whatever jax arrays this process holds.
    Sizing before loading (weights to load given) and after (weights held) must agree."""
    total = 24 * GIB
    cpus = jax.local_devices()
    monkeypatch.setattr(memory, "_host_free_memory",
                        lambda: total - memory._live_bytes(cpus))
    paths = [REPO / "models" / "demo-qwen2-small", REPO / "models" / "demo-qwen2-large"]
    weights = sum(memory.weight_bytes(read_config(p), "bfloat16") for p in paths)
    gc.collect()
    held_before = memory._live_bytes(cpus)
    before = memory.device_budget(weights_to_load=weights)
    models = [load_model(p, "bfloat16") for p in paths]
    gc.collect()
    assert memory._live_bytes(cpus) - held_before == weights  # the weights, now in host memory
    after = memory.device_budget()
    assert after == before == int(0.9 * total) - held_before - weights
    # The free figure did drop by the weights: reading it after loading and then taking the
    # weights off again (the rule this replaces) would count them twice.
    assert memory._host_free_memory() == total - held_before - weights
    # Split over a mesh's devices: each gets its share of what is left.
    assert memory.device_budget(devices=cpus[:2]) == (int(0.9 * total) - held_before
                                                      - weights) // 2
    del models


# ---- the CLI -------------------------------------------------------------------------------------

def tiny_run(tmp_path: Path, **sections) -> Path:
    small, large = tiny_folder(tmp_path / "small"), tiny_folder(tmp_path / "large", layers=3)
    cfg = {"small": str(small), "large": str(large), "dtype": "float32",
           "benchmark": {"name": "math500", "path": None},
           "steer": {"max_step_tokens": 20, "max_new_tokens": 60}, **sections}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_cli_tiny_json(tmp_path, capsys):
    run = tiny_run(tmp_path, cache={"page_size": 16})
    out = json.loads(run_cli(capsys, run, "--device-memory", "10MiB", "--mean-tokens", 50,
                             "--prompt-tokens", 30, "--json"))
    p = plan.plan([read_config(tmp_path / "small"), read_config(tmp_path / "large")],
                    "float32", 10 * 2**20, page_size=16, prompt_tokens=30, mean_tokens=50,
                    max_step_tokens=20, max_new_tokens=60)
    for key in ("resident_traces", "dense_traces", "usable_bytes", "page_size",
                "tokens_per_trace", "call_tokens", "sub_batches", "prompt_source", "models"):
        assert key in out
    assert (out["resident_traces"], out["dense_traces"]) == (p.resident_traces, p.dense_traces)
    assert out["page_size"] == 16 and out["sub_batches"] is None
    assert [m["name"] for m in out["models"]] == ["small", "large"]
    assert [m["calls_per_round"] for m in out["models"]] == [m.calls_per_round for m in p.models]
    assert "--prompt-tokens" in out["prompt_source"] and "benchmark.path is null" in \
        out["prompt_source"]
    text = run_cli(capsys, run, "--device-memory", "10MiB", "--mean-tokens", 50,
                   "--prompt-tokens", 30)
    assert f"traces resident at 50 generated tokens each: {p.resident_traces} " in text
    assert "sub-batches per round for math500: unknown" in text


@pytest.mark.parametrize("value", [0, -64, "abc", 1.5, True])
def test_cli_bad_page_size(tmp_path, capsys, value):
    run = tiny_run(tmp_path)
    err = cli_error(capsys, run, "--set", f"cache.page_size={json.dumps(value)}",
                    "--mean-tokens", 10)
    assert "cache.page_size must be a positive integer" in err


@pytest.mark.parametrize("value", ["80 gigs", "lots", "0GiB"])
def test_cli_bad_memory(tmp_path, capsys, value):
    err = cli_error(capsys, tiny_run(tmp_path), "--device-memory", value, "--mean-tokens", 10)
    assert "memory size" in err and "80GiB" in err


def test_cli_errors(tmp_path, capsys):
    assert "does not exist" in cli_error(capsys, tmp_path / "nope.yaml")
    run = tiny_run(tmp_path)
    err = cli_error(capsys, run, "--set", f"large={tmp_path / 'missing'}", "--mean-tokens", 10)
    assert "missing" in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    err = cli_error(capsys, run, "--set", f"large={tmp_path / 'empty'}", "--mean-tokens", 10)
    assert "config.json is missing" in err
    assert "--mean-tokens" in cli_error(capsys, run, "--mean-tokens", -1)
    assert "max_new_tokens" in cli_error(capsys, run, "--mean-tokens", 61)


# ---- real configs (../shared/data/hf) -----------------------------------------------------------

def pair_args(hf: Path, small: str, large: str) -> list[str]:
    return ["--set", f"small={hf / small}", "--set", f"large={hf / large}"]


def test_qwen_math_math500_on_80gib(hf_meta, shared_data, capsys):
    """Qwen2.5-Math-7B has Qwen2.5-7B-Instruct's shapes (it differs in max_position_embeddings
    and rope_theta only), so that config stands in for it; the small one is the Math-1.5B base
    model's config, the shapes of Math-1.5B-Instruct."""
    math500 = shared_data / "math500" / "test.jsonl"
    if not math500.is_file():
        pytest.skip(f"{math500} is absent")
    out = json.loads(run_cli(capsys, PAPER / "qwen2.5-math-1.5b-7b_math500.yaml",
                             *pair_args(hf_meta, "Qwen2.5-Math-1.5B", "Qwen2.5-7B-Instruct"),
                             "--set", f"benchmark.path={math500}", "--device-memory", "80GiB",
                             "--mean-tokens", 1024, "--json"))
    assert out["benchmark_size"] == 500 and "tokenizer" in out["prompt_source"]
    # Measured prompts: mean 114.2 -> 115 tokens, longest 834 (the dense figure's).
    assert (out["prompt_tokens"], out["dense_prompt_tokens"]) == (115, 834)
    # 115 + 1024 = 1139 tokens held -> 18 pages; a call reaching 1395 tokens adds 4 to a row.
    assert [(m["trace_pages"], m["call_pages"]) for m in out["models"]] == [(18, 4), (18, 4)]
    # 10714 pages a pool: 579 * 18 + ceil(579 / 8) * 4 = 10422 + 292 = 10714; calls of 73 rows.
    assert [m["pool_pages"] for m in out["models"]] == [10714, 10714]
    # Dense: every trace holds its longest prompt and the config's whole budget up front, 834 +
    # 3204 new tokens (the config's budget: Qwen2.5-Math's 4096 positions less the longest
    # prompt and the judge prompt); at the paper's 4096 it was 137 traces, 4930 positions each.
    assert (out["resident_traces"], out["dense_traces"]) == (579, 167)
    assert [m["calls_per_round"] for m in out["models"]] == [8, 8]
    assert out["sub_batches"] == 1


def test_target_qwen_math_all_math500_resident(hf_meta, capsys):
    """Issue 21's target: all 500 MATH500 traces resident at 80 GiB, 1024 tokens."""
    out = json.loads(run_cli(capsys, PAPER / "qwen2.5-math-1.5b-7b_math500.yaml",
                             *pair_args(hf_meta, "Qwen2.5-Math-1.5B", "Qwen2.5-7B-Instruct"),
                             "--prompt-tokens", 115, "--json"))
    assert out["resident_traces"] >= 500


def gemma_plan(hf_meta: Path, capsys, *extra) -> dict:
    return json.loads(run_cli(capsys, PAPER / "gemma-3-4b-12b_math500.yaml",
                              *pair_args(hf_meta, "gemma-3-4b-it", "gemma-3-12b-it"),
                              "--device-memory", "80GiB", "--json", *extra))


def test_gemma_on_80gib(hf_meta, capsys):
    out = gemma_plan(hf_meta, capsys)
    assert out["prompt_tokens"] == 256 and "--prompt-tokens" in out["prompt_source"]
    assert [m["kv_bytes_per_token"] for m in out["models"]] == [139264, 393216]
    # 256 + 1024 = 1280 tokens held -> 20 pages; a call reaching 1536 adds 4 to a row.
    assert [(m["trace_pages"], m["call_pages"]) for m in out["models"]] == [(20, 4), (20, 4)]
    # The sliding layers (window 1024) keep their own pool and hold 1280 - 1024 = 256 tokens
    # = 4 pages fewer: 16 pages a trace.
    assert [m["local_trace_pages"] for m in out["models"]] == [16, 16]
    # Global pools of 1613 pages: 78 * 20 + ceil(78 / 8) * 4 = 1600; 79 would need 1620.
    # Local pools of 1298: 78 * 16 + 40 = 1288; 79 would need 1304. (One pool for all layers
    # held 65.)
    assert out["resident_traces"] == 78
    assert [m["pool_pages"] for m in out["models"]] == [1613, 1613]
    assert [m["local_pool_pages"] for m in out["models"]] == [1298, 1298]
    assert [m["calls_per_round"] for m in out["models"]] == [7, 7]
    # The "dense: 17" is 80 GB (10^9); 80 GiB leaves room for 19.
    assert out["dense_traces"] == 19
    assert gemma_plan(hf_meta, capsys, "--device-memory", "80GB")["dense_traces"] == 17


def test_sliding_layers_pool_holds_the_window():
    """trace_pages of the local pool: the pages from the one the newest token's window starts
    in; pool_pages gives a model with both kinds of layers a pair, bytes split by layers."""
    cfg = families.known("gemma-3-4b-it")
    assert cfg.sliding_window == 1024
    assert [memory.trace_pages(cfg, n, 64, local=True) for n in (1, 1024, 1088, 1089, 4096)] \
        == [1, 16, 16, 17, 16]
    assert memory.trace_pages(cfg, 4096, 64) == 64
    local, whole = memory.page_bytes(cfg, jnp.bfloat16, 64, local=True), \
        64 * memory.kv_bytes_per_token(cfg, jnp.bfloat16)
    assert local + memory.page_bytes(cfg, jnp.bfloat16, 64) == whole
    pools = memory.pool_pages([cfg], jnp.bfloat16, 2**33, 64, 4096, max_step_tokens=256)
    assert isinstance(pools[0], tuple) and pools[0][1] < pools[0][0]


def test_target_gemma_60_resident(hf_meta, capsys):
    """Issue 21's target: Gemma-3 4B + 12B, 80 GiB, 1024 tokens: at least 60 resident."""
    assert gemma_plan(hf_meta, capsys)["resident_traces"] >= 60


def test_folder_with_only_config_json(hf_meta, shared_data, tmp_path, capsys):
    only = tmp_path / "gemma-3-12b-it"
    only.mkdir()
    shutil.copy(hf_meta / "gemma-3-12b-it" / "config.json", only / "config.json")
    args = [PAPER / "gemma-3-4b-12b_math500.yaml", "--set", f"small={only}", "--set",
            f"large={only}", "--device-memory", "141GB"]
    text = run_cli(capsys, *args, "--set", f"benchmark.path={tmp_path / 'no-such-data'}")
    assert "math500 unreadable" in text and "256 (--prompt-tokens" in text
    assert "sub-batches per round for math500: unknown" in text
    for line in ("weights/dev", "KV/token", "pool pages", "calls/round",
                 "traces resident at 1024", "dense layout"):
        assert line in text
    math500 = shared_data / "math500" / "test.jsonl"
    if math500.is_file():  # the benchmark is read, the prompts cannot be: no tokenizer
        text = run_cli(capsys, *args, "--set", f"benchmark.path={math500}")
        assert f"no tokenizer in {only}" in text
        assert "sub-batches per round for math500 (500 traces)" in text


def test_v5e_8_splits_what_divides(hf_meta, capsys):
    out = gemma_plan(hf_meta, capsys, "--device-memory", "16GiB", "--devices", "8")
    small, large = out["models"]
    assert (small["kv_heads_per_device"], large["kv_heads_per_device"]) == (4, 1)
    assert large["kv_bytes_per_token"] == 393216 // 8
    assert out["devices"] == 8 and out["resident_traces"] > 0
