"""evaluate.py end to end on the bundled shapes demo: CSV, summary, plots, bad files, resuming;
the measuring pipeline it shares with the shapes benchmark (models.evaluation)."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

import evaluate
from models.analysis import word_evidence, word_scorer
from models.blip_explainer import BlipExplainer
from models.evaluation import MeasureSettings, measure_image, measure_shapes_scenes
from tests.coco_folder import write_coco_folder
from tests.tiny_families import TINY_FAMILIES, save_family
from utils.metrics import curves_by_order, patch_order
from utils.shapes_world import EVAL_SEEDS, SHAPES, generate_scene

DEMO_WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "shapes_demo" / "blip" / "model.safetensors"
SCENE_COUNT = 4
# Far from the seeds other tests use; scenes are picked from here on (see ``scene_seeds``).
FIRST_SEED = 3000
STEPS = "8"


@pytest.fixture(scope="module")
def demo_blip() -> BlipExplainer:
    if not DEMO_WEIGHTS.is_file():
        pytest.fail(f"The bundled shapes demo is missing ({DEMO_WEIGHTS}); it is committed with the repository.")
    return BlipExplainer.from_pretrained("shapes-demo", device="cpu")


@pytest.fixture(scope="module")
def scene_seeds(demo_blip) -> list[int]:
    """Scenes with objects of distinct shapes that the demo captions exactly.

    Distinct shapes make a COCO category name one object, as the benchmark's word-to-object
    mapping does, so both pointing games must agree word for word.
    """
    seeds = []
    for seed in EVAL_SEEDS[FIRST_SEED:]:
        scene = generate_scene(seed)
        shapes = [item.shape for item in scene.objects]
        if shapes and len(set(shapes)) == len(shapes) and demo_blip.caption(scene.image).text == scene.caption:
            seeds.append(seed)
        if len(seeds) == SCENE_COUNT:
            return seeds
    raise AssertionError("not enough exactly captioned scenes")


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory, scene_seeds):
    """(arguments, output folder) of one finished run."""
    folder = tmp_path_factory.mktemp("coco")
    images, annotations = write_coco_folder(folder, scene_seeds)
    out = folder / "out"
    arguments = ["--model", "shapes-demo", "--images", str(images), "--annotations", str(annotations),
                 "--out", str(out), "--steps", STEPS, "--device", "cpu"]  # fmt: skip
    assert evaluate.main(arguments) == 0
    return arguments, out


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_csv_has_a_row_per_content_word(evaluation, scene_seeds):
    _, out = evaluation
    rows = read_csv(out / evaluate.CSV_NAME)
    assert tuple(rows[0]) == evaluate.CSV_COLUMNS
    expected = sorted(
        (f"scene_{seed}.png", word)
        for seed in scene_seeds
        for item in generate_scene(seed).objects
        for word in (item.colour, item.shape)
    )
    assert sorted((row["image"], row["word"]) for row in rows) == expected
    for row in rows:
        assert 0 < float(row["probability"]) <= 1
        assert 0 <= float(row["removal_share"]) <= 1
        assert math.isfinite(float(row["deletion_auc"])) and math.isfinite(float(row["random_deletion_auc"]))
        # Only shape words name a COCO category, so only they get a pointing game.
        assert (row["pointing_game"] != "") == (row["word"] in SHAPES) == (row["category"] == row["word"])


def test_summary_reports_categories_bad_files_and_plots(evaluation):
    _, out = evaluation
    summary = json.loads((out / evaluate.SUMMARY_NAME).read_text())
    assert summary["images_evaluated"] == SCENE_COUNT
    assert [skip["image"] for skip in summary["skipped_images"]] == ["corrupt.png"]
    (layer,) = summary["per_layer"].values()
    assert set(layer["pointing_game_by_category"]) <= set(SHAPES)
    assert layer["pointing_game_by_category"]
    assert all(0 <= value <= 1 for value in layer["pointing_game_by_category"].values())
    assert layer["words"] == len(read_csv(out / evaluate.CSV_NAME))
    assert (out / "curves.png").stat().st_size > 0
    assert (out / "pointing_game.png").stat().st_size > 0


def test_second_run_skips_finished_images(evaluation):
    arguments, out = evaluation
    rows_before = (out / evaluate.CSV_NAME).read_text()
    assert evaluate.main(arguments) == 0
    summary = json.loads((out / evaluate.SUMMARY_NAME).read_text())
    assert summary["images_resumed"] == SCENE_COUNT
    assert (out / evaluate.CSV_NAME).read_text() == rows_before
    assert [skip["image"] for skip in summary["skipped_images"]] == ["corrupt.png"]


def test_pointing_game_agrees_with_the_shapes_benchmark(evaluation, demo_blip, scene_seeds):
    _, out = evaluation
    summary = json.loads((out / evaluate.SUMMARY_NAME).read_text())
    (layer_name,) = summary["per_layer"]
    benchmark = measure_shapes_scenes(
        demo_blip, None, scene_seeds, methods=(BlipExplainer.default_method,), steps=4, sanity_scenes=0
    )
    assert benchmark["caption_exact"] == 1.0
    assert summary["per_layer"][layer_name]["pointing_game"] == pytest.approx(
        benchmark["per_layer"][BlipExplainer.default_method][layer_name]["pointing_game_shape"]
    )


def test_content_words_skip_stop_words(demo_blip):
    caption = demo_blip.caption_from_ids(
        [demo_blip.model.config.text_config.bos_token_id]
        + demo_blip.processor.tokenizer("a red circle and a blue square").input_ids[1:]
    )
    words = [caption.words[index].text for index in evaluate.selected_word_indices(caption, None)]
    assert words == ["red", "circle", "blue", "square"]
    only_red = evaluate.selected_word_indices(caption, ["Red"])
    assert [caption.words[index].text for index in only_red] == ["red"]
    assert evaluate.category_of("puppy", ["person", "dog"]) == "dog"
    assert evaluate.category_of("grass", ["person", "dog"]) is None


def test_each_map_is_scored_on_its_own_word(demo_blip, scene_seeds):
    """The shared pipeline scores all maps in one stream for all words; each curve must be the
    one a scorer of that word alone gives for that map's patch order."""
    scene = generate_scene(scene_seeds[0])
    caption = demo_blip.caption(scene.image)
    indices = evaluate.selected_word_indices(caption, None)
    method = BlipExplainer.default_method
    settings = MeasureSettings(fill="mean", steps=4, insertion=True)
    scores = measure_image(demo_blip, scene.image, caption, indices, [[]] * len(indices), [method], settings)
    word_maps = demo_blip.explain(scene.image, caption, indices, method)
    layer_names = demo_blip.layer_names(method)
    assert len(scores.maps) == len(indices) * len(layer_names)
    for map_scores in scores.maps:
        index = indices[map_scores.slot]
        assert map_scores.word == caption.words[index].text
        assert map_scores.pointing_game is None and map_scores.box_mass is None and map_scores.removal is None
        cam_patches = word_maps[map_scores.slot].cam_patches[layer_names.index(map_scores.layer_name)]
        one_word = word_scorer(demo_blip, caption, [index])
        for curve in (map_scores.deletion, map_scores.insertion):
            (expected,) = curves_by_order(
                scene.image, demo_blip.image_geometry(scene.image.size), [patch_order(cam_patches)], one_word,
                direction=curve.direction,
                fill="mean", steps=4,
            )  # fmt: skip
            np.testing.assert_allclose(curve.scores, expected.scores[:, 0], rtol=1e-6)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_evaluate_runs_on_a_family_folder(family, tmp_path, scene_seeds):
    model = save_family(family, tmp_path / family)
    images, annotations = write_coco_folder(tmp_path, scene_seeds[:2])
    out = tmp_path / "out"
    arguments = ["--model", str(model), "--images", str(images), "--annotations", str(annotations),
                 "--out", str(out), "--steps", "4", "--device", "cpu"]  # fmt: skip
    assert evaluate.main(arguments) == 0
    rows = [row for path in out.glob("*.csv") for row in read_csv(path)]
    assert rows, "the answers' words were measured"
    # The word's own probability, whatever the family's default map explains (a decoder-only
    # family's contrasts each word with its runner-up: exp of that is no probability).
    assert all(0 < float(row["probability"]) <= 1 for row in rows)


def test_each_row_carries_its_words_visual_reliance(evaluation, demo_blip, scene_seeds):
    """The CSV's visual_reliance is word_evidence's number for that word of that image's caption."""
    _, out = evaluation
    rows = read_csv(out / evaluate.CSV_NAME)
    seed = scene_seeds[0]
    scene = generate_scene(seed)
    caption = demo_blip.caption(scene.image)
    evidence = word_evidence(demo_blip, scene.image, caption)
    reliance = dict(zip((word.text for word in caption.words), evidence.reliance, strict=True))
    image_rows = [row for row in rows if row["image"] == f"scene_{seed}.png"]
    assert image_rows
    for row in image_rows:
        assert float(row["visual_reliance"]) == pytest.approx(float(reliance[row["word"]]), abs=1e-5)


def test_a_folder_without_a_word_to_measure_finishes_with_an_empty_table(tmp_path, demo_blip):
    images = tmp_path / "images"
    images.mkdir()
    generate_scene(0).image.save(images / "scene.png")
    out = tmp_path / "out"
    arguments = ["--model", "shapes-demo", "--images", str(images), "--out", str(out), "--words", "zebra",
                 "--steps", "4", "--device", "cpu"]  # fmt: skip
    assert evaluate.main(arguments) == 0
    summary = json.loads((out / evaluate.SUMMARY_NAME).read_text())
    assert summary["words_evaluated"] == 0 and summary["skipped_images"] == []
    assert not (out / "curves.png").exists()
