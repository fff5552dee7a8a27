"""Write the app's example scenes to media/examples/ (held-out seeds, never seen in training).

    python scripts/make_examples.py
"""

from __future__ import annotations

from pathlib import Path

from utils.shapes_world import EVAL_SEEDS, generate_scene

ROOT = Path(__file__).resolve().parents[1]

# Seeds from the held-out range, chosen to show scenes with 0, 1, 2 and 3 objects.
EXAMPLE_SEEDS = (EVAL_SEEDS[-1], EVAL_SEEDS[-2], EVAL_SEEDS[-3], EVAL_SEEDS[-4], EVAL_SEEDS[-5], EVAL_SEEDS[-6])


def main() -> None:
    folder = ROOT / "media" / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    for seed in EXAMPLE_SEEDS:
        scene = generate_scene(seed)
        name = f"scene_{seed}_{scene.caption.replace(' ', '-')}.png"
        scene.image.save(folder / name)
        print(folder / name)


if __name__ == "__main__":
    main()
