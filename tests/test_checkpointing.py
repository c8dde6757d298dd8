"""Round checkpoints: a run stopped inside a wave continues from its newest complete round and
writes exactly the traces of a run that was never stopped.

The runs use source="generator" (a mixture per writer), the routing state with the most parts to
save; tests/test_distributed.py resumes a run on a mesh with the default source.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import tiny
from steer_jax import runner
from steer_jax.runner import RunConfigError, run, validate

ROUNDS = Path("waves") / "rounds_00000"  # the only wave: batch.size covers every example


class _Preempted(Exception):
    """Raised from the progress hook, after a round's checkpoint is saved, as a preemption."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("ckpt")
    small, large = tiny.steer_pair(root / "pair")
    cfg = {"small": str(small), "large": str(large), "dtype": "float32",
           "benchmark": {"name": "musique", "path": str(shared_data / "musique"), "limit": 4},
           "steer": {"max_steps": 7, "max_step_tokens": 8, "max_new_tokens": 56,
                     "source": "generator"},
           "batch": {"size": 4}}
    run(cfg, root / "whole")
    whole = (root / "whole" / "traces.jsonl").read_text()
    steps = [len(json.loads(x)["steps"]) for x in whole.splitlines()]
    assert max(steps) >= 5  # rounds left after the checkpoints these tests stop at
    return {"cfg": cfg, "whole": whole, "rounds": (root / "whole" / "rounds.jsonl").read_text(),
            "root": root}


def _stop_after(cfg, out: Path, rounds: int) -> None:
    def progress(done: int, total: int, message: str) -> None:
        if f"round {rounds}," in message:
            raise _Preempted

    with pytest.raises(_Preempted):
        run(cfg, out, checkpoint_every=1, progress=progress)


@pytest.fixture(scope="module")
def stopped(setup):
    """A run stopped after its third round: round checkpoints 2 and 3 on disk."""
    out = setup["root"] / "stopped"
    _stop_after(setup["cfg"], out, 3)
    assert sorted(p.name for p in (out / ROUNDS).iterdir()) == ["round_00002", "round_00003"]
    assert not (out / "waves" / "wave_00000.json").exists()
    return out


def _resume(cfg, out: Path) -> list[str]:
    """Resume `out`; the progress messages it printed."""
    messages: list[str] = []
    run(cfg, out, resume=True, progress=lambda done, total, m: messages.append(m))
    return messages


def test_killed_run_resumes_from_its_newest_round(setup, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(setup["cfg"]))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "steer_jax.cli", "run", str(path), "--out",
                             str(out), "--checkpoint-every", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / ROUNDS / "round_00002").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the run died or hung"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Killed inside the wave: neither the wave nor the summary was written.
    assert not (out / "waves" / "wave_00000.json").exists()
    assert not (out / "summary.json").exists()
    saved = sorted(int(p.name[len("round_"):]) for p in (out / ROUNDS).iterdir()
                   if runner._ROUND_DIR.fullmatch(p.name))
    before = json.loads((out / ROUNDS / f"round_{saved[-1]:05d}" / "meta" / "metadata")
                        .read_text())["wall_s"]
    messages = _resume(setup["cfg"], out)
    # It went on after its newest saved round, not from the start of the wave.
    assert f"round {saved[-1] + 1}," in messages[0], (saved, messages[0])
    assert (out / "traces.jsonl").read_text() == setup["whole"]
    assert (out / "rounds.jsonl").read_text() == setup["rounds"]
    # The bill counts the killed process's time up to its checkpoint (compiles included).
    assert json.loads((out / "summary.json").read_text())["wall_s"] > before > 0
    assert not (out / ROUNDS).exists()  # a finished wave drops its round checkpoints


def test_a_half_written_or_damaged_round_is_passed_over(setup, stopped, tmp_path, caplog):
    out = tmp_path / "out"
    shutil.copytree(stopped, out)
    rounds = out / ROUNDS
    # A save of round 4 killed halfway: orbax's temporary directory, only partly written.
    partial = rounds / "round_00004.orbax-checkpoint-tmp-1700000000000000"
    shutil.copytree(rounds / "round_00003", partial)
    shutil.rmtree(partial / "state")
    # Round 3 damaged afterwards (a torn copy): its array metadata cut in half.
    meta = rounds / "round_00003" / "state" / "_METADATA"
    meta.write_text(meta.read_text()[: len(meta.read_text()) // 2])
    with caplog.at_level(logging.WARNING, logger=runner.__name__):
        messages = _resume(setup["cfg"], out)
    assert any("round_00003 is unreadable" in r.getMessage() for r in caplog.records)
    assert "round 3," in messages[0]  # from round 2, the newest good one
    assert (out / "traces.jsonl").read_text() == setup["whole"]


def test_resume_without_round_checkpoints_starts_the_wave_over(setup, stopped, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(stopped, out)
    shutil.rmtree(out / ROUNDS)
    assert "round 1," in _resume(setup["cfg"], out)[0]
    assert (out / "traces.jsonl").read_text() == setup["whole"]


def test_a_round_checkpoint_of_another_config_or_wave_is_refused(setup, stopped):
    cfg, _ = validate(setup["cfg"])
    waves = stopped / "waves"
    changed = {**cfg, "steer": {**cfg["steer"], "gamma": 0.9}}
    with pytest.raises(RunConfigError, match=r"config changed since it was saved \(steer\)"):
        runner._RoundCheckpoint(waves, 0, range(0, 4), 1, changed, None).latest()
    with pytest.raises(RunConfigError, match=r"holds wave 0 \(traces \[0, 4\]\).*traces \[0, 2\]"):
        runner._RoundCheckpoint(waves, 0, range(0, 2), 1, cfg, None).latest()


def test_bad_checkpoint_every_is_refused_before_any_work(setup, tmp_path):
    with pytest.raises(RunConfigError, match="checkpoint_every must be a positive"):
        run(setup["cfg"], tmp_path, checkpoint_every=0)
    with pytest.raises(RunConfigError, match="needs an output directory"):
        run(setup["cfg"], None, checkpoint_every=2)
    several = {**setup["cfg"], "distributed": {"coordinator": "127.0.0.1:1", "num_processes": 2,
                                               "process_id": 0}}
    with pytest.raises(RunConfigError, match="not supported with a distributed section"):
        run(several, tmp_path, checkpoint_every=1)
