"""HF checkpoint -> orbax checkpoint that restores straight into a device mesh's shardings.

safetensors files are laid out for PyTorch ([out, in] matrices, heads fused); every load converts
them. `convert` does that once and saves the steer-jax layout with orbax, whose restore reads each
device's shard directly into its sharding (on a pod: from GCS, on every host at once). The output
directory keeps config.json, generation_config.json and the tokenizer files beside `orbax/`, so
`load_model` and `load_tokenizer` take it like an HF directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import orbax.checkpoint as ocp

from steer_jax.modeling.loading import ORBAX_DIR, CheckpointError, load_model

_CARRIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.json", "chat_template.jinja", "vocab.json",
            "merges.txt", "tokenizer.model", "added_tokens.json")


def convert(hf_dir: str | Path, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Write `out_dir` with the weights of `hf_dir` as an orbax checkpoint (stacked layers)."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir).absolute()
    if (out_dir / ORBAX_DIR).exists():
        raise CheckpointError(f"{out_dir / ORBAX_DIR} already exists; choose another OUT_DIR")
    model = load_model(hf_dir, dtype, scan_layers=True, cpu_kernels=False)  # the plain layout
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in _CARRIED:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out_dir / name)
    # orbax writes to a temporary directory and renames it: a killed convert leaves no orbax/.
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out_dir / ORBAX_DIR, model.params)
    return out_dir
