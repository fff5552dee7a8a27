"""LLaVA explainer on a tiny random LLaVA-1.5: chat-template captions, alignment in one long
sequence, one-pass equivalences, eager attention, occlusion, hooks, threads, geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.cam_methods import gradient_attention, hires_cam
from models.explainer import DEFAULT_INSTRUCTION, MissingCaptureError, PromptTooLongError
from models.families import explainer_for_model, load_captioner
from models.llava_explainer import LlavaExplainer
from tests.conftest import random_image
from tests.engine_checks import assert_projector_map_is_gradient_x_input, assert_threads_get_what_they_get_alone
from tests.geometry_checks import assert_patch_boxes_reach_their_own_patches
from tests.tiny_llava import (
    EOS_ID,
    IMAGE_SIZE,
    IMAGE_TOKEN_ID,
    PATCH_SIZE,
    TEXT_LAYERS,
    VISION_LAYERS,
    build_tiny_llava,
)
from tests.tiny_models import save_tiny

ANSWER = " a red circles and blue square."
ANSWER_WORDS = ["a", "red", "circles", "and", "blue", "square", "."]
PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2
METHODS = ["attention", "hirescam", "gradcam", "projector", "occlusion"]


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory):
    return save_tiny(*build_tiny_llava(), tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="module")
def tiny_llava(tiny_llava_dir) -> LlavaExplainer:
    """Loaded the way the page loads a captioner: config.json's model_type picks the family."""
    explainer = load_captioner(str(tiny_llava_dir), device="cpu")
    assert isinstance(explainer, LlavaExplainer)
    return explainer


@pytest.fixture(scope="module")
def caption_ids(tiny_llava) -> list[int]:
    """BOS, template, 16 image ids, instruction, then the answer and EOS, as generate() returns them."""
    prompt = tiny_llava.prompt_ids(random_image(0), DEFAULT_INSTRUCTION)[0].tolist()
    answer = tiny_llava.processor.tokenizer(ANSWER, add_special_tokens=False).input_ids
    return prompt + answer + [EOS_ID]


@pytest.fixture(scope="module")
def caption(tiny_llava, caption_ids):
    answer_length = len(tiny_llava.processor.tokenizer(ANSWER, add_special_tokens=False).input_ids)
    prompt_length = len(caption_ids) - answer_length - 1  # before the answer and EOS
    return tiny_llava.caption_from_ids(caption_ids, prompt_length)


def count_forward_hooks(model: torch.nn.Module) -> int:
    return sum(len(module._forward_hooks) for module in model.modules())


def logits_of(explainer: LlavaExplainer, pixel_values: torch.Tensor, ids: list[int]) -> torch.Tensor:
    return explainer.model(pixel_values=pixel_values, input_ids=torch.tensor([ids])).logits[0]


def image_columns(ids) -> list[int]:
    return [position for position, token_id in enumerate(ids) if token_id == IMAGE_TOKEN_ID]


def test_only_the_answer_is_words_and_image_ids_are_special(tiny_llava, caption, caption_ids):
    assert [word.text for word in caption.words] == ANSWER_WORDS
    assert all(word.start >= caption.prompt_length for word in caption.words)
    assert len(image_columns(caption_ids)) == PATCHES  # CLS dropped by the "default" strategy
    assert IMAGE_TOKEN_ID in tiny_llava.special_ids and EOS_ID in tiny_llava.special_ids
    circles = caption.words[2]
    assert circles.end - circles.start > 1, "the test needs a word of several pieces"
    assert caption.text == ANSWER.strip(), "the caption is the answer: no template, instruction or image ids"


def test_logits_before_a_token_score_it(tiny_llava, caption, caption_ids):
    """Golden value computed by hand: the image ids replaced by the projected second-to-last
    CLIP layer without CLS, the Llama model run on those embeddings, and log p(ids[p]) read off
    the logits at p - 1 in numpy."""
    image = random_image(1)
    model = tiny_llava.model.model
    with torch.no_grad():
        pixel_values = tiny_llava.pixel_values([image])
        hidden = model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        features = model.multi_modal_projector(hidden[VISION_LAYERS - 1][0, 1:])  # (16, D)
        embeddings = model.language_model.embed_tokens(torch.tensor([caption_ids]))
        embeddings[0, image_columns(caption_ids)] = features
        states = model.language_model(inputs_embeds=embeddings).last_hidden_state
        logits = tiny_llava.model.lm_head(states)[0].double().numpy()

    def log_p_by_hand(row: int, token_id: int) -> float:
        shifted = logits[row] - logits[row].max()
        return float(shifted[token_id] - np.log(np.exp(shifted).sum()))

    red = caption.words[1]
    position = red.start
    expected = log_p_by_hand(position - 1, caption_ids[position])
    misaligned = log_p_by_hand(position, caption_ids[position])
    assert abs(expected - misaligned) > 1e-3, "the test must tell the two alignments apart"

    teacher_forced = tiny_llava.token_log_probs([image], caption_ids)[0]
    assert np.isnan(teacher_forced[0])
    assert teacher_forced[position] == pytest.approx(expected, abs=1e-5)
    # A batch of images (the causal test scores the image and its masked copy at once).
    batched = tiny_llava.token_log_probs([random_image(30), image], caption_ids)
    np.testing.assert_allclose(batched[1], teacher_forced, rtol=1e-5, atol=1e-5)
    assert not np.allclose(batched[0][1:], teacher_forced[1:])
    (maps,) = tiny_llava.explain(image, caption, word_indices=[1], method="attention", piece=0)
    assert maps.score == pytest.approx(expected, abs=1e-5)
    whole_word = sum(log_p_by_hand(p - 1, caption_ids[p]) for p in range(red.start, red.end))
    (maps,) = tiny_llava.explain(image, caption, word_indices=[1], method="attention")
    assert maps.score == pytest.approx(whole_word, abs=1e-5)


def test_vision_methods_read_only_the_layers_that_reach_the_words(tiny_llava, caption):
    """vision_feature_layer -2: the last CLIP layer never reaches the language model."""
    assert len(tiny_llava.vision_layers) == VISION_LAYERS - 1
    (maps,) = tiny_llava.explain(random_image(2), caption, word_indices=[2], method="hirescam")
    assert maps.layer_names == tuple(f"vision layer {i}/{VISION_LAYERS - 1}" for i in range(1, VISION_LAYERS))
    assert maps.cam_patches[-1].max() > 0


def test_sanity_check_copy_randomises_the_top_layer_that_reaches_the_words(tiny_llava, caption, caption_ids):
    image = random_image(31)
    before = {name: value.clone() for name, value in tiny_llava.model.state_dict().items()}
    randomised = tiny_llava.randomised_copy(top_layers=1, seed=0)
    assert tiny_llava.vision_tower_layers()[-1] is tiny_llava.model.model.vision_tower.encoder.layers[VISION_LAYERS - 2]
    trained = tiny_llava.token_log_probs([image], caption_ids)[0, 1:]
    assert np.abs(randomised.token_log_probs([image], caption_ids)[0, 1:] - trained).max() > 1e-4
    for name, value in tiny_llava.model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_all_vision_layers_in_one_pass_equal_one_pass_per_layer(tiny_llava, caption, caption_ids):
    image = random_image(3)
    (maps,) = tiny_llava.explain(image, caption, word_indices=[2], method="hirescam")
    word = caption.words[2]
    for layer_index, layer in enumerate(tiny_llava.vision_layers):
        captured: dict[str, torch.Tensor] = {}
        handle = layer.register_forward_hook(
            lambda module, inputs, output, sink=captured: sink.setdefault(
                "output", output[0] if isinstance(output, tuple) else output
            )
        )
        try:
            pixel_values = tiny_llava.pixel_values([image]).requires_grad_(True)
            with torch.enable_grad():
                log_probs = logits_of(tiny_llava, pixel_values, caption_ids).log_softmax(-1)
                score = sum(log_probs[p - 1, caption_ids[p]] for p in range(word.start, word.end))
                (gradient,) = torch.autograd.grad(score, captured["output"])
        finally:
            handle.remove()
        expected = hires_cam(captured["output"][0, 1:], gradient[0, 1:])  # after CLS
        np.testing.assert_allclose(maps.cam_patches[layer_index], expected.detach().numpy(), rtol=1e-4, atol=1e-9)
    assert maps.cam_patches.shape == (VISION_LAYERS - 1, PATCHES)


def test_all_attention_layers_in_one_pass_equal_one_pass_per_layer(tiny_llava, caption, caption_ids):
    image = random_image(4)
    (maps,) = tiny_llava.explain(image, caption, word_indices=[2], method="attention")
    word = caption.words[2]
    rows = slice(word.start - 1, word.end - 1)
    columns = image_columns(caption_ids)
    for layer_index, attention_module in enumerate(tiny_llava.attention_layers):
        captured: dict[str, torch.Tensor] = {}
        def keep_attention(module, inputs, output, sink=captured) -> None:  # None: output unchanged
            sink.setdefault("attention", output[1])

        handle = attention_module.register_forward_hook(keep_attention)
        try:
            pixel_values = tiny_llava.pixel_values([image]).requires_grad_(True)
            with torch.enable_grad():
                log_probs = logits_of(tiny_llava, pixel_values, caption_ids).log_softmax(-1)
                score = sum(log_probs[p - 1, caption_ids[p]] for p in range(word.start, word.end))
                (gradient,) = torch.autograd.grad(score, captured["attention"])
        finally:
            handle.remove()
        attention = captured["attention"][0]  # (heads, queries, keys)
        by_hand = torch.relu(gradient[0] * attention)[:, rows][:, :, columns].mean(dim=0).sum(dim=0)
        np.testing.assert_allclose(maps.cam_patches[layer_index], by_hand.detach().numpy(), rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(
            by_hand.detach().numpy(),
            gradient_attention(attention[:, rows].transpose(0, 1), gradient[0][:, rows].transpose(0, 1))
            .sum(dim=0)[columns].detach().numpy(),
            rtol=1e-5, atol=1e-10,
        )
    assert maps.cam_patches.shape == (TEXT_LAYERS + 1, PATCHES)


def test_a_cls_token_kept_in_the_sequence_is_no_patch():
    """With the "full" strategy CLIP's CLS is the first image token: no map may show it."""
    model, processor = build_tiny_llava(strategy="full")
    explainer = LlavaExplainer(model, processor)
    image = random_image(32)
    prompt = explainer.prompt_ids(image, DEFAULT_INSTRUCTION)[0].tolist()
    answer = processor.tokenizer(ANSWER, add_special_tokens=False).input_ids
    ids = prompt + answer + [EOS_ID]
    columns = image_columns(ids)
    assert len(columns) == PATCHES + 1
    caption = explainer.caption_from_ids(ids, len(prompt))
    word = caption.words[1]
    rows = slice(word.start - 1, word.end - 1)
    (maps,) = explainer.explain(image, caption, word_indices=[1], method="attention")
    captured: dict[str, torch.Tensor] = {}

    def keep_attention(module, inputs, output, sink=captured) -> None:
        sink.setdefault("attention", output[1])

    handle = explainer.attention_layers[0].register_forward_hook(keep_attention)
    try:
        with torch.enable_grad():
            pixel_values = explainer.pixel_values([image]).requires_grad_(True)
            log_probs = logits_of(explainer, pixel_values, ids).log_softmax(-1)
            score = sum(log_probs[p - 1, ids[p]] for p in range(word.start, word.end))
            (gradient,) = torch.autograd.grad(score, captured["attention"])
    finally:
        handle.remove()
    attention = captured["attention"][0]
    by_hand = torch.relu(gradient[0] * attention)[:, rows][:, :, columns[1:]].mean(dim=0).sum(dim=0)
    np.testing.assert_allclose(maps.cam_patches[0], by_hand.detach().numpy(), rtol=1e-4, atol=1e-9)
    for method in ("hirescam", "occlusion"):
        (maps,) = explainer.explain(image, caption, word_indices=[1], method=method)
        assert maps.cam_patches.shape[1] == PATCHES


def test_attention_against_the_runner_up_is_the_default_and_ends_with_the_mean_shown_first(tiny_llava, caption):
    assert tiny_llava.default_method == "attention_contrast"
    (maps,) = tiny_llava.explain(random_image(5), caption, word_indices=[1])
    assert maps.method == "attention_contrast" and maps.foil is not None
    assert maps.layer_names[-1] == f"language model attention, mean of all {TEXT_LAYERS} layers"
    assert maps.cam_patches[:TEXT_LAYERS].max() > 0, "the mean of blank maps would prove nothing"
    np.testing.assert_allclose(maps.cam_patches[-1], maps.cam_patches[:TEXT_LAYERS].mean(axis=0), rtol=1e-5, atol=1e-9)
    assert tiny_llava.default_layer("attention_contrast") == TEXT_LAYERS


@pytest.mark.parametrize("method", METHODS)
def test_all_words_at_once_equal_each_word_alone(tiny_llava, caption, method):
    image = random_image(6)
    together = tiny_llava.explain(image, caption, method=method)
    assert [maps.word for maps in together] == ANSWER_WORDS
    for index, maps in enumerate(together):
        (alone,) = tiny_llava.explain(image, caption, word_indices=[index], method=method)
        assert maps.score == pytest.approx(alone.score, abs=1e-5)
        np.testing.assert_allclose(maps.cam_patches, alone.cam_patches, rtol=1e-4, atol=1e-9)
        assert maps.cam_patches.shape == (len(tiny_llava.layer_names(method)), PATCHES)
        assert np.isfinite(maps.cam_patches).all() and (maps.cam_patches >= 0).all()


def test_occlusion_is_the_drop_in_log_p_when_a_patch_is_zeroed(tiny_llava, caption, caption_ids):
    image = random_image(7)
    (maps,) = tiny_llava.explain(image, caption, word_indices=[4], method="occlusion")
    word = caption.words[4]  # "blue": the target sums log p over all its pieces
    pixel_values = tiny_llava.pixel_values([image])

    def log_p(pixels: torch.Tensor) -> float:
        with torch.no_grad():
            log_probs = logits_of(tiny_llava, pixels, caption_ids).log_softmax(-1)
        return sum(log_probs[p - 1, caption_ids[p]].item() for p in range(word.start, word.end))

    occluded = pixel_values.clone()
    occluded[:, :, PATCH_SIZE : 2 * PATCH_SIZE, 2 * PATCH_SIZE : 3 * PATCH_SIZE] = 0  # patch row 1, column 2
    expected = max(log_p(pixel_values) - log_p(occluded), 0.0)
    columns = tiny_llava.image_geometry(image.size).views[0].grid_shape[1]
    assert maps.cam_patches[0, 1 * columns + 2] == pytest.approx(expected, abs=1e-5)
    assert maps.cam_patches.max() > 0, "a map of zeros would match any patch whose drop is zero"


@pytest.mark.parametrize("image_size", [(80, 48), (40, 120)])
def test_centre_crop_geometry_matches_the_real_processor(tiny_llava, image_size):
    geometry = tiny_llava.image_geometry(image_size)
    (view,) = geometry.views
    assert view.grid_shape == (IMAGE_SIZE // PATCH_SIZE,) * 2
    assert_patch_boxes_reach_their_own_patches(tiny_llava, image_size)


def test_every_language_model_layer_returns_attention(tiny_llava_dir, tiny_llava, caption_ids):
    """A folder loads with SDPA (no attention probabilities); the explainer switches the
    language model to eager, and every layer then returns its probabilities."""
    from transformers import LlavaForConditionalGeneration

    plain = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir)
    assert plain.config.text_config._attn_implementation != "eager"
    assert tiny_llava.model.config.text_config._attn_implementation == "eager"
    seen = {}
    handles = [
        module.register_forward_hook(lambda m, i, output, slot=slot: seen.__setitem__(slot, output[1]))
        for slot, module in enumerate(tiny_llava.attention_layers)
    ]
    try:
        with torch.no_grad():
            logits_of(tiny_llava, tiny_llava.pixel_values([random_image(8)]), caption_ids)
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(seen) == list(range(TEXT_LAYERS))
    for attention in seen.values():
        assert attention is not None
        assert attention.shape[-2:] == (len(caption_ids), len(caption_ids))
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))


def test_attention_without_eager_fails_loudly(caption, monkeypatch):
    model, processor = build_tiny_llava()
    explainer = explainer_for_model(model, processor)
    model.set_attn_implementation({"text_config": "sdpa"})  # behind the explainer's back
    with pytest.raises(MissingCaptureError, match="eager"):
        explainer.explain(random_image(9), caption, word_indices=[0], method="attention")
    # A model that refuses to switch is refused before any explanation.
    monkeypatch.setattr(model, "set_attn_implementation", lambda implementation: None)
    with pytest.raises(MissingCaptureError, match="eager"):
        LlavaExplainer(model, processor)


def test_no_hook_is_left_even_after_an_error(tiny_llava, caption, monkeypatch):
    image = random_image(10)
    for method in METHODS:  # transformers installs its own capture hooks once, lazily
        tiny_llava.explain(image, caption, word_indices=[0], method=method)
    hooks_before = count_forward_hooks(tiny_llava.model)

    def broken_language_model(*args, **kwargs):
        raise RuntimeError("language model failed")

    # The vision layers run (their hooks fire), then the language model raises.
    monkeypatch.setattr(tiny_llava.model.model.language_model, "forward", broken_language_model)
    for method in ("attention", "hirescam"):
        with pytest.raises(RuntimeError, match="language model failed"):
            tiny_llava.explain(image, caption, method=method)
    assert count_forward_hooks(tiny_llava.model) == hooks_before


def test_explaining_leaves_no_gradient_on_shared_parameters(tiny_llava, caption):
    for method in METHODS:
        tiny_llava.explain(random_image(11), caption, method=method)
    assert all(parameter.grad is None for parameter in tiny_llava.model.parameters())
    assert not any(parameter.requires_grad for parameter in tiny_llava.model.parameters())


def test_threads_sharing_one_explainer_get_what_they_get_alone(tiny_llava, caption):
    jobs = [(random_image(20 + index), index % len(caption.words), method)
            for index, method in enumerate(["attention", "hirescam", "gradcam", "attention"])]
    assert_threads_get_what_they_get_alone(tiny_llava, caption, jobs)


def test_caption_answers_the_instruction_through_the_chat_template(tiny_llava):
    assert tiny_llava.prompt_label == "Instruction" and DEFAULT_INSTRUCTION in tiny_llava.prompt_help
    image = random_image(12)
    caption = tiny_llava.caption(image, max_new_tokens=4)
    prompt = tiny_llava.prompt_ids(image, DEFAULT_INSTRUCTION)[0].tolist()
    assert tiny_llava.prompt_text(DEFAULT_INSTRUCTION) == f"USER: <image>\n{DEFAULT_INSTRUCTION} ASSISTANT:"
    assert caption.prompt_length == len(prompt)
    assert caption.token_ids[: len(prompt)] == tuple(prompt)
    assert len(image_columns(prompt)) == PATCHES
    assert caption.prompt_length < len(caption.token_ids) <= caption.prompt_length + 4
    assert all(word.start >= caption.prompt_length for word in caption.words)
    assert IMAGE_TOKEN_ID not in caption.token_ids[caption.prompt_length :]
    # The explanation's forward pass reads the generated sequence as it is.
    tiny_llava.token_log_probs([image], caption.token_ids)

    asked = tiny_llava.caption(image, prompt="What is in the picture?", max_new_tokens=3)
    asked_prompt = tiny_llava.prompt_ids(image, "What is in the picture?")[0].tolist()
    assert asked_prompt != prompt
    assert asked.token_ids[: len(asked_prompt)] == tuple(asked_prompt)
    assert asked.prompt_length == len(asked_prompt)
    answer = [token_id for token_id in asked.token_ids[asked.prompt_length :] if token_id not in tiny_llava.special_ids]
    assert asked.text == tiny_llava.processor.tokenizer.decode(answer).strip()
    typed_image_token = tiny_llava.caption(image, prompt="What is <image> here?", max_new_tokens=2)
    assert len(image_columns(typed_image_token.token_ids)) == PATCHES
    beams = tiny_llava.caption(image, max_new_tokens=3, num_beams=2)
    assert beams.token_ids[: len(prompt)] == tuple(prompt)


def test_a_prompt_that_fills_every_position_is_refused_with_a_message():
    model, processor = build_tiny_llava(max_positions=40)
    explainer = LlavaExplainer(model, processor)
    assert explainer.max_caption_tokens == 40
    with pytest.raises(PromptTooLongError, match="of the model's 40 token positions"):
        explainer.caption(random_image(13))


def test_the_projector_map_is_gradient_x_input_at_the_image_tokens(tiny_llava, caption):
    # LLaVA-1.5's image tokens are its patches, row-major (CLS dropped before the projector).
    assert_projector_map_is_gradient_x_input(
        tiny_llava, tiny_llava.model.model.language_model, random_image(8), caption, 4, lambda tokens: tokens
    )
