"""`Model` -> a Hugging Face checkpoint directory: the inverse of `loading.py`.

Demo models (issue #7) and converted checkpoints must be shippable to anyone, so the export is the
plain HF layout (config.json + model.safetensors + generation_config.json, and the tokenizer's
files when given) that both `steer_jax.load_model` and transformers' `from_pretrained` read. The
tensor names are not a second table: the export walks the parameters the module declares
(`module.param_specs`) and names each by the same family `RULES` the loader matches, so the two
directions cannot drift apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from steer_jax.modeling import execution, families, gemma3, qwen2, weights
from steer_jax.modeling.config import Execution, ModelConfig, RopeConfig
from steer_jax.modeling.transformer import Model

_FAMILIES = {"qwen2": qwen2, "gemma3": gemma3}
_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
_LAYER_GROUP = r"(\d+)"


def to_hf(kind: weights.Kind, x: np.ndarray) -> np.ndarray:
    """Our (per-layer) layout -> HF's: the exact inverse of `weights.to_ours` for each kind.

    The HF shape follows from ours alone (`weights.hf_shape`), so no target shape is needed.
    """
    if kind in ("copy", "row", "bias_heads", "bias_kv_heads"):
        return x.reshape(weights.hf_shape(kind, x.shape))
    if kind == "transpose":
        return x.T
    if kind in ("in_heads", "in_kv_heads"):  # [D, H, hd] -> [H * hd, D]
        return x.reshape(x.shape[0], -1).T
    if kind == "out_heads":  # [H, hd, D] -> [D, H * hd]
        return x.reshape(-1, x.shape[-1]).T
    raise ValueError(f"unknown layout kind {kind!r}")


def hf_name(rule: weights.Rule, layer: int | None) -> str:
    """The concrete HF tensor name a rule's pattern matches for `layer` (None: not a layer tensor).

    Checked against the pattern itself, so a rule written with regex syntax beyond one layer group
    and escapes fails here rather than producing a name the loader would reject.
    """
    name = rule.pattern if layer is None else rule.pattern.replace(_LAYER_GROUP, str(layer), 1)
    name = re.sub(r"\\(.)", r"\1", name)
    m = re.fullmatch(rule.pattern, name)
    if m is None or (layer is not None and int(m.group(1)) != layer):
        raise ValueError(f"cannot invert the tensor-name pattern {rule.pattern!r}")
    return name


def _int_if_whole(x: float) -> int | float:
    # HF's strict configs type some of these as int (Gemma's query_pre_attn_scalar).
    return int(x) if float(x).is_integer() else float(x)


def _eos(cfg: ModelConfig) -> int | list[int] | None:
    ids = list(cfg.eos_token_ids)
    if len(ids) == 1:
        return ids[0]
    # An empty list, not null: a null would let Gemma's parser fall back to its default id 1.
    return ids if ids or cfg.family == "gemma3" else None


def _rope_dict(rope: RopeConfig) -> dict[str, Any]:
    if rope.linear_factor == 1.0:
        return {"rope_type": "default", "rope_theta": rope.theta}
    return {"rope_type": "linear", "rope_theta": rope.theta, "factor": rope.linear_factor}


def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """config.json for `cfg` in the transformers-5 spelling; `from_hf_config` of it gives `cfg`.

    `value_head` is not part of the result (HF configs have no spelling for it; a PRM is loaded
    with `load_model(..., value_head=True)`). Raises ValueError for a config the family's
    config.json cannot express, rather than writing a checkpoint that loads as another model.
    """
    layer_types = ["sliding_attention" if s else "full_attention" for s in cfg.sliding_layers]
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=cfg.max_position_embeddings, layer_types=layer_types,
        bos_token_id=cfg.bos_token_id, eos_token_id=_eos(cfg), pad_token_id=cfg.pad_token_id,
        dtype=dtype, torch_dtype=dtype,  # `dtype` for transformers 5, `torch_dtype` before it
    )
    if cfg.family == "qwen2":
        hf: dict[str, Any] = dict(
            model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu",
            **common, use_sliding_window=any(cfg.sliding_layers),
            sliding_window=cfg.sliding_window if any(cfg.sliding_layers) else None,
            rope_theta=cfg.rope_global.theta, rope_parameters=_rope_dict(cfg.rope_global))
        if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
            hf["head_dim"] = cfg.head_dim  # HF's Qwen2 attention reads it when present
    elif cfg.family == "gemma3":
        hf = dict(
            model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
            hidden_activation="gelu_pytorch_tanh", **common, head_dim=cfg.head_dim,
            query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar or cfg.head_dim),
            sliding_window=cfg.sliding_window, final_logit_softcapping=cfg.final_logit_softcap,
            attn_logit_softcapping=None,
            # Top-level bases too, for readers older than the per-layer-type rope_parameters.
            rope_theta=cfg.rope_global.theta, rope_local_base_freq=cfg.rope_local.theta,
            rope_parameters={"full_attention": _rope_dict(cfg.rope_global),
                             "sliding_attention": _rope_dict(cfg.rope_local)})
    else:
        raise ValueError(f"cannot export model family {cfg.family!r}")
    # The round trip is the contract; checking it here catches every switch the family's
    # config.json has no spelling for (e.g. a qwen2 config with two RoPE bases).
    expected = dataclasses.replace(cfg, value_head=False, execution=Execution())
    parsed = families.from_hf_config(json.loads(json.dumps(hf)))
    if parsed != expected:
        diff = {f.name: (getattr(expected, f.name), getattr(parsed, f.name))
                for f in dataclasses.fields(cfg)
                if getattr(expected, f.name) != getattr(parsed, f.name)}
        raise ValueError(f"a {cfg.family} config.json cannot express this config; "
                         f"(ours, as reloaded) differ in {diff}")
    return hf


def _rule_per_path(cfg: ModelConfig) -> dict[tuple[str, ...], weights.Rule]:
    """The family's rule for each module path; an error where a path has two."""
    rules: dict[tuple[str, ...], weights.Rule] = {}
    for rule in _FAMILIES[cfg.family].RULES:
        if rule.path in rules:
            raise ValueError(f"two {cfg.family} rules name parameter {'.'.join(rule.path)}")
        rules[rule.path] = rule
    return rules


def _tree_paths(params: dict[str, Any]) -> set[tuple[str, ...]]:
    """Module paths of a declared-layout params tree."""
    ours = {("layers", k) for k in params.get("layers", {})}
    for k, v in params.items():
        if k != "layers":
            ours |= {(k, sub) for sub in v} if isinstance(v, dict) else {(k,)}
    return ours


def hf_tensors(model: Model, dtype: Any = None) -> dict[str, np.ndarray]:
    """The model's parameters as HF-named, HF-shaped host arrays (contiguous, as safetensors needs).

    Walks the parameters the module declares for the model's config (`module.param_specs`), each
    written by its family rule, read in the declared layout (`execution.parameter`) whatever
    layout the model runs, one parameter at a time. Raises ValueError if a declared parameter
    has no HF name or is absent, or the params hold one the config does not declare, so an
    export never silently drops a tensor.
    """
    from steer_jax.modeling.module import param_specs  # flax on first use: see loading.py

    cfg, params = model.config, model.params
    np_dtype = np.dtype(dtype) if dtype is not None else np.dtype(model.dtype)
    declared = param_specs(cfg)
    ours = _tree_paths(jax.eval_shape(functools.partial(execution.canonical, cfg), params))
    if ours != set(declared):
        raise ValueError(f"the params are not this config's parameters: undeclared "
                         f"{sorted('.'.join(p) for p in ours - set(declared))}, missing "
                         f"{sorted('.'.join(p) for p in set(declared) - ours)}")
    rules = _rule_per_path(cfg)
    unnamed = sorted(".".join(p) for p in declared if p not in rules)
    if unnamed:
        raise ValueError(f"parameters with no Hugging Face name in the {cfg.family} rules: "
                         f"{unnamed}")
    out: dict[str, np.ndarray] = {}

    def put(rule: weights.Rule, layer: int | None, value: Any) -> None:
        out[hf_name(rule, layer)] = np.ascontiguousarray(
            to_hf(rule.kind, np.asarray(value).astype(np_dtype)))

    for path in declared:
        # One device->host copy per parameter, all its layers at once.
        value = np.asarray(execution.parameter(cfg, params, path))
        for i in range(cfg.num_layers) if path[0] == "layers" else [None]:
            put(rules[path], i, value if i is None else value[i])
    return out


def _check_target(path: Path) -> None:
    # The loader prefers an index and reads every *.safetensors file, so another checkpoint's
    # weights left in the directory would be mixed into (or shadow) this one.
    stale = [p.name for p in path.glob("*.safetensors") if p.name != "model.safetensors"]
    if (path / "model.safetensors.index.json").exists():
        stale.append("model.safetensors.index.json")
    if stale:
        raise FileExistsError(f"{path} holds other weight files {sorted(stale)}; export into an "
                              "empty directory or remove them")


def _write_atomic(path: Path, write: Any) -> Path:
    """Write via `write(tmp_path)` into a hidden temporary file beside `path`; returns it.

    The caller renames it into place, so a crash leaves the old file (or none), never half of one.
    The temporary name does not end in .safetensors, so a loader never globs it.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make a shipped checkpoint unreadable to others
        write(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def save_hf(model: Model, path: str | Path, *, tokenizer: Any = None,
            dtype: str | None = None) -> Path:
    """Write `model` as a Hugging Face checkpoint directory that steer-jax and transformers load.

    `dtype`: "float32" or "bfloat16" for the stored weights; None keeps the model's own.
    `tokenizer`: a transformers tokenizer whose files are saved beside the weights.
    A value-head model (a PRM) also gets `v_head.summary.{weight,bias}`; load it back with
    `load_model(path, value_head=True)` (transformers ignores those two tensors).
    Returns the directory.
    """
    path = Path(path)
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
    np_dtype = _DTYPES[dtype] if dtype else np.dtype(model.dtype)
    dtype_name = "bfloat16" if np_dtype == _DTYPES["bfloat16"] else np_dtype.name
    # Everything that can fail on the model (config spelling, names) fails before any write.
    config = hf_config(model.config, dtype_name)
    tensors = hf_tensors(model, np_dtype)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if config[k] is not None}
    path.mkdir(parents=True, exist_ok=True)
    _check_target(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))

    def json_writer(obj: dict[str, Any]) -> Any:
        def write(tmp: str) -> None:
            Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        return write

    # All three are written in full before any is renamed, so a failed write leaves the directory
    # as it was; only a crash between the renames could pair old and new files. Config last, so
    # a fresh directory never has a config.json without its weights. generation_config.json is
    # rewritten because `read_config` merges its EOS ids in, and a stale one would change them.
    pending: list[tuple[Path, Path]] = []
    try:
        for name, writer in (
                ("model.safetensors",
                 lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})),
                ("generation_config.json", json_writer(generation)),
                ("config.json", json_writer(config))):
            pending.append((_write_atomic(path / name, writer), path / name))
    except BaseException:
        for tmp, _ in pending:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    for tmp, final in pending:
        os.replace(tmp, final)
    return path


__all__ = ["hf_config", "hf_name", "hf_tensors", "save_hf", "to_hf"]
