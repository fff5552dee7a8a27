"""Shapes world: seeded synthetic scenes whose objects, boxes and captions are known exactly.

Pure helpers (numpy + Pillow only). The bundled demo captioner and CLIP are trained on these
scenes, so an explanation can be checked against where each object really is.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
EMPTY_CAPTION = "an empty picture"
# Every word any caption can contain; objects are joined with "and" (no commas) so WordPiece
# encodes and decodes captions unchanged.
VOCABULARY_WORDS = ("a", "an", "and", "empty", "picture", *COLOURS, *SHAPES)

# Held-out evaluation scenes; training draws only from TRAIN_SEED_START upwards.
EVAL_SEEDS = range(100_000)
TRAIN_SEED_START = 1_000_000

MAX_OBJECTS = 3
# Probability of 0, 1, 2 and 3 objects: a good share of empty scenes teaches "nothing there".
OBJECT_COUNT_PROBABILITIES = (0.12, 0.28, 0.30, 0.30)
COLOUR_RGB = {
    "red": (215, 35, 35),
    "green": (30, 160, 50),
    "blue": (35, 65, 215),
    "yellow": (235, 195, 20),
}
COLOUR_JITTER = 20
NOISE_AMPLITUDE = 6
PLACEMENT_TRIES = 50
# Sides of the scenes of varied size and aspect ratio (the decoder-only demo's world), in pixels.
VARIED_SIDE_RANGE = (96, 192)


@dataclass(frozen=True)
class SceneObject:
    """One drawn object; box = (x0, y0, x1, y1) in image pixels, x1/y1 exclusive."""

    shape: str
    colour: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Scene:
    """An RGB image, its true caption, its objects (left to right) and the flat background RGB."""

    image: Image.Image
    caption: str
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]


def object_size_range(image_size: int, size_floor: float = 0.0) -> tuple[int, int]:
    """Smallest and largest object side in pixels for an image whose shorter side is `image_size` pixels.

    Args:
        size_floor: where in the world's range the smallest side starts, from 0 (the whole range)
            to 1 (the largest side only); a training curriculum raises it (held-out scenes use 0).
    """
    smallest, largest = max(4, image_size // 8), max(5, image_size * 5 // 16)
    return smallest + int((largest - smallest) * size_floor), largest


def image_dimensions(image_size: int | tuple[int, int]) -> tuple[int, int]:
    """(width, height) of a square side or of a (width, height) pair."""
    if isinstance(image_size, int):
        return image_size, image_size
    width, height = image_size
    return int(width), int(height)


def varied_scene_size(seed: int, side_range: tuple[int, int] = VARIED_SIDE_RANGE) -> tuple[int, int]:
    """(width, height) of the scene of varied size for `seed`: each side uniform in `side_range`
    (inclusive), drawn from its own stream so the scene's own draws stay those of `seed`."""
    width, height = np.random.default_rng([seed, 3]).integers(side_range[0], side_range[1] + 1, size=2)
    return int(width), int(height)


def generate_varied_scene(seed: int) -> Scene:
    """The scene for `seed` at its ``varied_scene_size``."""
    return generate_scene(seed, varied_scene_size(seed))


def describe_objects(objects: tuple[SceneObject, ...] | list[SceneObject]) -> str:
    """Caption naming `objects` left to right by box centre, e.g. 'a red circle and a blue square'."""
    if not objects:
        return EMPTY_CAPTION
    ordered = sorted(objects, key=lambda item: (item.box[0] + item.box[2], item.box[1] + item.box[3]))
    return " and ".join(f"a {item.colour} {item.shape}" for item in ordered)


def generate_scene(seed: int, image_size: int | tuple[int, int] = 128, size_floor: float = 0.0) -> Scene:
    """Draw the scene for `seed`; the same seed always gives identical image bytes.

    Args:
        seed: any non-negative int (EVAL_SEEDS for evaluation, >= TRAIN_SEED_START for training).
        image_size: side of a square RGB image, or its (width, height), in pixels (each >= 32).
        size_floor: raises the smallest object side (``object_size_range``); 0 is the world's own.
    """
    width, height = image_dimensions(image_size)
    if min(width, height) < 32:
        raise ValueError(f"scenes need sides of at least 32 pixels, not {width} x {height}")
    rng = np.random.default_rng(seed)
    object_count = int(rng.choice(MAX_OBJECTS + 1, p=OBJECT_COUNT_PROBABILITIES))
    background = random_background(rng)
    boxes = place_boxes(rng, object_count, (width, height), size_floor)
    objects = tuple(
        SceneObject(shape=str(rng.choice(SHAPES)), colour=str(rng.choice(COLOURS)), box=box)
        for box in sorted(boxes, key=lambda box: box[0] + box[2])
    )
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    for item in objects:
        draw_object(draw, item, jitter_colour(rng, COLOUR_RGB[item.colour]))
    return Scene(add_noise(rng, image), describe_objects(objects), objects, background)


def random_background(rng: np.random.Generator) -> tuple[int, int, int]:
    """Light grey or pastel tint, far from every object colour."""
    base = int(rng.integers(200, 246))
    tint = rng.integers(-12, 13, size=3)
    return tuple(int(value) for value in np.clip(base + tint, 185, 250))


def place_boxes(
    rng: np.random.Generator, count: int, image_size: tuple[int, int], size_floor: float = 0.0
) -> list[tuple[int, int, int, int]]:
    """Up to `count` square boxes inside a (width, height) image that neither overlap nor share
    a horizontal centre.

    Sizes, margin and centre gap scale with the shorter side; horizontal centres differ by at
    least shorter // 16 pixels so that "left to right" is never ambiguous; a box that cannot
    be placed after PLACEMENT_TRIES tries is dropped.
    """
    width, height = image_size
    shorter = min(width, height)
    smallest, largest = object_size_range(shorter, size_floor)
    margin = max(1, shorter // 64)
    centre_gap = max(1, shorter // 16)
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(count):
        for _ in range(PLACEMENT_TRIES):
            side = int(rng.integers(smallest, largest + 1))
            # One draw of both corners (a square image draws exactly what it always drew).
            corner = rng.integers(0, [width - side + 1, height - side + 1], size=2)
            x0, y0 = (int(value) for value in corner)
            box = (x0, y0, x0 + side, y0 + side)
            if all(boxes_are_apart(box, other, margin, centre_gap) for other in boxes):
                boxes.append(box)
                break
    return boxes


def boxes_are_apart(
    box: tuple[int, int, int, int], other: tuple[int, int, int, int], margin: int, centre_gap: int
) -> bool:
    """True when the boxes are at least `margin` apart and their x centres `centre_gap` apart."""
    separated = (
        box[2] + margin <= other[0]
        or other[2] + margin <= box[0]
        or box[3] + margin <= other[1]
        or other[3] + margin <= box[1]
    )
    centres_differ = abs((box[0] + box[2]) - (other[0] + other[2])) >= 2 * centre_gap
    return separated and centres_differ


def jitter_colour(rng: np.random.Generator, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """`rgb` with each channel moved by up to COLOUR_JITTER, clipped to 0..255."""
    shifted = np.asarray(rgb) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    return tuple(int(value) for value in np.clip(shifted, 0, 255))


def draw_object(draw: ImageDraw.ImageDraw, item: SceneObject, rgb: tuple[int, int, int]) -> None:
    """Fill `item`'s shape inside its box (PIL boxes are inclusive, hence the - 1)."""
    x0, y0, x1, y1 = item.box
    if item.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=rgb)
    elif item.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=rgb)
    else:
        draw.polygon(((x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)), fill=rgb)


def add_noise(rng: np.random.Generator, image: Image.Image) -> Image.Image:
    """`image` plus uniform pixel noise of +-NOISE_AMPLITUDE per channel."""
    pixels = np.asarray(image, dtype=np.int16)  # (H, W, 3)
    noise = rng.integers(-NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8), mode="RGB")


def paint_box(image: Image.Image, box: tuple[int, int, int, int], rgb: tuple[int, int, int]) -> Image.Image:
    """Copy of `image` with `box` = (x0, y0, x1, y1), x1/y1 exclusive, filled flat with `rgb`."""
    painted = image.copy()
    ImageDraw.Draw(painted).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=rgb)
    return painted


def remove_object(scene: Scene, index: int) -> Scene:
    """The scene with object `index` painted over in the background colour and left out of the caption."""
    kept = scene.objects[:index] + scene.objects[index + 1 :]
    image = paint_box(scene.image, scene.objects[index].box, scene.background)
    return replace(scene, image=image, caption=describe_objects(kept), objects=kept)


def caption_distractors(scene: Scene, count: int, rng: np.random.Generator) -> list[str]:
    """`count` distinct wrong captions, as close to the true one as possible.

    One colour or shape word changed first; when those run out, two words changed, and so on.
    An empty scene gets captions of single objects instead.

    Args:
        scene: the scene whose caption is varied.
        count: number of captions wanted; ValueError when the scene allows fewer.
        rng: numpy Generator that picks which variants (and their order).
    """
    if scene.objects:
        groups = word_change_groups(scene.objects)
    else:
        groups = [[f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]]
    chosen: list[str] = []
    for group in groups:
        needed = count - len(chosen)
        if needed <= 0:
            break
        picks = rng.permutation(len(group))[:needed]
        chosen.extend(group[int(pick)] for pick in picks)
    if len(chosen) < count:
        raise ValueError(f"scene allows only {len(chosen)} distractors, {count} requested")
    return chosen


def word_change_groups(objects: tuple[SceneObject, ...]) -> Iterator[list[str]]:
    """Captions of `objects` with exactly 1, 2, ... colour/shape words changed, one list per count.

    A generator: a caller that has enough after one word changed never builds the rest.
    """
    ordered = sorted(objects, key=lambda item: (item.box[0] + item.box[2], item.box[1] + item.box[3]))
    words = [word for item in ordered for word in (item.colour, item.shape)]
    choices = [COLOURS if slot % 2 == 0 else SHAPES for slot in range(len(words))]
    for changed_count in range(1, len(words) + 1):
        group = []
        for slots in itertools.combinations(range(len(words)), changed_count):
            options = [[word for word in choices[slot] if word != words[slot]] for slot in slots]
            for replacement in itertools.product(*options):
                new_words = list(words)
                for slot, word in zip(slots, replacement, strict=True):
                    new_words[slot] = word
                group.append(join_object_words(new_words))
        yield group


# The caption grammar: the words that may follow each word (None: the caption's start; "" the
# end). Captions are "an empty picture" or up to MAX_OBJECTS "a <colour> <shape>" joined by "and".
NEXT_WORDS: dict[str | None, frozenset[str]] = {
    None: frozenset({"a", "an"}),
    "an": frozenset({"empty"}),
    "empty": frozenset({"picture"}),
    "picture": frozenset({""}),
    "a": frozenset(COLOURS),
    **{colour: frozenset(SHAPES) for colour in COLOURS},
    **{shape: frozenset({"and", ""}) for shape in SHAPES},
    "and": frozenset({"a"}),
}


def grammar_forced(words: list[str]) -> list[bool]:
    """For each word of a caption, whether the grammar allows only it after the word before it.

    Such a word ("a" after "and", "empty" after "an", "picture" after "empty") follows from the
    caption so far whatever the image shows: the language prior alone can say it. Every other
    word picks among options only the image settles, function words included: the first "a" or
    "an" says whether the scene is empty, "and" that one more object follows. A word after one
    the grammar does not know (a garbled caption) is not forced.
    """
    return [len(NEXT_WORDS.get(words[index - 1] if index else None, ())) == 1 for index in range(len(words))]


def join_object_words(words: list[str]) -> str:
    """Caption from a flat [colour, shape, colour, shape, ...] list, in that order."""
    pairs = zip(words[0::2], words[1::2], strict=True)
    return " and ".join(f"a {colour} {shape}" for colour, shape in pairs)
