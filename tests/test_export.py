"""save_hf: exports that steer-jax and transformers both load as the model that was saved."""

from __future__ import annotations

import dataclasses
import json
import typing

import jax
import numpy as np
import pytest
import torch
from safetensors import safe_open

import steer_jax
from steer_jax.modeling import export, families, weights
from steer_jax.modeling.config import Execution
from steer_jax.modeling.export import hf_config, save_hf, to_hf


def _as_saved(cfg, **changes):
    """A loaded model's config as its checkpoint spells it: how this machine runs it (scan,
    CPU kernels) is chosen at load, not saved."""
    return dataclasses.replace(cfg, execution=Execution(), **changes)


TEXT_MODELS = ["qwen2_tied_mha", "qwen2_untied_gqa", "gemma3_text"]


def _ids(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, (3, 11))


def _keys(path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
        return set(f.keys())


def _assert_same_params(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("kind", typing.get_args(weights.Kind))
def test_to_hf_inverts_to_ours(kind):
    rng = np.random.default_rng(0)
    ndim = {"copy": 1, "row": 1, "transpose": 2, "in_heads": 3, "in_kv_heads": 3,
            "bias_heads": 2, "bias_kv_heads": 2, "out_heads": 3}[kind]
    for _ in range(5):
        shape = tuple(int(n) for n in rng.integers(1, 7, ndim))
        x = rng.standard_normal(shape).astype(np.float32)
        y = to_hf(kind, x)
        assert y.shape == weights.hf_shape(kind, shape)
        np.testing.assert_array_equal(weights.to_ours(kind, y, shape), x)
    if kind == "row":  # the value head's scalar bias is stored as [1]
        assert to_hf(kind, np.float32(3.0).reshape(())).shape == (1,)


def test_to_hf_head_layouts_match_hf_rows():
    # Independent of to_ours: HF's row h * hd + j of q_proj is our [:, h, j]; o_proj's column too.
    x = np.random.default_rng(1).standard_normal((5, 3, 4))  # [D, H, hd]
    np.testing.assert_array_equal(to_hf("in_heads", x)[2 * 4 + 1], x[:, 2, 1])
    o = np.random.default_rng(2).standard_normal((3, 4, 5))  # [H, hd, D]
    np.testing.assert_array_equal(to_hf("out_heads", o)[:, 2 * 4 + 1], o[2, 1])


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("name", TEXT_MODELS)
def test_export_reloads_identically(tiny_models, tmp_path, name, scan):
    src, _ = tiny_models[name]
    model = steer_jax.load_model(src, "float32", scan_layers=scan)
    out = save_hf(model, tmp_path / "export")
    again = steer_jax.load_model(out, "float32", scan_layers=scan)
    assert again.config == model.config
    _assert_same_params(again.params, model.params)
    np.testing.assert_array_equal(np.asarray(again.logits(_ids())),
                                  np.asarray(model.logits(_ids())))
    # Same tensor names as transformers' own save: a tied model has no lm_head.
    assert _keys(out) == _keys(src)
    assert ("lm_head.weight" in _keys(out)) == (not model.config.tie_embeddings)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_transformers_loads_export(tiny_models, tmp_path, name):
    from transformers import AutoModelForCausalLM

    src, reference = tiny_models[name]
    out = save_hf(steer_jax.load_model(src, "float32"), tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(loaded) is type(reference)
    ids = torch.tensor(_ids(3))
    with torch.no_grad():
        want, got = reference(ids).logits.numpy(), loaded(ids).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_config_round_trip(tiny_models, tmp_path, name):
    model = steer_jax.load_model(tiny_models[name][0], "float32")
    cfg = json.loads((save_hf(model, tmp_path / "e") / "config.json").read_text())
    assert families.from_hf_config(cfg) == _as_saved(model.config)
    # Spelled as transformers spells it (a single EOS id as a scalar, the v5 rope_parameters...).
    source = json.loads((tiny_models[name][0] / "config.json").read_text())
    differ = {k: (cfg[k], source[k]) for k in cfg.keys() & source.keys() if cfg[k] != source[k]}
    assert differ == {}


def test_config_round_trip_multi_eos_and_sliding_qwen():
    base = families.known("Qwen2.5-1.5B-Instruct")
    cfg = dataclasses.replace(base, sliding_layers=(False,) * 20 + (True,) * 8,
                              sliding_window=2048)
    hf = hf_config(cfg)
    assert hf["eos_token_id"] == [151645, 151643] and hf["use_sliding_window"] is True
    assert families.from_hf_config(hf) == cfg
    assert families.from_hf_config(hf_config(families.known("gemma-3-4b-it"))) == \
        families.known("gemma-3-4b-it")


def test_unexpressible_config_is_refused():
    cfg = families.known("Qwen2.5-1.5B-Instruct")
    two_bases = dataclasses.replace(cfg, rope_local=dataclasses.replace(cfg.rope_local, theta=1.0))
    with pytest.raises(ValueError, match="rope_local"):
        hf_config(two_bases)


def test_bfloat16_export_equals_bfloat16_load(tiny_models, tmp_path):
    src, _ = tiny_models["gemma3_text"]
    out = save_hf(steer_jax.load_model(src, "float32"), tmp_path / "bf16", dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"bfloat16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    _assert_same_params(steer_jax.load_model(out, "bfloat16").params,
                        steer_jax.load_model(src, "bfloat16").params)


def test_value_head_and_tokenizer_round_trip(tmp_path):
    import tiny

    _, w, b = tiny.prm(tmp_path / "prm")
    model = steer_jax.load_model(tmp_path / "prm", "float32", value_head=True, scan_layers=False)
    tok = steer_jax.load_tokenizer(tmp_path / "prm")
    out = save_hf(model, tmp_path / "export", tokenizer=tok)
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("v_head.summary.weight"), w.numpy()[None])
        np.testing.assert_array_equal(f.get_tensor("v_head.summary.bias"), b.numpy())
    again = steer_jax.load_model(out, "float32", value_head=True, scan_layers=False)
    _assert_same_params(again.params, model.params)
    assert again.config == model.config
    cfg = json.loads((out / "config.json").read_text())
    assert families.from_hf_config(cfg) == _as_saved(model.config, value_head=False)
    text = "so\n\nthen<|im_end|>"
    assert steer_jax.load_tokenizer(out).encode(text) == tok.encode(text)


def test_failed_write_leaves_previous_export(tiny_models, tmp_path, monkeypatch):
    model = steer_jax.load_model(tiny_models["qwen2_tied_mha"][0], "float32")
    out = save_hf(model, tmp_path / "e")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_hf(model, out, dtype="bfloat16")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_refuses_directory_with_other_weights(tiny_models, tmp_path):
    model = steer_jax.load_model(tiny_models["qwen2_tied_mha"][0], "float32")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(FileExistsError, match="other weight files"):
        save_hf(model, tmp_path)


def test_multimodal_gemma_exports_its_text_model(tiny_models, tmp_path):
    model = steer_jax.load_model(tiny_models["gemma3_mm"][0], "float32")
    out = save_hf(model, tmp_path / "text")
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma3_text"
    assert not any(k.startswith(("vision", "multi_modal", "language_model")) for k in _keys(out))
    again = steer_jax.load_model(out, "float32")
    assert again.config == model.config
    _assert_same_params(again.params, model.params)
