"""The child side of math_grading's isolated verifier: JSON (reference, candidate) lines in,
one JSON boolean per line out. It runs math-verify in its own main thread, where SIGALRM works."""

from __future__ import annotations

import json
import sys

from steer_jax.eval.math_grading import TIMEOUT_S, _symbolic_equal


def main() -> None:
    print("ready", flush=True)
    for line in sys.stdin:
        reference, candidate = json.loads(line)
        print(json.dumps(_symbolic_equal(reference, candidate, TIMEOUT_S)), flush=True)


if __name__ == "__main__":
    main()
