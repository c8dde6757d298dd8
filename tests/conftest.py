"""Session-wide test setup.

Eight fake CPU devices are configured before JAX starts its backend so that mesh and sharding tests
run in this process; single-device code is unaffected (it runs on device 0).

Compiling is most of the suite's time (hundreds of small programs, each run a few times), so:
- XLA compiles its CPU code with LLVM's optimizations off (`make test` 30% faster). XLA's own HLO
  passes still run; only the machine code is slower, but its floats can differ from an optimized
  build's in the last bits (seen: a subprocess compiled with them wrote other confidences), so
  every process of one test, subprocesses included, uses the same flags
  (`tiny.cpu_process_env`). The engine's own exactness tests (HF equality, batch invariance,
  cached against full forward) keep LLVM's optimizations: a file named in OPTIMIZED, run alone
  as `make test` runs it, compiles as users' runs do.
- compiled programs are shared through JAX's persistent cache (`make test` gives all its processes
  one fresh folder; a bare pytest session gets its own), so a subprocess or a later test file that
  builds the same program loads it instead of compiling it again. Its keys hash XLA_FLAGS, so
  optimized and unoptimized programs never mix.
"""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

OPTIMIZED = {"test_decoding.py", "test_modeling.py"}

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="steer-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_configure(config: pytest.Config) -> None:
    # Before any test module imports JAX (collection comes after this hook).
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags += " --xla_force_host_platform_device_count=8"
    files = {Path(str(a).split("::")[0]).name for a in config.args}
    if not (files and files <= OPTIMIZED) and "xla_backend_optimization_level" not in flags:
        flags += " --xla_backend_optimization_level=0"
    os.environ["XLA_FLAGS"] = flags.strip()


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
def paper_results() -> Path:
    """The paper's Tables 1-2 as CSV (../shared/paper/results.csv: every pair, method and
    benchmark, averages included)."""
    path = SHARED_DATA.parent / "paper" / "results.csv"
    if not path.is_file():
        pytest.skip(f"{path} is absent: the paper's tables as CSV are needed for this test")
    return path


@pytest.fixture(scope="session")
def hf_meta(shared_data: Path) -> Path:
    """Real config.json and tokenizer files of the paper's checkpoints (no weights)."""
    path = shared_data / "hf"
    if not path.is_dir():
        pytest.skip(f"{path} is absent: real HF configs and tokenizers are needed for this test")
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The tiny STEER pair (tiny.steer_pair) loaded in float32, its tokenizer and chat prompts."""
    import tiny
    from steer_jax import load_model, load_tokenizer

    small_dir, large_dir = tiny.steer_pair(tmp_path_factory.mktemp("pair"))
    tok = load_tokenizer(small_dir)
    return dict(small=load_model(small_dir, "float32"), large=load_model(large_dir, "float32"),
                tok=tok, prompts=tiny.chat_prompts(tok), small_dir=small_dir,
                large_dir=large_dir)


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
