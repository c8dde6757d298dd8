#!/usr/bin/env python3
"""Create, set up, feed, launch, collect and delete a Cloud TPU VM or pod slice for steer-jax.

Why a script and not a page of commands: a pod slice has several workers, and every step but
`create`, `collect` and `delete` must reach all of them (`--worker=all`); forgetting that on one
command leaves a worker without the code or the checkpoints and hangs the run at the first
collective. Each subcommand builds its gcloud command lines in one place, and `--dry-run` prints
them exactly, without running them and without needing gcloud installed, so they can be read,
pasted, and tested.

    python tpu_scripts/tpu.py create --name steer --zone us-west4-a \\
        --accelerator-type v5litepod-8 --dry-run

Only the Python standard library is used: it runs on a laptop that has gcloud but not steer-jax.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
REMOTE_REPO = "~/steer-jax"  # where the code lives on every worker
REMOTE_VENV = "~/venv"
TARBALL = "steer-jax.tar.gz"

# The TPU VM software image per TPU generation (the "runtime"); --version overrides it.
RUNTIMES = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}

Command = list[str]


def default_runtime(accelerator_type: str) -> str:
    """The runtime image for an accelerator type such as 'v5litepod-8' or 'v4-32'."""
    generation = accelerator_type.rsplit("-", 1)[0]
    if generation not in RUNTIMES:
        raise SystemExit(f"no default runtime for accelerator type {accelerator_type!r}; "
                         f"pass --version (known generations: {', '.join(RUNTIMES)})")
    return RUNTIMES[generation]


def _tpu(args: argparse.Namespace, verb: str, *rest: str) -> Command:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd


def _ssh(args: argparse.Namespace, remote: str, worker: str = "all") -> Command:
    return _tpu(args, "ssh", args.name, f"--worker={worker}", f"--command={remote}")


def create(args: argparse.Namespace) -> list[Command]:
    cmd = _tpu(args, "create", args.name, f"--accelerator-type={args.accelerator_type}",
               f"--version={args.version or default_runtime(args.accelerator_type)}")
    if args.spot:
        cmd.append("--spot")
    return [cmd]


def setup(args: argparse.Namespace) -> list[Command]:
    # The committed tree (git archive), not the working copy: no virtualenvs, runs or caches
    # travel, and every worker gets byte-identical code.
    local = f"/tmp/{TARBALL}"
    install = " && ".join([
        f"mkdir -p {REMOTE_REPO}",
        f"tar -xzf ~/{TARBALL} -C {REMOTE_REPO}",
        f"python3 -m venv {REMOTE_VENV}",
        f"{REMOTE_VENV}/bin/pip install -q --upgrade pip",
        f"{REMOTE_VENV}/bin/pip install -q 'jax[tpu]' -e {REMOTE_REPO}",
        # Every worker must see every chip of the slice, or the run would hang later.
        f"{REMOTE_VENV}/bin/python -c 'import jax; print(jax.process_index(), "
        "jax.local_device_count(), jax.device_count())'",
    ])
    return [
        ["git", "-C", str(args.repo), "archive", "--format=tar.gz", f"--output={local}", "HEAD"],
        _tpu(args, "scp", local, f"{args.name}:~/{TARBALL}", "--worker=all"),
        _ssh(args, install),
    ]


def place(args: argparse.Namespace) -> list[Command]:
    commands = [_ssh(args, f"mkdir -p {args.dest}")]
    for src in args.src:
        if src.startswith("gs://"):
            # Each worker pulls from Cloud Storage itself: parallel, and no laptop upload.
            commands.append(_ssh(args, f"gcloud storage cp -r {shlex.quote(src)} {args.dest}/"))
        else:
            commands.append(_tpu(args, "scp", "--recurse", src, f"{args.name}:{args.dest}/",
                                 "--worker=all"))
    return commands


def launch(args: argparse.Namespace) -> list[Command]:
    sets = list(args.set)
    if args.mesh_data:
        sets.append(f"mesh.data={args.mesh_data}")
    if args.mesh_model:
        sets.append(f"mesh.model={args.mesh_model}")
    run = ["run", args.config, "--out", args.out]
    for item in sets:
        run += ["--set", item]
    # The venv path stays unquoted so that the remote shell expands its "~".
    remote = f"cd {REMOTE_REPO} && {REMOTE_VENV}/bin/steer-jax {shlex.join(run)}"
    if args.coordinator:
        # Each worker learns its own index from the TPU VM metadata server; the same command
        # line then serves every worker.
        worker_id = ("$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/"
                     "computeMetadata/v1/instance/attributes/agent-worker-number)")
        remote += (f" --set distributed.coordinator={shlex.quote(args.coordinator)}"
                   f" --set distributed.num_processes={args.workers}"
                   f" --set distributed.process_id={worker_id}")
    elif args.workers > 1:
        # A pod slice: JAX reads coordinator, process count and index from the TPU environment.
        remote += " --set distributed.auto=true"
    return [_ssh(args, remote)]


def collect(args: argparse.Namespace) -> list[Command]:
    # Worker 0 is process 0, the one that writes the run directory.
    dest = args.dest or f"runs/{args.name}"
    return [["mkdir", "-p", dest],
            _tpu(args, "scp", "--recurse", f"{args.name}:{REMOTE_REPO}/{args.out}",
                 f"{dest}/", "--worker=0")]


def delete(args: argparse.Namespace) -> list[Command]:
    return [_tpu(args, "delete", args.name, "--quiet")]


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="action", required=True)

    def add(name: str, fn, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.set_defaults(fn=fn)
        p.add_argument("--name", required=True, help="TPU VM (or pod slice) name")
        p.add_argument("--zone", required=True, help="e.g. us-west4-a (v5e), us-central2-b (v4)")
        p.add_argument("--project", help="GCP project; default: gcloud's configured one")
        p.add_argument("--dry-run", action="store_true",
                       help="print the commands, run nothing (gcloud not needed)")
        return p

    p = add("create", create, "create a TPU VM or pod slice")
    p.add_argument("--accelerator-type", required=True, help="e.g. v5litepod-8, v4-32")
    p.add_argument("--version", help="runtime image; default by TPU generation")
    p.add_argument("--spot", action="store_true", help="a preemptible (spot) slice")

    p = add("setup", setup, "install jax[tpu] and this repository on every worker")
    p.add_argument("--repo", default=REPO, type=Path, help="local git checkout to ship (HEAD)")

    p = add("place", place, "copy checkpoints to every worker")
    p.add_argument("--src", action="append", required=True,
                   help="gs:// path or local directory; repeat for each checkpoint")
    p.add_argument("--dest", default="ckpt", help="directory on the workers (relative to ~)")

    p = add("launch", launch, "run a config on every worker")
    p.add_argument("--config", required=True, help="YAML config, relative to the repository")
    p.add_argument("--out", required=True, help="run directory, relative to the repository")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, passed to steer-jax run; repeatable")
    p.add_argument("--workers", type=int, default=1,
                   help="hosts in the slice (v5litepod-8: 1, v4-32: 4)")
    p.add_argument("--coordinator", help="HOST:PORT of worker 0 (default: TPU environment)")
    p.add_argument("--mesh-data", type=int,
                   help="mesh.data (default: all of a worker's chips); data x model = one "
                   "worker's chip count: each worker runs its waves on its own chips")
    p.add_argument("--mesh-model", type=int, help="mesh.model (default: 1)")

    p = add("collect", collect, "copy a run directory back from worker 0")
    p.add_argument("--out", required=True, help="run directory on the workers, as in launch")
    p.add_argument("--dest", help="local directory (default: runs/NAME)")

    add("delete", delete, "delete the TPU VM or pod slice")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "workers", 1) < 1:
        raise SystemExit(f"--workers must be >= 1, got {args.workers}")
    for cmd in args.fn(args):
        print(shlex.join(cmd), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
