"""Images per second of evaluate.py: the sequential path beside Ray Data with 1 and 2 workers.

The same generated shapes scenes are evaluated in three ways, each into a fresh output folder,
with one torch thread per process: sequentially, and with ``--engine ray --workers 1`` and
``--workers 2`` on a local Ray instance of --cpus CPUs that is started once beforehand (as a
cluster's head node is already running). Each run's time is evaluate.main's wall clock, model
loading included (in every Ray worker, in parallel); the ``busy`` throughput leaves out startup:
images over the seconds the workers spent on them.

The three ways take turns, --repeats times, each round starting with the next one, and each is
scored by its median round: two one-round runs on this machine timed the same sequential run at
127 s and at 81 s, so one round of each can rank them by the machine's mood, not their speed.

    python bench/scale.py --json bench/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import ray

import evaluate
from utils.shapes_world import EVAL_SEEDS, generate_scene

RUNS = {
    "sequential": (),
    "ray_1_worker": ("--engine", "ray", "--workers", "1"),
    "ray_2_workers": ("--engine", "ray", "--workers", "2"),
}


def write_scenes(folder: Path, count: int, first_seed: int) -> None:
    """``count`` shapes scenes as PNGs (EVAL_SEEDS from ``first_seed`` on)."""
    folder.mkdir(parents=True)
    for seed in EVAL_SEEDS[first_seed : first_seed + count]:
        generate_scene(seed).image.save(folder / f"scene_{seed}.png")


def timed_run(images: Path, out: Path, options: tuple[str, ...], steps: int | None) -> dict:
    """Wall-clock seconds of one evaluate.main run and its images per second, overall and busy."""
    arguments = ["--model", "shapes-demo", "--images", str(images), "--out", str(out), "--device", "cpu",
                 "--threads", "1", *(("--steps", str(steps)) if steps else ()), *options]  # fmt: skip
    started = time.perf_counter()
    if evaluate.main(arguments) != 0:
        raise SystemExit(f"evaluate.py {' '.join(arguments)} failed")
    seconds = time.perf_counter() - started
    summary = json.loads((out / evaluate.SUMMARY_NAME).read_text())
    workers = summary["workers"].values()
    # Workers run side by side: the busiest one's seconds bound the evaluation without startup.
    busiest = max(load["seconds"] for load in workers)
    return {
        "images": summary["images_evaluated"],
        "words": summary["words_evaluated"],
        "seconds": round(seconds, 2),
        "images_per_s": round(summary["images_evaluated"] / seconds, 4),
        "busy_images_per_s": round(sum(load["images"] for load in workers) / busiest, 4),
        "workers": summary["workers"],
    }


def median_run(rounds: list[dict]) -> dict:
    """The round whose images/s is the median (the lower middle one of an even count)."""
    return sorted(rounds, key=lambda run: run["images_per_s"])[(len(rounds) - 1) // 2]


def print_table(results: dict) -> None:
    """One row per way, its median round: images/s overall and without startup, each as a ratio
    to sequential, and the seconds of every round."""
    medians = {name: median_run(rounds) for name, rounds in results["runs"].items()}
    sequential = medians["sequential"]
    print(f"\n{results['scenes']} scenes, {results['cpus']} CPUs, one torch thread per process, "
          f"median of {results['repeats']} rounds")  # fmt: skip
    print(f"{'run':15s} {'seconds':>8s} {'images/s':>9s} {'x seq':>6s} {'busy images/s':>14s} {'x seq':>6s}  "
          "rounds (s)")  # fmt: skip
    for name, run in medians.items():
        ratio = run["images_per_s"] / sequential["images_per_s"]
        busy_ratio = run["busy_images_per_s"] / sequential["busy_images_per_s"]
        rounds = ", ".join(f"{each['seconds']:.0f}" for each in results["runs"][name])
        print(f"{name:15s} {run['seconds']:8.1f} {run['images_per_s']:9.3f} {ratio:6.2f} "
              f"{run['busy_images_per_s']:14.3f} {busy_ratio:6.2f}  {rounds}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0, help="first index into EVAL_SEEDS")
    parser.add_argument("--steps", type=int, help="curve steps (default: evaluate.py's)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the three ways, taking turns")
    parser.add_argument("--json", type=Path, help="write the results here")
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory() as temporary:
        images = Path(temporary) / "images"
        write_scenes(images, arguments.scenes, arguments.seed)
        ray.init(num_cpus=arguments.cpus, include_dashboard=False)
        runs = {name: [] for name in RUNS}
        names = list(RUNS)
        try:
            for round_index in range(arguments.repeats):
                for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
                    out = Path(temporary) / f"{name}_{round_index}"
                    runs[name].append(timed_run(images, out, RUNS[name], arguments.steps))
        finally:
            ray.shutdown()
    medians = {name: median_run(rounds)["images_per_s"] for name, rounds in runs.items()}
    results = {
        "command": " ".join(["python", "bench/scale.py", *sys.argv[1:]]),
        "scenes": arguments.scenes,
        "cpus": arguments.cpus,
        "repeats": arguments.repeats,
        **{f"{name}_images_per_s": value for name, value in medians.items()},
        "ray_1_worker_vs_sequential": round(medians["ray_1_worker"] / medians["sequential"], 3),
        "ray_2_workers_vs_sequential": round(medians["ray_2_workers"] / medians["sequential"], 3),
        "runs": runs,
    }
    print_table(results)
    if arguments.json:
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        arguments.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
