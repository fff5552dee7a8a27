"""Shapes world: determinism, geometry, captions, vocabulary and distractors."""

import hashlib

import numpy as np
import pytest

from utils.shapes_world import (
    COLOUR_RGB,
    COLOURS,
    EMPTY_CAPTION,
    EVAL_SEEDS,
    NEXT_WORDS,
    SHAPES,
    TRAIN_SEED_START,
    VARIED_SIDE_RANGE,
    VOCABULARY_WORDS,
    Scene,
    SceneObject,
    caption_distractors,
    describe_objects,
    generate_scene,
    generate_varied_scene,
    grammar_forced,
    object_size_range,
    remove_object,
    varied_scene_size,
)

SEEDS = range(300)


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    """The first 300 held-out scenes at 128 px."""
    return [generate_scene(seed) for seed in SEEDS]


def test_same_seed_gives_identical_bytes_and_different_seeds_differ():
    first, again, other = generate_scene(7), generate_scene(7), generate_scene(8)
    assert first.image.tobytes() == again.image.tobytes()
    assert (first.caption, first.objects, first.background) == (again.caption, again.objects, again.background)
    assert first.image.tobytes() != other.image.tobytes()


def test_image_is_rgb_of_requested_size():
    scene = generate_scene(3, image_size=96)
    assert scene.image.mode == "RGB"
    assert scene.image.size == (96, 96)


# sha256 over the first 50 held-out 128 px scenes (image bytes, caption, objects, background),
# computed before scenes gained a (width, height): the bundled BLIP demo was trained and is
# measured on exactly these pictures.
SQUARE_SCENES_SHA256 = "f154521297bb33457ffbef5e4c51cfd658f67e5d6eb7314f212d8849646c70c3"


def test_square_scenes_are_those_the_blip_demo_was_trained_on():
    digest = hashlib.sha256()
    for seed in range(50):
        scene = generate_scene(seed)
        digest.update(scene.image.tobytes())
        digest.update(repr((scene.caption, scene.objects, scene.background)).encode())
    assert digest.hexdigest() == SQUARE_SCENES_SHA256


def test_a_width_height_pair_gives_that_image_and_a_square_pair_the_square_scene():
    wide = generate_scene(5, (160, 100))
    assert wide.image.size == (160, 100)
    square = generate_scene(5, (128, 128))
    assert square.image.tobytes() == generate_scene(5).image.tobytes()
    with pytest.raises(ValueError, match="at least 32"):
        generate_scene(5, (160, 20))


def test_a_size_floor_draws_only_the_larger_objects_and_zero_is_the_world_itself():
    smallest, largest = object_size_range(96)
    assert (smallest, largest) == (12, 30)
    assert object_size_range(96, 0.5) == (21, 30)
    assert object_size_range(96, 1.0) == (30, 30)
    sides = [item.box[2] - item.box[0] for seed in SEEDS for item in generate_scene(seed, 96, 0.5).objects]
    assert min(sides) == 21 and max(sides) == 30
    assert any(item.box[2] - item.box[0] < 21 for seed in SEEDS for item in generate_scene(seed, 96).objects)
    assert generate_scene(5, 96, 0.0).image.tobytes() == generate_scene(5, 96).image.tobytes()


@pytest.fixture(scope="module")
def varied_scenes() -> list[Scene]:
    """The first 300 held-out scenes of varied size."""
    return [generate_varied_scene(seed) for seed in SEEDS]


def test_varied_sizes_cover_the_side_range_in_both_orientations(varied_scenes):
    sizes = np.array([scene.image.size for scene in varied_scenes])  # (scenes, 2)
    smallest, largest = VARIED_SIDE_RANGE
    assert sizes.min() >= smallest and sizes.max() <= largest
    assert sizes.min() < smallest + 10 and sizes.max() > largest - 10
    assert (sizes[:, 0] > 1.3 * sizes[:, 1]).any() and (sizes[:, 1] > 1.3 * sizes[:, 0]).any()
    assert [tuple(size) for size in sizes[:5]] == [varied_scene_size(seed) for seed in SEEDS[:5]]


@pytest.mark.parametrize("world", ["square", "varied"])
def test_objects_lie_inside_the_image_and_do_not_overlap(world, request):
    scenes = request.getfixturevalue("scenes" if world == "square" else "varied_scenes")
    for scene in scenes:
        width, height = scene.image.size
        for index, item in enumerate(scene.objects):
            x0, y0, x1, y1 = item.box
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            for other in scene.objects[index + 1 :]:
                ox0, oy0, ox1, oy1 = other.box
                assert x1 <= ox0 or ox1 <= x0 or y1 <= oy0 or oy1 <= y0


@pytest.mark.parametrize("world", ["square", "varied"])
def test_caption_names_objects_left_to_right(world, request):
    for scene in request.getfixturevalue("scenes" if world == "square" else "varied_scenes"):
        centres = [item.box[0] + item.box[2] for item in scene.objects]
        assert centres == sorted(centres)
        expected = " and ".join(f"a {item.colour} {item.shape}" for item in scene.objects)
        assert scene.caption == (expected or EMPTY_CAPTION)


def test_caption_words_are_in_the_vocabulary(scenes):
    words = {word for scene in scenes for word in scene.caption.split()}
    assert words <= set(VOCABULARY_WORDS)
    assert set(COLOURS) | set(SHAPES) <= words


def test_every_object_count_occurs_with_a_good_share_of_empty_scenes(scenes):
    counts = np.bincount([len(scene.objects) for scene in scenes], minlength=4)
    assert all(counts > 0)
    assert 0.05 <= counts[0] / len(scenes) <= 0.25
    assert all(scene.caption == EMPTY_CAPTION for scene in scenes if not scene.objects)


def test_objects_are_drawn_in_their_colour_on_the_background():
    scene = next(generate_scene(seed) for seed in EVAL_SEEDS if len(generate_scene(seed).objects) == 1)
    pixels = np.asarray(scene.image, dtype=np.int16)  # (H, W, 3)
    x0, y0, x1, y1 = scene.objects[0].box
    centre = pixels[(y0 + y1) // 2 + 2, (x0 + x1) // 2]
    expected = np.asarray(COLOUR_RGB[scene.objects[0].colour])
    assert np.abs(centre - expected).max() <= 30  # colour jitter 20 + noise 6
    assert np.abs(centre - np.asarray(scene.background)).max() > 60


def test_remove_object_paints_background_and_drops_its_words():
    scene = next(generate_scene(seed) for seed in EVAL_SEEDS if len(generate_scene(seed).objects) == 2)
    removed = remove_object(scene, 0)
    x0, y0, x1, y1 = scene.objects[0].box
    box_pixels = np.asarray(removed.image)[y0:y1, x0:x1]
    assert (box_pixels == np.asarray(scene.background, dtype=np.uint8)).all()
    assert removed.caption == f"a {scene.objects[1].colour} {scene.objects[1].shape}"
    assert np.asarray(scene.image)[y0:y1, x0:x1].tobytes() != box_pixels.tobytes()  # input untouched


def test_describe_objects_orders_by_box_centre():
    right = SceneObject("square", "blue", (80, 10, 100, 30))
    left = SceneObject("circle", "red", (5, 90, 25, 110))
    assert describe_objects((right, left)) == "a red circle and a blue square"
    assert describe_objects(()) == EMPTY_CAPTION


@pytest.mark.parametrize("object_count", [0, 1, 2, 3])
def test_distractors_are_distinct_wrong_and_close(scenes, object_count):
    scene = next(scene for scene in scenes if len(scene.objects) == object_count)
    distractors = caption_distractors(scene, 9, np.random.default_rng(0))
    assert len(distractors) == len(set(distractors)) == 9
    assert scene.caption not in distractors
    for text in distractors:
        assert set(text.split()) <= set(VOCABULARY_WORDS)
        if object_count:
            changed = sum(a != b for a, b in zip(text.split(), scene.caption.split(), strict=True))
            assert 1 <= changed <= 2


def test_one_object_scene_uses_all_five_one_word_changes_first(scenes):
    scene = next(scene for scene in scenes if len(scene.objects) == 1)
    distractors = caption_distractors(scene, 9, np.random.default_rng(1))
    changes = [sum(a != b for a, b in zip(text.split(), scene.caption.split(), strict=True)) for text in distractors]
    assert sorted(changes) == [1] * 5 + [2] * 4


def test_distractors_raise_when_too_many_are_requested(scenes):
    scene = next(scene for scene in scenes if len(scene.objects) == 1)
    with pytest.raises(ValueError):
        caption_distractors(scene, 12, np.random.default_rng(0))


def test_training_seeds_are_disjoint_from_evaluation_seeds():
    assert EVAL_SEEDS.stop <= TRAIN_SEED_START


def test_the_caption_grammar_is_exactly_the_word_pairs_the_world_writes():
    """Every pair of neighbouring words (with the start None and the end "") over 2,000 scenes is
    in NEXT_WORDS, and every pair NEXT_WORDS allows occurs."""
    written = set()
    for seed in EVAL_SEEDS[:2000]:
        words = [None, *generate_scene(seed).caption.split(), ""]
        written |= set(zip(words[:-1], words[1:], strict=True))
    allowed = {(word, following) for word, followers in NEXT_WORDS.items() for following in followers}
    assert written == allowed


def test_only_the_words_the_grammar_leaves_no_choice_for_are_forced():
    caption = "a red circle and a blue square"
    assert grammar_forced(caption.split()) == [False, False, False, False, True, False, False]
    assert grammar_forced(EMPTY_CAPTION.split()) == [False, True, True]
    # A garbled caption: nothing after an unknown word is forced, and "a" after a shape is not.
    assert grammar_forced(["a", "red", "circle", "a", "and", "a"]) == [False, False, False, False, False, True]
    assert grammar_forced(["a", "purple", "a"]) == [False, False, False]
