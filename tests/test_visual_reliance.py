"""Per-word visual reliance: log p(word | image) - log p(word | images that show nothing of it)
(the mean probability over them), both teacher-forced on the same caption, all words from one
batched pass; on the page, the word pills carry it and a word from the language prior is marked."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from models.analysis import LANGUAGE_PRIOR_NATS, word_evidence
from models.families import load_captioner
from tests.app_helpers import pick_example, start_app
from tests.test_app import EXAMPLE_NAME, SCENE
from utils.image_utils import COUNTERFACTUALS, EXAMPLES_DIR, counterfactual_images, example_names, load_image
from utils.shapes_world import generate_scene
from utils.text import RELIANCE_BARS, reliance_mark


@pytest.fixture(scope="module")
def demo():
    return load_captioner("shapes-demo", device="cpu")


@pytest.mark.parametrize("kind", COUNTERFACTUALS)
def test_reliance_is_the_difference_of_teacher_forced_passes_each_run_alone(demo, kind):
    scene = generate_scene(100003)
    caption = demo.caption(scene.image)
    evidence = word_evidence(demo, scene.image, caption, kind)
    blanks = counterfactual_images(scene.image, kind, demo.processor.image_processor.image_mean)
    with_image = demo.token_log_probs([scene.image], caption.token_ids)[0]
    without = [demo.token_log_probs([blank], caption.token_ids)[0] for blank in blanks]
    for index, word in enumerate(caption.words):
        log_p = with_image[word.start : word.end].sum()
        prior = np.mean([math.exp(each[word.start : word.end].sum()) for each in without])
        assert evidence.reliance[index] == pytest.approx(log_p - math.log(prior), abs=1e-4)
        assert evidence.probabilities[index] == pytest.approx(math.exp(log_p), rel=1e-4)
    assert evidence.counterfactual == kind


def test_object_words_carry_the_information_of_their_choice_and_function_words_none(demo):
    """On held-out scenes, against the default counterfactual (the other example images): the
    first "a" comes from the prior; a colour or shape word carries about what choosing it among
    the world's 4 colours or 3 shapes is worth (log 4 and log 3 nats against a typical image),
    where "a" and "and" carry hundredths (bench/faithfulness.py measures the separation over
    many scenes)."""
    object_words, function_words = [], []
    for seed in range(100000, 100008):
        scene = generate_scene(seed)
        if not scene.objects:  # "an empty picture": every word of it is the image's
            continue
        caption = demo.caption(scene.image)
        evidence = word_evidence(demo, scene.image, caption)
        assert caption.words[0].text == "a" and evidence.from_prior[0]
        for word, reliance in zip(caption.words, evidence.reliance, strict=True):
            (function_words if word.text in ("a", "and") else object_words).append(reliance)
    assert len(object_words) >= 12
    # Measured: medians 1.25 and 0.10 nats (the first "a" says "not empty": log 11/10 against
    # the 11 examples, one of them empty), every object word over LANGUAGE_PRIOR_NATS.
    assert np.median(object_words) > 2 * LANGUAGE_PRIOR_NATS
    assert np.median(function_words) < LANGUAGE_PRIOR_NATS / 4
    assert np.mean(np.array(object_words) > LANGUAGE_PRIOR_NATS) > 0.9


def test_the_mean_counterfactual_is_all_zeros_after_normalisation(demo):
    image = generate_scene(7).image
    (blank,) = counterfactual_images(image, "mean", demo.processor.image_processor.image_mean)
    assert blank.size == image.size
    pixel_values = demo.pixel_values([blank])
    assert pixel_values.abs().max() < 2 / 255 / min(demo.processor.image_processor.image_std), "zero up to rounding"


def test_counterfactuals_are_seeded_and_unknown_kinds_refused():
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    for kind in COUNTERFACTUALS:
        first, second = (counterfactual_images(image, kind, (0.5, 0.5, 0.5)) for _ in range(2))
        assert len(first) == (len(example_names()) if kind == "others" else 1)
        for one, other in zip(first, second, strict=True):
            assert one.size == (40, 30) and np.array_equal(np.asarray(one), np.asarray(other))
    with pytest.raises(ValueError, match="unknown counterfactual 'zeros'"):
        counterfactual_images(image, "zeros", (0.5, 0.5, 0.5))


def test_the_other_images_leave_out_the_image_itself():
    """A user who picks an example is measured against the other examples: a prior that held the
    image itself would cap every word's reliance at log(number of images)."""
    name = example_names()[0]
    image = load_image((EXAMPLES_DIR / name).read_bytes())
    others = counterfactual_images(image, "others", (0.5, 0.5, 0.5))
    assert len(others) == len(example_names()) - 1
    assert not any(np.array_equal(np.asarray(other), np.asarray(image.convert("RGB"))) for other in others)


def test_reliance_marks_grow_with_the_reliance_and_say_prior_below_the_threshold():
    assert reliance_mark(0.1, 0.5) == reliance_mark(-3.0, 0.5) == reliance_mark(float("nan"), 0.5) == "prior"
    marks = [reliance_mark(nats, 0.5) for nats in (0.5, 1.0, 2.0, 3.0, 4.0, 9.0)]
    assert [RELIANCE_BARS.index(mark) for mark in marks] == sorted(RELIANCE_BARS.index(mark) for mark in marks)
    assert marks[0] == RELIANCE_BARS[0] and marks[-2] == marks[-1] == RELIANCE_BARS[-1]


def test_the_page_marks_each_word_and_warns_on_a_word_from_the_prior():
    app = start_app()
    pick_example(app, EXAMPLE_NAME)
    assert not app.exception, app.exception
    labels = [option.content for option in app.button_group[0].proto.options]
    assert [label.split(" · ")[0] for label in labels] == SCENE.caption.split()
    assert all(label.split(" · ")[2] in (*RELIANCE_BARS, "prior") for label in labels)
    assert any("visual reliance" in caption.value for caption in app.caption), "a legend"
    assert labels[0].endswith(" · prior"), "the first article comes from the prior"
    app.button_group[0].set_value(0).run()  # "a"
    assert any("language model's prior" in warning.value for warning in app.warning)
    colour = next(index for index, label in enumerate(labels) if not label.endswith("prior"))
    app.button_group[0].set_value(colour).run()
    assert not any("language model's prior" in warning.value for warning in app.warning)
    before = labels
    app.sidebar.selectbox(key="counterfactual").set_value("noise").run()
    assert not app.exception, app.exception
    after = [option.content for option in app.button_group[0].proto.options]
    assert after != before, "the marks follow the chosen counterfactual"
    assert torch.is_grad_enabled()
