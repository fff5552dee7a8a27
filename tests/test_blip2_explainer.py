"""BLIP-2 explainer on a tiny random BLIP-2 (OPT): prompt captions, alignment behind the query
tokens, the query-composed map and the Q-Former's cross-attention by hand, one-pass
equivalences, occlusion, hooks, threads, geometry, the page and evaluate.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.blip2_explainer import Blip2Explainer
from models.cam_methods import hires_cam
from models.explainer import MissingCaptureError
from models.families import explainer_for_model, load_captioner
from tests.conftest import random_image
from tests.engine_checks import (
    assert_all_words_at_once_equal_each_alone,
    assert_no_hook_is_left_after_an_error,
    assert_parameters_get_no_gradient,
    assert_threads_get_what_they_get_alone,
)
from tests.geometry_checks import assert_patch_boxes_reach_their_own_patches
from tests.tiny_blip2 import (
    BOS_ID,
    CROSS_ATTENTION_LAYERS,
    EOS_ID,
    IMAGE_SIZE,
    PATCH_SIZE,
    PATCHES,
    QUERIES,
    TEXT_LAYERS,
    VISION_LAYERS,
    build_tiny_blip2,
)
from tests.tiny_models import save_tiny

PROMPT = "a photo of"
ANSWER = " a red circles and blue square."
ANSWER_WORDS = ["a", "red", "circles", "and", "blue", "square", "."]
METHODS = ["queries", "qformer", "hirescam", "gradcam", "occlusion"]


@pytest.fixture(scope="module")
def tiny_blip2_dir(tmp_path_factory):
    return save_tiny(*build_tiny_blip2(), tmp_path_factory.mktemp("tiny_blip2"))


@pytest.fixture(scope="module")
def tiny_blip2(tiny_blip2_dir) -> Blip2Explainer:
    """Loaded the way the page loads a captioner: config.json's model_type picks the family."""
    explainer = load_captioner(str(tiny_blip2_dir), device="cpu")
    assert isinstance(explainer, Blip2Explainer)
    return explainer


def prompt_ids(explainer: Blip2Explainer, prompt: str) -> list[int]:
    """What the real processor writes: one image id per query, </s>, the prompt."""
    return explainer.processor(images=[random_image(0)], text=prompt, return_tensors="pt").input_ids[0].tolist()


@pytest.fixture(scope="module")
def caption_ids(tiny_blip2) -> list[int]:
    answer = tiny_blip2.processor.tokenizer(ANSWER, add_special_tokens=False).input_ids
    return prompt_ids(tiny_blip2, PROMPT) + answer + [EOS_ID]


@pytest.fixture(scope="module")
def caption(tiny_blip2, caption_ids):
    return tiny_blip2.caption_from_ids(caption_ids, len(prompt_ids(tiny_blip2, PROMPT)))


def query_columns(explainer: Blip2Explainer, ids) -> list[int]:
    return [position for position, token_id in enumerate(ids) if token_id == explainer.image_token_id]


def logits_by_hand(explainer: Blip2Explainer, pixel_values: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """(ids, V): the projected Q-Former outputs written at the image ids, OPT run on the embeddings."""
    model = explainer.model
    queries = model.get_image_features(pixel_values).pooler_output[0]  # (queries, D)
    embeddings = model.get_input_embeddings()(torch.tensor([ids])).clone()
    embeddings[0, query_columns(explainer, ids)] = queries
    return model.language_model(inputs_embeds=embeddings).logits[0]


def word_score(log_probs: torch.Tensor, ids: list[int], word) -> torch.Tensor:
    return sum(log_probs[p - 1, ids[p]] for p in range(word.start, word.end))


def test_words_follow_the_prompt_and_query_ids_are_special(tiny_blip2, caption, caption_ids):
    assert [word.text for word in caption.words] == ANSWER_WORDS
    assert all(word.start >= caption.prompt_length for word in caption.words)
    assert caption_ids[:QUERIES] == [tiny_blip2.image_token_id] * QUERIES and caption_ids[QUERIES] == BOS_ID
    assert {tiny_blip2.image_token_id, BOS_ID, EOS_ID} <= tiny_blip2.special_ids
    circles = caption.words[2]
    assert circles.end - circles.start > 1, "the test needs a word of several pieces"
    assert caption.text == PROMPT + ANSWER, "the caption continues its prompt, as BLIP's does"


def test_logits_before_a_token_score_it(tiny_blip2, caption, caption_ids):
    """Golden value computed by hand through the model's parts, against the off-by-one row."""
    image = random_image(1)
    with torch.no_grad():
        logits = logits_by_hand(tiny_blip2, tiny_blip2.pixel_values([image]), caption_ids).double().numpy()

    def log_p_by_hand(row: int, token_id: int) -> float:
        shifted = logits[row] - logits[row].max()
        return float(shifted[token_id] - np.log(np.exp(shifted).sum()))

    red = caption.words[1]
    position = red.start
    expected = log_p_by_hand(position - 1, caption_ids[position])
    misaligned = log_p_by_hand(position, caption_ids[position])
    assert abs(expected - misaligned) > 1e-3, "the test must tell the two alignments apart"
    teacher_forced = tiny_blip2.token_log_probs([image], caption_ids)[0]
    assert teacher_forced[position] == pytest.approx(expected, abs=1e-5)
    batched = tiny_blip2.token_log_probs([random_image(30), image], caption_ids)
    np.testing.assert_allclose(batched[1], teacher_forced, rtol=1e-5, atol=1e-5)
    assert not np.allclose(batched[0][1:], teacher_forced[1:])
    (maps,) = tiny_blip2.explain(image, caption, word_indices=[1], piece=0)
    assert maps.score == pytest.approx(expected, abs=1e-5)
    whole_word = sum(log_p_by_hand(p - 1, caption_ids[p]) for p in range(red.start, red.end))
    (maps,) = tiny_blip2.explain(image, caption, word_indices=[1])
    assert maps.score == pytest.approx(whole_word, abs=1e-5)


def outputs_and_gradients(explainer, modules, image, ids, word, output_index) -> list[tuple]:
    """One hand-written forward pass hooking ``modules``: each one's first output (in module
    order, whatever order they run in) and the word's gradient with respect to it."""
    captured: dict[int, torch.Tensor] = {}

    def hook_for(slot: int):
        def keep(module, inputs, output) -> None:  # None: output unchanged
            captured.setdefault(slot, output[output_index] if isinstance(output, tuple) else output)

        return keep

    handles = [module.register_forward_hook(hook_for(slot)) for slot, module in enumerate(modules)]
    try:
        pixel_values = explainer.pixel_values([image]).requires_grad_(True)
        with torch.enable_grad():
            log_probs = logits_by_hand(explainer, pixel_values, ids).log_softmax(-1)
            outputs = [captured[slot] for slot in range(len(modules))]
            gradients = torch.autograd.grad(word_score(log_probs, ids, word), outputs)
    finally:
        for handle in handles:
            handle.remove()
    return [(output.detach(), gradient) for output, gradient in zip(outputs, gradients, strict=True)]


def test_the_query_map_carries_the_language_models_attention_through_the_qformer(tiny_blip2, caption, caption_ids):
    """By hand: ReLU(gradient x attention) of each OPT layer from the word's rows to the query
    columns, heads averaged, rows summed, layers averaged: one value per query; times each
    cross-attention layer's head-averaged attention from the queries to the patches."""
    image = random_image(3)
    (maps,) = tiny_blip2.explain(image, caption, word_indices=[2], method="queries")
    word = caption.words[2]
    rows = slice(word.start - 1, word.end - 1)
    columns = query_columns(tiny_blip2, caption_ids)
    modules = [*tiny_blip2.language_attentions, *tiny_blip2.cross_attentions]
    captured = outputs_and_gradients(tiny_blip2, modules, image, caption_ids, word, output_index=1)
    per_layer = [
        torch.relu(gradient[0] * attention[0])[:, rows][:, :, columns].mean(dim=0).sum(dim=0)
        for attention, gradient in captured[:TEXT_LAYERS]
    ]
    query_relevance = torch.stack(per_layer).mean(dim=0)  # (queries,)
    assert query_relevance.shape == (QUERIES,) and query_relevance.max() > 0
    for layer, (attention, _) in enumerate(captured[TEXT_LAYERS:]):
        assert attention.shape == (1, 4, QUERIES, PATCHES + 1), "queries attend to CLS and the patches"
        expected = query_relevance @ attention[0].mean(dim=0)[:, 1:]
        np.testing.assert_allclose(maps.cam_patches[layer], expected.numpy(), rtol=1e-4, atol=1e-10)
    assert maps.cam_patches.shape == (CROSS_ATTENTION_LAYERS + 1, PATCHES)
    np.testing.assert_allclose(maps.cam_patches[-1], maps.cam_patches[:-1].mean(axis=0), rtol=1e-5, atol=1e-12)
    assert tiny_blip2.default_method == "queries"
    assert tiny_blip2.default_layer("queries") == CROSS_ATTENTION_LAYERS


def test_qformer_cross_attention_sits_on_every_second_layer_and_matches_by_hand(tiny_blip2, caption, caption_ids):
    layers = tiny_blip2.model.qformer.encoder.layer
    assert [layer.has_cross_attention for layer in layers] == [index % 2 == 0 for index in range(len(layers))]
    image = random_image(4)
    (maps,) = tiny_blip2.explain(image, caption, word_indices=[4], method="qformer")
    captured = outputs_and_gradients(
        tiny_blip2, tiny_blip2.cross_attentions, image, caption_ids, caption.words[4], output_index=1
    )
    for layer, (attention, gradient) in enumerate(captured):
        by_hand = torch.relu(gradient[0] * attention[0]).mean(dim=0).sum(dim=0)[1:]  # heads, queries; after CLS
        np.testing.assert_allclose(maps.cam_patches[layer], by_hand.numpy(), rtol=1e-4, atol=1e-10)
    assert maps.cam_patches[:-1].max() > 0


def test_all_vision_layers_in_one_pass_equal_one_pass_per_layer(tiny_blip2, caption, caption_ids):
    image = random_image(5)
    (maps,) = tiny_blip2.explain(image, caption, word_indices=[2], method="hirescam")
    assert tiny_blip2.vision_layers[-1] is tiny_blip2.model.vision_model.post_layernorm
    for layer, module in enumerate(tiny_blip2.vision_layers):
        ((activation, gradient),) = outputs_and_gradients(
            tiny_blip2, [module], image, caption_ids, caption.words[2], output_index=0
        )
        expected = hires_cam(activation[0, 1:], gradient[0, 1:])  # after CLS
        np.testing.assert_allclose(maps.cam_patches[layer], expected.numpy(), rtol=1e-4, atol=1e-10)
    assert maps.cam_patches.shape == (VISION_LAYERS, PATCHES) and maps.cam_patches[-1].max() > 0


@pytest.mark.parametrize("method", METHODS)
def test_all_words_at_once_equal_each_word_alone(tiny_blip2, caption, method):
    assert [word.text for word in caption.words] == ANSWER_WORDS
    assert_all_words_at_once_equal_each_alone(tiny_blip2, caption, random_image(6), method, PATCHES)


def test_occlusion_is_the_drop_in_log_p_when_a_patch_is_zeroed(tiny_blip2, caption, caption_ids):
    image = random_image(7)
    (maps,) = tiny_blip2.explain(image, caption, word_indices=[4], method="occlusion")
    word = caption.words[4]
    pixel_values = tiny_blip2.pixel_values([image])

    def log_p(pixels: torch.Tensor) -> float:
        with torch.no_grad():
            return float(word_score(logits_by_hand(tiny_blip2, pixels, caption_ids).log_softmax(-1), caption_ids, word))

    occluded = pixel_values.clone()
    occluded[:, :, PATCH_SIZE : 2 * PATCH_SIZE, 2 * PATCH_SIZE : 3 * PATCH_SIZE] = 0  # patch row 1, column 2
    expected = max(log_p(pixel_values) - log_p(occluded), 0.0)
    columns = IMAGE_SIZE // PATCH_SIZE
    assert maps.cam_patches[0, 1 * columns + 2] == pytest.approx(expected, abs=1e-5)
    assert maps.cam_patches.max() > 0, "a map of zeros would match any patch whose drop is zero"


@pytest.mark.parametrize("image_size", [(80, 48), (40, 120)])
def test_squash_geometry_matches_the_real_processor(tiny_blip2, image_size):
    (view,) = tiny_blip2.image_geometry(image_size).views
    assert view.grid_shape == (IMAGE_SIZE // PATCH_SIZE,) * 2
    assert_patch_boxes_reach_their_own_patches(tiny_blip2, image_size)


def test_caption_continues_the_prompt(tiny_blip2):
    image = random_image(12)
    plain = tiny_blip2.caption(image, max_new_tokens=4)
    start = prompt_ids(tiny_blip2, "")
    assert plain.token_ids[: len(start)] == tuple(start) and plain.prompt_length == len(start) == QUERIES + 1
    assert len(plain.words) == 4, "the tiny model never writes </s>: four new pieces, four words"
    prompted = tiny_blip2.caption(image, prompt=PROMPT, max_new_tokens=3)
    start = prompt_ids(tiny_blip2, PROMPT)
    assert prompted.token_ids[: len(start)] == tuple(start) and prompted.prompt_length == len(start)
    assert prompted.text.startswith(PROMPT) and len(prompted.token_ids) == len(start) + 3
    typed_image_token = tiny_blip2.caption(image, prompt="a <image> of", max_new_tokens=2)
    assert len(query_columns(tiny_blip2, typed_image_token.token_ids)) == QUERIES
    beams = tiny_blip2.caption(image, prompt=PROMPT, max_new_tokens=3, num_beams=2)
    assert beams.token_ids[: len(start)] == tuple(start)
    tiny_blip2.explain(image, prompted)  # the explanation reads the generated ids as they are


def test_sdpa_attention_fails_loudly_and_an_encoder_decoder_is_refused(caption, monkeypatch):
    model, processor = build_tiny_blip2()
    explainer = explainer_for_model(model, processor)
    model.set_attn_implementation({"qformer_config": "sdpa"})  # behind the explainer's back
    with pytest.raises(MissingCaptureError, match="eager"):
        explainer.explain(random_image(9), caption, word_indices=[0], method="qformer")
    monkeypatch.setattr(model, "set_attn_implementation", lambda implementation: None)
    with pytest.raises(MissingCaptureError, match="eager"):
        Blip2Explainer(model, processor)
    monkeypatch.setattr(model.config, "use_decoder_only_language_model", False)
    with pytest.raises(ValueError, match="encoder-decoder"):
        Blip2Explainer(model, processor)


def test_no_hook_is_left_even_after_an_error(tiny_blip2, caption):
    # The vision tower and the Q-Former run (their hooks fire), then the language model raises.
    assert_no_hook_is_left_after_an_error(
        tiny_blip2, caption, random_image(10), METHODS, tiny_blip2.model.language_model, ("queries", "hirescam")
    )


def test_explaining_leaves_no_gradient_on_shared_parameters(tiny_blip2, caption):
    assert_parameters_get_no_gradient(tiny_blip2, caption, random_image(11), METHODS)


def test_threads_sharing_one_explainer_get_what_they_get_alone(tiny_blip2, caption):
    jobs = [(random_image(20 + index), index % len(caption.words), method)
            for index, method in enumerate(["queries", "qformer", "hirescam", "queries"])]
    assert_threads_get_what_they_get_alone(tiny_blip2, caption, jobs)


def test_sanity_check_copy_randomises_the_top_vision_layer(tiny_blip2, caption_ids):
    image = random_image(31)
    before = {name: value.clone() for name, value in tiny_blip2.model.state_dict().items()}
    randomised = tiny_blip2.randomised_copy(top_layers=1, seed=0)
    assert tiny_blip2.vision_tower_layers()[-1] is tiny_blip2.model.vision_model.encoder.layers[-1]
    trained = tiny_blip2.token_log_probs([image], caption_ids)[0, 1:]
    assert np.abs(randomised.token_log_probs([image], caption_ids)[0, 1:] - trained).max() > 1e-5
    for name, value in tiny_blip2.model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
