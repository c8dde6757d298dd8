"""Local Hugging Face checkpoints (config.json + safetensors) -> `Model`, and their tokenizers.

Nothing here executes code shipped with a checkpoint: configs are parsed by steer-jax, weights are
read by safetensors, tokenizers are built by transformers with `trust_remote_code=False`. Every
tensor is checked against the config's shapes from the file header before its bytes are read, and
tensors the text model does not use (a multimodal checkpoint's vision tower) are never read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open

from steer_jax.modeling import execution, families, gemma3, qwen2, weights
from steer_jax.modeling.config import ConfigError, ModelConfig
from steer_jax.modeling.transformer import Model

_FAMILIES = {"qwen2": qwen2, "gemma3": gemma3}
ORBAX_DIR = "orbax"  # a converted checkpoint's weights (`steer-jax convert`)
_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def _param_shapes(cfg: ModelConfig, dtype: Any = jnp.float32) -> dict[str, Any]:
    # The module (and flax, which imports yaml) on first use, not at `import steer_jax`: a
    # script that never builds a model never pays for them (tests/test_imports.py).
    from steer_jax.modeling.module import param_shapes

    return param_shapes(cfg, dtype)


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as it is; the message names what is wrong."""


def read_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of a checkpoint directory, with EOS ids from generation_config.json too."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing: not a Hugging Face checkpoint directory")
    try:
        hf = json.loads(config_file.read_text())
        cfg = families.from_hf_config(hf)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from e
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: {e}") from e
    gen_file = path / "generation_config.json"
    if gen_file.is_file():  # chat checkpoints list their end-of-turn token only here
        eos = json.loads(gen_file.read_text()).get("eos_token_id")
        eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
        merged = tuple(dict.fromkeys([*cfg.eos_token_ids, *map(int, eos)]))
        cfg = dataclasses.replace(cfg, eos_token_ids=merged)
    return cfg


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} has no readable 'weight_map': {e}") from e
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"shard {f} named in {index.name} is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {path}")
    return files


def _read_tensor(handle: Any, name: str, region: tuple[slice, ...]) -> np.ndarray:
    """The only place bytes are read: one rectangular region of one tensor."""
    return handle.get_slice(name)[region]


def _heads(s: slice, hd: int) -> slice:
    """Rows of a [heads * head_dim, ...] tensor holding the heads in `s`."""
    return slice(s.start * hd, s.stop * hd)


def _read_region(handle: Any, name: str, kind: weights.Kind, shape: tuple[int, ...],
                 index: tuple[slice, ...]) -> np.ndarray:
    """`index` of the steer-jax layout `shape`, read from the HF tensor without the rest of it."""
    read = functools.partial(_read_tensor, handle, name)
    if kind == "copy":
        return read(index)
    if kind == "row":
        return read((slice(0, 1), *index)).reshape([s.stop - s.start for s in index])
    if kind == "transpose":
        return read(index[::-1]).T
    if kind in ("in_heads", "in_kv_heads"):  # [D, H, hd] <- [H * hd, D]
        d, h, k = index
        block = read((_heads(h, shape[2]), d)).T
        return block.reshape(d.stop - d.start, h.stop - h.start, shape[2])[:, :, k]
    if kind in ("bias_heads", "bias_kv_heads"):  # [H, hd] <- [H * hd]
        h, k = index
        return read((_heads(h, shape[1]),)).reshape(h.stop - h.start, shape[1])[:, k]
    if kind == "out_heads":  # [H, hd, D] <- [D, H * hd]
        h, k, d = index
        block = read((d, _heads(h, shape[1]))).T
        return block.reshape(h.stop - h.start, shape[1], d.stop - d.start)[:, k, :]
    raise ValueError(kind)


def _locate(path: Path, cfg: ModelConfig) -> dict[tuple[tuple[str, ...], int | None],
                                                  tuple[Path, str, weights.Kind]]:
    """Where each parameter (and layer) lives: file, tensor name, layout. Checked against the
    config from the files' headers alone, so a bad checkpoint fails before any byte is read."""
    family = _FAMILIES[cfg.family]
    shapes = {tuple(k.key for k in p): s.shape
              for p, s in jax.tree_util.tree_flatten_with_path(_param_shapes(cfg))[0]}
    where = {}
    for file in _weight_files(path):
        try:
            handle = safe_open(str(file), framework="numpy")
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise CheckpointError(f"{file} is not a readable safetensors file ({e})") from e
        with handle:
            for name in handle.keys():
                local = name
                for prefix, replacement in family.PREFIXES:
                    if local.startswith(prefix):
                        local = replacement + local[len(prefix):]
                        break
                if local.startswith(family.IGNORED):
                    continue
                found = weights.match(family.RULES, local)
                if found is None:
                    raise CheckpointError(f"unexpected tensor {name!r} in {file}")
                rule, layer = found
                if rule.path == ("lm_head",) and cfg.tie_embeddings:
                    continue  # some exports write the tied head out; the embedding is the truth
                if rule.path not in shapes:  # e.g. a value head, unasked for
                    raise CheckpointError(f"unexpected tensor {name!r} in {file} (a "
                                          f"{rule.path[0]} this model has no place for)")
                if layer is not None and layer >= cfg.num_layers:
                    raise CheckpointError(f"tensor {name!r} in {file} is for layer {layer}, but "
                                          f"the config has {cfg.num_layers} layers")
                target = shapes[rule.path][1:] if layer is not None else shapes[rule.path]
                expected = weights.hf_shape(rule.kind, target)
                got = tuple(handle.get_slice(name).get_shape())
                if got != expected:
                    raise CheckpointError(f"tensor {name!r} in {file} has shape {got}; the config "
                                          f"implies {expected}")
                where[(rule.path, layer)] = (file, name, rule.kind)
    missing = [".".join(p) + (f"[layer {i}]" if p[0] == "layers" else "")
               for p, shape in shapes.items()
               for i in (range(shape[0]) if p[0] == "layers" else [None])
               if (p, i) not in where]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensors missing, e.g. {missing[:5]}")
    return where


def load_params(path: str | Path, cfg: ModelConfig, dtype: str = "bfloat16",
                shardings: Any = None) -> dict[str, Any]:
    """Read a checkpoint's text-model weights into the steer-jax parameter tree.

    With `shardings` (a tree of `NamedSharding` like the parameters, e.g.
    `distributed.param_shardings`), each device's shard is read from the files by slices, so no
    host ever holds a whole large model; without, one parameter at a time is read whole.
    """
    path = Path(path)
    if dtype not in _DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
    np_dtype = _DTYPES[dtype]
    where = _locate(path, cfg)
    handles: dict[Path, Any] = {}

    def read(keys: tuple[str, ...], layer: int | None, shape: tuple[int, ...],
             index: tuple[slice, ...]) -> np.ndarray:
        file, name, kind = where[(keys, layer)]
        if file not in handles:
            handles[file] = safe_open(str(file), framework="numpy")
        try:
            return _read_region(handles[file], name, kind, shape, index).astype(np_dtype)
        except Exception as e:
            raise CheckpointError(f"tensor {name!r} in {file} cannot be read ({e}): "
                                  "is the file truncated?") from e

    def leaf(leaf_path: Any, abstract: Any, sharding: Any = None) -> jax.Array:
        keys, shape = tuple(k.key for k in leaf_path), tuple(abstract.shape)

        def fetch(index: tuple[slice, ...]) -> np.ndarray:
            index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
            if keys[0] != "layers":
                return read(keys, None, shape, index)
            layers = range(index[0].start, index[0].stop)
            return np.stack([read(keys, i, shape[1:], index[1:]) for i in layers])

        if sharding is None:
            return jnp.asarray(fetch((slice(None),) * len(shape)))
        return jax.make_array_from_callback(shape, sharding, fetch)

    shapes = _param_shapes(cfg)
    try:  # every read happens inside: make_array_from_callback calls back synchronously
        if shardings is None:
            return jax.tree_util.tree_map_with_path(leaf, shapes)
        return jax.tree_util.tree_map_with_path(leaf, shapes, shardings)
    finally:
        for handle in handles.values():  # release the files' maps now, not at collection
            handle.__exit__(None, None, None)


def is_converted(path: str | Path) -> bool:
    return (Path(path) / ORBAX_DIR).is_dir()


def load_converted(path: str | Path, cfg: ModelConfig, dtype: Any,
                   shardings: Any = None) -> dict[str, Any]:
    """Restore a converted checkpoint's parameters, each into its sharding when given."""
    shapes = _param_shapes(cfg, dtype)
    if shardings is None:
        # This process's own first device: in a multi-process run jax.devices()[0] is process
        # 0's, which the other processes cannot hold a shard on.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
    import orbax.checkpoint as ocp  # here: orbax is heavy, and most loads read safetensors

    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(Path(path).absolute() / ORBAX_DIR, target)


def load_model(path: str | Path, dtype: str = "bfloat16", *, value_head: bool = False,
               scan_layers: bool | None = None, mesh: Any = None,
               cpu_kernels: bool | None = None) -> Model:
    """Load a local HF checkpoint directory (Qwen2 family, Gemma 3 text or multimodal).

    `value_head`: the checkpoint is a process reward model whose `v_head.summary.*` tensors are
    read too (a Qwen2 PRM, as RSD uses); without it such tensors are unexpected.
    `mesh`: a ('data', 'model') mesh; each device's shard is then read straight from the files.
    `scan_layers`, `cpu_kernels`: how this machine runs the model (`execution.choose`: layers
    under `lax.scan` or unrolled; steer-jax's CPU matmul and decode-attention kernels or XLA's
    ops), recorded in the model's `config.execution`, its parameters held in that layout. An
    execution this machine cannot run is a CheckpointError saying why.
    `path` may also be a directory written by `steer-jax convert` (weights in orbax).
    """
    if dtype not in _DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
    cfg = read_config(path)
    if value_head:
        if cfg.family != "qwen2":
            raise CheckpointError(f"{path}: value heads are supported on Qwen2 checkpoints only")
        cfg = dataclasses.replace(cfg, value_head=True)
    try:
        how = execution.choose(dtype, 1 if mesh is None else mesh.size, scan_layers=scan_layers,
                               cpu_kernels=cpu_kernels)
    except execution.Unavailable as e:
        raise CheckpointError(str(e)) from e
    cfg = dataclasses.replace(cfg, execution=how)
    shardings = None
    if mesh is not None:
        from steer_jax.distributed import param_shardings

        shardings = param_shardings(_param_shapes(cfg), mesh)
    if is_converted(path):
        params = load_converted(path, cfg, _DTYPES[dtype], shardings)
    else:
        params = load_params(path, cfg, dtype, shardings)
    from steer_jax.modeling.module import layout  # flax on first use: see _param_shapes

    return Model(cfg, layout(cfg, params), str(path))


# tokenizer_config.json classes that mean "exactly the pipeline in tokenizer.json".
_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str | Path) -> Any:
    """The checkpoint's own transformers tokenizer, from local files only, never remote code.

    A checkpoint whose tokenizer_config.json declares a generic class gets exactly its
    tokenizer.json: AutoTokenizer would pick the class registered for config.json's model_type
    instead (Qwen2Tokenizer for the demo's qwen2 models), which rebuilds the tokenizer from the
    vocabulary with its own pre-tokenizer and encodes the demo's text into other ids.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"tokenizer directory {path} does not exist")
    try:
        declared = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        declared = None
    try:
        if declared in _GENERIC_TOKENIZERS and (path / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise CheckpointError(f"cannot load a tokenizer from {path}: {e}") from e
