"""Ports against HF transformers: logits, loading layouts, dtypes, bad checkpoints, real configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.numpy import load_file, save_file

import tiny
from steer_jax import CheckpointError, load_model
from steer_jax.modeling import families, loading, num_params, read_config
from steer_jax.modeling.transformer import _full_logits

IDS = np.random.RandomState(0).randint(3, 120, size=(3, 24))  # 6x the Gemma window of 4


def rel_err(got, ref) -> float:
    return float(np.linalg.norm(np.asarray(got) - ref) / np.linalg.norm(ref))


def hf_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("name", ["qwen2_tied_mha", "qwen2_untied_gqa", "gemma3_text", "gemma3_mm"])
def test_logits_match_transformers(tiny_models, name):
    path, ref_model = tiny_models[name]
    model = load_model(path, dtype="float32")
    assert model.num_params == sum(
        p.numel() for n, p in ref_model.named_parameters()
        if "vision_tower" not in n and "multi_modal_projector" not in n)
    assert rel_err(model.logits(IDS), hf_logits(ref_model, IDS)) < 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float32_models_ask_for_float32_dots(tiny_models, dtype):
    """On a GPU, XLA's DEFAULT precision ran float32 dots in TF32 (5e-4 from transformers on an
    H200, failing the test above) and on a TPU it runs bfloat16 passes; the CPU computes float32
    either way, so what this checks here is the request in the program (XLA's dots: not the CPU
    kernel's, test_panel_matmul.py)."""
    model = load_model(tiny_models["gemma3_text"][0], dtype=dtype, cpu_kernels=False)
    jaxpr = jax.make_jaxpr(lambda p, ids: _full_logits(p, ids, model.config))(
        model.params, jnp.asarray(IDS, jnp.int32))
    precisions = tiny.dot_precisions(jaxpr.jaxpr)
    assert len(precisions) >= 9  # 7 in a layer (attention's 2, q k v o, MLP's 3), the head's
    asked = [tiny.is_highest(p) for p in precisions]
    assert (all(asked) if dtype == "float32" else not any(asked)), precisions


@pytest.mark.parametrize("backend, stacked", [("cpu", False), ("gpu", False), ("tpu", True)])
def test_layers_are_unrolled_except_on_tpus(tiny_models, monkeypatch, backend, stacked):
    # Measured: scanned layers decoded 1.8x slower on an H200 (benchmarks/RESULTS.md).
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    model = load_model(tiny_models["qwen2_untied_gqa"][0], "float32")
    assert isinstance(model.params["layers"], dict) == stacked


@pytest.mark.parametrize("name", ["qwen2_untied_gqa", "gemma3_text"])
def test_scanned_and_unrolled_layers_agree(tiny_models, name):
    path, _ = tiny_models[name]
    scanned = load_model(path, "float32", scan_layers=True)
    unrolled = load_model(path, "float32", scan_layers=False)
    assert isinstance(unrolled.params["layers"], list) and unrolled.num_params == scanned.num_params
    np.testing.assert_allclose(unrolled.logits(IDS), scanned.logits(IDS), rtol=1e-5, atol=1e-5)


def test_gemma3_config_features_are_exercised(tiny_models):
    cfg = read_config(tiny_models["gemma3_text"][0])
    assert cfg.sliding_layers == (True, True, False, True) and cfg.sliding_window == 4
    assert cfg.rope_global.linear_factor == 4.0 and cfg.rope_global.theta == 100000.0
    assert cfg.rope_local.theta == 1000.0 and cfg.query_pre_attn_scalar != cfg.head_dim
    assert read_config(tiny_models["gemma3_mm"][0]) == cfg


def test_multimodal_loads_in_shards_without_reading_the_vision_tower(tiny_models, monkeypatch):
    path, _ = tiny_models["gemma3_mm"]
    assert len(list(path.glob("*.safetensors"))) > 2
    read: list[str] = []
    original = loading._read_tensor
    monkeypatch.setattr(loading, "_read_tensor", lambda h, n, r: (read.append(n), original(h, n, r))[1])
    load_model(path, dtype="float32")
    assert read and not [n for n in read if "vision" in n or "multi_modal" in n]


@pytest.mark.parametrize("name", ["qwen2_untied_gqa", "gemma3_text"])
def test_bfloat16_close_to_float32(tiny_models, name):
    path, _ = tiny_models[name]
    f32 = np.asarray(load_model(path, "float32").logits(IDS))
    bf16 = load_model(path, "bfloat16")
    assert str(bf16.params["embed"].dtype) == "bfloat16"
    assert rel_err(bf16.logits(IDS), f32) < 2e-2


# Bad checkpoints: each must fail before compute with a message naming the culprit.

@pytest.fixture
def qwen_copy(tiny_models, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_models["qwen2_untied_gqa"][0], dst)
    return dst


def _edit_weights(path: Path, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_missing_config(qwen_copy):
    (qwen_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(qwen_copy)


def test_unsupported_model_type(qwen_copy):
    cfg = json.loads((qwen_copy / "config.json").read_text())
    (qwen_copy / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="unsupported model_type 'llama'"):
        load_model(qwen_copy)


def test_missing_tensor(qwen_copy):
    _edit_weights(qwen_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*layers\.up\[layer 1\]"):
        load_model(qwen_copy)


def test_unexpected_tensor(qwen_copy):
    _edit_weights(qwen_copy, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.extra.weight'"):
        load_model(qwen_copy)


def test_shape_mismatch(qwen_copy):
    cfg = json.loads((qwen_copy / "config.json").read_text())
    (qwen_copy / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 80}))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.\w+_proj.weight'.*has shape \(64, 96\)"):
        load_model(qwen_copy)


def test_truncated_safetensors(qwen_copy):
    file = qwen_copy / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(qwen_copy)


def test_missing_shard(tiny_models, tmp_path):
    dst = tmp_path / "mm"
    shutil.copytree(tiny_models["gemma3_mm"][0], dst)
    victim = sorted(dst.glob("*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard .*{victim.name}.* is missing"):
        load_model(dst)


def test_bad_dtype(qwen_copy):
    with pytest.raises(CheckpointError, match="float16"):
        load_model(qwen_copy, dtype="float16")


# Real configs of the paper's checkpoints (no weights): parameter counts feed the FLOPs bill.

PUBLISHED = {
    "Qwen2.5-Math-1.5B-Instruct": 1.54e9, "Qwen2.5-Math-7B-Instruct": 7.62e9,
    "Qwen2.5-1.5B-Instruct": 1.54e9, "Qwen2.5-7B-Instruct": 7.62e9,
    "gemma-3-4b-it": 3.88e9, "gemma-3-12b-it": 11.77e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_known_checkpoint_sizes(name):
    assert num_params(families.known(name)) == pytest.approx(PUBLISHED[name], rel=0.01)


@pytest.mark.parametrize("folder", ["Qwen2.5-1.5B-Instruct", "Qwen2.5-7B-Instruct", "gemma-3-4b-it"])
def test_real_configs_match_known_constructors(hf_meta, folder):
    assert read_config(hf_meta / folder) == families.known(folder)


def test_real_gemma3_config_parsed_like_transformers(hf_meta):
    ours = read_config(hf_meta / "gemma-3-4b-it")
    ref = tf.Gemma3Config.from_pretrained(hf_meta / "gemma-3-4b-it").text_config
    assert ours.sliding_layers == tuple(t == "sliding_attention" for t in ref.layer_types)
    assert ours.sliding_window == ref.sliding_window
    assert ours.rope_global.theta == ref.rope_parameters["full_attention"]["rope_theta"]
    assert ours.rope_global.linear_factor == ref.rope_parameters["full_attention"]["factor"]
    assert ours.rope_local.theta == ref.rope_parameters["sliding_attention"]["rope_theta"]
    assert (ours.num_heads, ours.num_kv_heads, ours.head_dim, ours.vocab_size) == (
        ref.num_attention_heads, ref.num_key_value_heads, ref.head_dim, ref.vocab_size)
    assert ours.query_pre_attn_scalar == ref.query_pre_attn_scalar


def test_real_qwen_math_base_config(hf_meta):
    cfg = read_config(hf_meta / "Qwen2.5-Math-1.5B")
    assert cfg.rope_global.theta == 10000.0 and cfg.tie_embeddings
    assert num_params(cfg) == pytest.approx(1.54e9, rel=0.01)
