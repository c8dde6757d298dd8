"""Session-wide test setup.

Eight fake CPU devices are configured before JAX is imported so that mesh and sharding tests run in
this process; single-device code is unaffected (it runs on device 0).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py, shared builders
SHARED_DATA = Path(os.environ.get("STEER_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real benchmark copies and HF metadata beside the checkout (never committed)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (set STEER_SHARED_DATA to point at it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def hf_meta(shared_data: Path) -> Path:
    """Real config.json and tokenizer files of the paper's checkpoints (no weights)."""
    path = shared_data / "hf"
    if not path.is_dir():
        pytest.skip(f"{path} is absent: real HF configs and tokenizers are needed for this test")
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny HF checkpoints on disk and their torch models, built once per session."""
    import tiny

    root = tmp_path_factory.mktemp("hf")
    built = {
        "qwen2_tied_mha": tiny.qwen2(root / "qwen2_tied_mha", tied=True, gqa=False, seed=1),
        "qwen2_untied_gqa": tiny.qwen2(root / "qwen2_untied_gqa", tied=False, gqa=True, seed=2),
        "gemma3_text": tiny.gemma3_text(root / "gemma3_text", seed=3),
        "gemma3_mm": tiny.gemma3_multimodal(root / "gemma3_mm", seed=4),
    }
    return {name: (root / name, model) for name, model in built.items()}
