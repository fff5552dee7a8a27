"""bench/faithfulness.py refuses a scene range outside the held-out seeds with one clear message."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from utils.shapes_world import EVAL_SEEDS

BENCH = Path(__file__).resolve().parents[1] / "bench" / "faithfulness.py"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--seed", str(len(EVAL_SEEDS))], f"--seed must be from 0 to {len(EVAL_SEEDS) - 1}"),
        (["--seed", "-1"], "--seed must be from 0"),
        (["--seed", str(len(EVAL_SEEDS) - 5), "--scenes", "10"], "use at most --scenes 5 from this seed"),
        (["--scenes", "0"], "--scenes must be at least 1"),
    ],
)
def test_a_scene_range_outside_the_held_out_seeds_gets_a_usage_message(arguments, message):
    """Checked before any model loads: an exit status of 2 and the reason, no traceback."""
    done = subprocess.run(
        [sys.executable, str(BENCH), *arguments], capture_output=True, text=True, timeout=120,
        cwd=BENCH.parents[1], env={**os.environ, "PYTHONPATH": str(BENCH.parents[1]), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
