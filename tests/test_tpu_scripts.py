"""`tpu_scripts/tpu.py --dry-run` prints the gcloud lines a TPU run needs, with the flags that
matter: the name, the zone, the accelerator and runtime, and `--worker=all` wherever every host of a
pod slice must act. Run as a subprocess, as a user would, with no gcloud on the PATH."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tpu_scripts" / "tpu.py"
ZONE = ["--zone", "us-central2-b"]


def dry(*argv: str) -> list[list[str]]:
    # An empty PATH apart from the interpreter's: a dry run must not call gcloud (or git).
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    out = subprocess.run([sys.executable, str(SCRIPT), *argv, "--dry-run"], env=env,
                         capture_output=True, text=True, check=True).stdout
    return [shlex.split(line) for line in out.splitlines()]


def flags(cmd: list[str]) -> dict[str, str | bool]:
    """--key=value and bare --key flags of one command line."""
    out: dict[str, str | bool] = {}
    for tok in cmd:
        if tok.startswith("--"):
            key, sep, value = tok[2:].partition("=")
            out[key] = value if sep else True
    return out


def gcloud(cmd: list[str], verb: str) -> None:
    assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", verb], cmd


@pytest.mark.parametrize("accel,runtime", [("v5litepod-8", "v2-alpha-tpuv5-lite"),
                                           ("v4-32", "tpu-ubuntu2204-base")])
def test_create(accel, runtime):
    [cmd] = dry("create", "--name", "steer-a", *ZONE, "--accelerator-type", accel,
                "--project", "my-proj")
    gcloud(cmd, "create")
    assert cmd[5] == "steer-a"
    assert flags(cmd) == {"zone": "us-central2-b", "accelerator-type": accel, "version": runtime,
                          "project": "my-proj"}
    [spot] = dry("create", "--name", "s", *ZONE, "--accelerator-type", accel, "--spot",
                 "--version", "custom-rt")
    assert flags(spot)["version"] == "custom-rt" and flags(spot)["spot"] is True


def test_create_unknown_generation_asks_for_a_version():
    res = subprocess.run([sys.executable, str(SCRIPT), "create", "--name", "s", *ZONE,
                          "--accelerator-type", "v9x-8", "--dry-run"], capture_output=True,
                         text=True)
    assert res.returncode != 0 and "--version" in res.stderr and not res.stdout


def test_setup_ships_the_commit_and_installs_on_every_worker():
    archive, scp, ssh = dry("setup", "--name", "pod", *ZONE, "--repo", "/src/steer")
    assert archive[:4] == ["git", "-C", "/src/steer", "archive"] and archive[-1] == "HEAD"
    tarball = flags(archive)["output"]
    gcloud(scp, "scp")
    assert scp[5] == tarball and scp[6].startswith("pod:")
    assert flags(scp)["worker"] == "all" and flags(scp)["zone"] == "us-central2-b"
    gcloud(ssh, "ssh")
    assert ssh[5] == "pod" and flags(ssh)["worker"] == "all"
    remote = flags(ssh)["command"]
    assert "pip install -q 'jax[tpu]' -e ~/steer-jax" in remote
    assert remote.index("tar -xzf") < remote.index("pip install -q 'jax[tpu]'")


def test_place_pulls_gcs_on_workers_and_copies_local_dirs():
    mkdir, pull, push = dry("place", "--name", "pod", *ZONE, "--src", "gs://b/qwen-1.5b",
                            "--src", "ckpt/qwen-7b", "--dest", "models")
    for cmd in (mkdir, pull, push):
        assert flags(cmd)["worker"] == "all" and flags(cmd)["zone"] == "us-central2-b"
    assert flags(mkdir)["command"] == "mkdir -p models"
    gcloud(pull, "ssh")
    assert flags(pull)["command"] == "gcloud storage cp -r gs://b/qwen-1.5b models/"
    gcloud(push, "scp")
    assert "--recurse" in push and push[-4:-2] == ["ckpt/qwen-7b", "pod:models/"]


def _run_line(cmd: list[str]) -> list[str]:
    gcloud(cmd, "ssh")
    assert flags(cmd)["worker"] == "all"
    cd, _, run = flags(cmd)["command"].partition(" && ")
    assert cd == "cd ~/steer-jax"
    return shlex.split(run)


def test_launch_single_host_v5e():
    [cmd] = dry("launch", "--name", "v5e", *ZONE, "--config", "configs/paper/x.yaml",
                "--out", "runs/x", "--set", "steer.gamma=0.3")
    run = _run_line(cmd)
    assert run[:5] == ["~/venv/bin/steer-jax", "run", "configs/paper/x.yaml", "--out", "runs/x"]
    assert run[5:] == ["--set", "steer.gamma=0.3"]  # one host: no distributed keys


def test_launch_pod_relies_on_the_tpu_environment_or_a_coordinator():
    [auto] = dry("launch", "--name", "v4", *ZONE, "--config", "c.yaml", "--out", "runs/y",
                 "--workers", "4", "--mesh-data", "1", "--mesh-model", "4")
    run = _run_line(auto)
    sets = [run[i + 1] for i, tok in enumerate(run) if tok == "--set"]
    assert sets == ["mesh.data=1", "mesh.model=4", "distributed.auto=true"]
    [explicit] = dry("launch", "--name", "v4", *ZONE, "--config", "c.yaml", "--out", "runs/y",
                     "--workers", "4", "--coordinator", "10.0.0.2:8476")
    remote = flags(explicit)["command"]
    assert "--set distributed.coordinator=10.0.0.2:8476" in remote
    assert "--set distributed.num_processes=4" in remote
    # Every worker computes its own index on the VM: left for the remote shell to expand.
    assert "distributed.process_id=$(curl" in remote and "agent-worker-number)" in remote


def test_collect_from_worker_zero_and_delete():
    mkdir, scp = dry("collect", "--name", "v4", *ZONE, "--out", "runs/y")
    assert mkdir == ["mkdir", "-p", "runs/v4"]
    gcloud(scp, "scp")
    assert flags(scp)["worker"] == "0" and "--recurse" in scp
    assert scp[-4:-2] == ["v4:~/steer-jax/runs/y", "runs/v4/"]
    [delete] = dry("delete", "--name", "v4", *ZONE)
    gcloud(delete, "delete")
    assert delete[5] == "v4" and flags(delete) == {"quiet": True, "zone": "us-central2-b"}
