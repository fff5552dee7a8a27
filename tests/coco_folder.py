"""A folder of shapes scenes with COCO-format boxes, as evaluate.py reads one (test_evaluate*.py)."""

import json
from pathlib import Path

from utils.shapes_world import SHAPES, generate_scene


def write_coco_folder(folder: Path, seeds: list[int]) -> tuple[Path, Path]:
    """Scenes as PNGs plus one corrupt file, and a COCO-format annotation file beside the folder."""
    images = folder / "images"
    images.mkdir()
    categories = [{"id": index + 1, "name": shape} for index, shape in enumerate(SHAPES)]
    coco = {"images": [], "annotations": [], "categories": categories}
    for image_id, seed in enumerate(seeds):
        scene = generate_scene(seed)
        name = f"scene_{seed}.png"
        scene.image.save(images / name)
        coco["images"].append({"id": image_id, "file_name": name, "width": 128, "height": 128})
        for item in scene.objects:
            x0, y0, x1, y1 = item.box
            coco["annotations"].append({
                "id": len(coco["annotations"]), "image_id": image_id,
                "category_id": SHAPES.index(item.shape) + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
            })  # fmt: skip
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    annotations = folder / "annotations.json"
    annotations.write_text(json.dumps(coco))
    return images, annotations
