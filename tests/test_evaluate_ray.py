"""evaluate.py --engine ray on a local two-CPU Ray cluster with the bundled shapes demo: the same rows
as the sequential run, resuming, bad files, a killed worker; and that the sequential run never
imports Ray."""

import csv
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray

import evaluate
from models.loading import ModelUnavailableError
from tests.coco_folder import write_coco_folder
from utils.shapes_world import EVAL_SEEDS

REPO = Path(__file__).resolve().parents[1]
# Eight scenes (plus the corrupt file): few enough to keep the Ray runs short, enough that a worker
# killed after the first image leaves images not yet handed out. Far from other tests' seeds.
SCENE_SEEDS = EVAL_SEEDS[3100:3108]
WORKERS = 2
KEY_COLUMNS = ("image", "word", "layer", "method", "category")
WAIT_S = 120


def evaluate_arguments(images: Path, annotations: Path, out: Path, *engine: str) -> list[str]:
    return ["--model", "shapes-demo", "--images", str(images), "--annotations", str(annotations), "--out", str(out),
            "--steps", "4", "--random-orders", "2", "--device", "cpu", "--threads", "1", *engine]  # fmt: skip


def ray_arguments(images: Path, annotations: Path, out: Path) -> list[str]:
    return evaluate_arguments(images, annotations, out, "--engine", "ray", "--workers", str(WORKERS))


def read_rows(out: Path) -> list[dict]:
    """The CSV's rows, sorted by their key columns and then their numbers.

    A caption can name a word twice ("a red circle and a red square"), so the key columns alone
    do not tell rows apart; sorted this way, equal runs give equal lists whatever the finish order.
    """
    with (out / evaluate.CSV_NAME).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    numbers = evaluate.NUMERIC_COLUMNS
    return sorted(rows, key=lambda row: ([row[column] for column in KEY_COLUMNS], [row[column] for column in numbers]))


def assert_same_rows(out: Path, expected: list[dict]) -> None:
    """The same rows, each as often (no image written twice or lost), numbers within 1e-6."""
    rows = read_rows(out)
    keys = [[row[column] for column in KEY_COLUMNS] for row in rows]
    assert keys == [[row[column] for column in KEY_COLUMNS] for row in expected]
    for row, expected_row in zip(rows, expected, strict=True):
        for column in evaluate.NUMERIC_COLUMNS:
            if expected_row[column] == "":
                assert row[column] == "", (row, column)
            else:
                assert math.isclose(float(row[column]), float(expected_row[column]), rel_tol=1e-6, abs_tol=1e-6)


def descendant_pids() -> set[int]:
    """Live processes started (directly or not) by this test process, read from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        fields = process_stat(int(entry.name)) if entry.name.isdigit() else []
        if fields and fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (zombies count as gone)."""
    return {pid for pid in pids if is_running(pid)}


def process_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name ([] once the process is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def is_running(pid: int) -> bool:
    fields = process_stat(pid)
    return bool(fields) and fields[0] != "Z"


def cpu_ticks(pid: int) -> int:
    """CPU time a process has used so far (user + system, in clock ticks)."""
    fields = process_stat(pid)
    return int(fields[11]) + int(fields[12]) if fields else 0


def busy_worker(pids: list[int], deadline: float, interval_s: float = 0.3) -> int | None:
    """One of ``pids`` that kept a core at least half busy over ``interval_s`` (in the middle of
    an image, not between two), sampled until ``deadline``; None if none was."""
    needed_ticks = interval_s * os.sysconf("SC_CLK_TCK") / 2
    while time.monotonic() < deadline:
        before = {pid: cpu_ticks(pid) for pid in pids}
        time.sleep(interval_s)
        for pid in pids:
            if is_running(pid) and cpu_ticks(pid) - before[pid] >= needed_ticks:
                return pid
    return None


def images_written(out: Path) -> int:
    """Images with rows in the CSV so far (read while the run appends to it)."""
    lines = (out / evaluate.CSV_NAME).read_text().splitlines()[1:]
    return len({line.split(",", 1)[0] for line in lines})


def map_worker_pids() -> list[int]:
    """Processes of Ray Data's map workers (Ray titles them "ray::MapWorker(...)")."""
    pids = []
    for pid in descendant_pids():
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if title.startswith(b"ray::MapWorker"):
            pids.append(pid)
    return sorted(pids)


@pytest.fixture(scope="module")
def coco_folder(tmp_path_factory) -> tuple[Path, Path]:
    return write_coco_folder(tmp_path_factory.mktemp("coco"), SCENE_SEEDS)


@pytest.fixture(scope="module")
def sequential_out(coco_folder, tmp_path_factory) -> Path:
    """The sequential run's output folder, run in a fresh interpreter that must not import Ray."""
    out = tmp_path_factory.mktemp("sequential")
    program = (
        "import sys, evaluate\n"
        f"status = evaluate.main({evaluate_arguments(*coco_folder, out)!r})\n"
        "print('ray imported' if 'ray' in sys.modules else 'ray not imported')\n"
        "sys.exit(status)\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=environment, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ray not imported")
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    """A two-CPU Ray instance for the module; afterwards not one of its processes may be left."""
    ray.init(num_cpus=WORKERS, include_dashboard=False)
    yield
    # Taken before shutdown: a worker orphaned by it would no longer descend from this process.
    ray_processes = descendant_pids()
    ray.shutdown()
    deadline = time.monotonic() + 30
    while alive(ray_processes) | descendant_pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(ray_processes) | descendant_pids(), "Ray left processes behind"


def test_the_sequential_run_never_imports_ray(sequential_out):
    # The fixture ran the sequential engine in a fresh interpreter and checked sys.modules there.
    assert read_rows(sequential_out)


@pytest.mark.timeout(300)
def test_ray_resumes_skips_bad_files_and_writes_the_sequential_rows(ray_cluster, coco_folder, sequential_out, tmp_path):
    images, annotations = coco_folder
    expected = read_rows(sequential_out)
    # As if an earlier run had stopped after its first image: that image's rows are kept, not redone.
    first_image = expected[0]["image"]
    lines = (sequential_out / evaluate.CSV_NAME).read_bytes().splitlines(keepends=True)
    kept = b"".join([lines[0], *(line for line in lines[1:] if line.startswith(f"{first_image},".encode()))])
    (tmp_path / evaluate.CSV_NAME).write_bytes(kept)

    assert evaluate.main(ray_arguments(images, annotations, tmp_path)) == 0

    assert (tmp_path / evaluate.CSV_NAME).read_bytes().startswith(kept)
    assert_same_rows(tmp_path, expected)
    summary = json.loads((tmp_path / evaluate.SUMMARY_NAME).read_text())
    assert summary["images_resumed"] == 1
    assert summary["images_evaluated"] == len(SCENE_SEEDS)
    assert [skip["image"] for skip in summary["skipped_images"]] == ["corrupt.png"]
    assert "truncated or corrupt" in summary["skipped_images"][0]["reason"]
    assert sum(load["images"] for load in summary["workers"].values()) == len(SCENE_SEEDS) - 1
    sequential_summary = json.loads((sequential_out / evaluate.SUMMARY_NAME).read_text())
    assert summary["per_layer"].keys() == sequential_summary["per_layer"].keys()
    for layer, metrics in summary["per_layer"].items():
        expected_metrics = dict(sequential_summary["per_layer"][layer])
        by_category = expected_metrics.pop("pointing_game_by_category")
        assert metrics.pop("pointing_game_by_category") == pytest.approx(by_category, rel=1e-6)
        assert metrics == pytest.approx(expected_metrics, rel=1e-6)


@pytest.mark.timeout(300)
def test_a_worker_killed_mid_image_is_retried_and_every_row_is_written_once(
    ray_cluster, coco_folder, sequential_out, tmp_path
):
    images, annotations = coco_folder
    killed = []

    def kill_a_busy_worker_after_the_first_image() -> None:
        # Once an image's rows are written both workers hold the model; kill one in the middle of an image.
        deadline = time.monotonic() + WAIT_S
        while not (tmp_path / evaluate.CSV_NAME).is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = busy_worker(map_worker_pids(), deadline)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            killed.append((pid, images_written(tmp_path)))

    killer = threading.Thread(target=kill_a_busy_worker_after_the_first_image, daemon=True)
    killer.start()
    assert evaluate.main(ray_arguments(images, annotations, tmp_path)) == 0
    killer.join(WAIT_S)

    assert killed, "no map worker was found busy to kill"
    victim, images_before_the_kill = killed[0]
    # It died while some images were not even handed out yet (each worker holds at most one image,
    # and one result on its way back), and the image it was evaluating was redone: all rows are
    # there, each once.
    assert not is_running(victim)
    assert images_before_the_kill < len(SCENE_SEEDS) - 2 * WORKERS
    assert_same_rows(tmp_path, read_rows(sequential_out))
    summary = json.loads((tmp_path / evaluate.SUMMARY_NAME).read_text())
    assert summary["images_evaluated"] == len(SCENE_SEEDS)
    assert sum(load["images"] for load in summary["workers"].values()) == len(SCENE_SEEDS)


def test_ray_flags_need_the_ray_engine(capsys):
    for flags in (["--workers", "2"], ["--address", "auto"], ["--gpus-per-worker", "1"]):
        with pytest.raises(SystemExit):
            evaluate.parse_arguments(["--images", ".", "--out", "out", *flags])
        assert f"{flags[0]} needs --engine ray" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.parse_arguments(["--images", ".", "--out", "out", "--engine", "ray", "--workers", "0"])
    assert "--workers must be at least 1" in capsys.readouterr().err


def test_a_worker_whose_model_does_not_load_returns_the_one_line_reason(coco_folder, tmp_path):
    """In-process, without Ray: the error travels back as a result, not as a dead worker's traceback."""
    images, annotations = coco_folder
    arguments = evaluate.parse_arguments([*ray_arguments(images, annotations, tmp_path), "--method", "nonsense"])
    worker = evaluate.RayImageEvaluator(arguments, [])
    record = evaluate.ImageRecord("corrupt.png", images / "corrupt.png")
    (result,) = worker({"record": np.array([pickle.dumps(record)], dtype=object)})["result"]
    error = pickle.loads(result)
    assert isinstance(error, ModelUnavailableError)
    assert str(error).startswith("--method must be one of") and "cross_attention" in str(error)
