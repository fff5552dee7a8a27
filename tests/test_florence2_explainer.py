"""Florence-2 explainer on a tiny random Florence-2: task captions, alignment across the encoder's
text and the decoder's ids, one-pass equivalences, stage maps on the token grid, occlusion, hooks,
threads, geometry, the page and evaluate.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.cam_methods import gradient_attention, hires_cam
from models.explainer import MissingCaptureError
from models.families import explainer_for_model, load_captioner
from models.florence2_explainer import CAPTION_TASKS, Florence2Explainer
from tests.conftest import random_image
from tests.engine_checks import (
    assert_all_words_at_once_equal_each_alone,
    assert_no_hook_is_left_after_an_error,
    assert_parameters_get_no_gradient,
    assert_threads_get_what_they_get_alone,
)
from tests.geometry_checks import assert_patch_boxes_reach_their_own_patches
from tests.tiny_florence2 import (
    BOS_ID,
    DECODER_LAYERS,
    EOS_ID,
    GRID,
    IMAGE_TOKEN_ID,
    IMAGE_TOKENS,
    STAGES,
    TOKEN_SIZE,
    build_tiny_florence2,
)
from tests.tiny_models import save_tiny

ANSWER = " A red circles and a blue square."
ANSWER_WORDS = ["A", "red", "circles", "and", "a", "blue", "square", "."]
PATCHES = GRID * GRID
METHODS = ["cross_attention_softmax", "cross_attention", "hirescam", "gradcam", "occlusion"]


@pytest.fixture(scope="module")
def tiny_florence2_dir(tmp_path_factory):
    return save_tiny(*build_tiny_florence2(), tmp_path_factory.mktemp("tiny_florence2"))


@pytest.fixture(scope="module")
def tiny_florence2(tiny_florence2_dir) -> Florence2Explainer:
    """Loaded the way the page loads a captioner: config.json's model_type picks the family."""
    explainer = load_captioner(str(tiny_florence2_dir), device="cpu")
    assert isinstance(explainer, Florence2Explainer)
    return explainer


def encoder_text_ids(explainer: Florence2Explainer, task: str = "<CAPTION>") -> list[int]:
    """What the real processor writes after the image ids: <s>, the task's question, </s>."""
    input_ids = explainer.processor(text=task, images=[random_image(0)], return_tensors="pt").input_ids[0].tolist()
    assert input_ids[:IMAGE_TOKENS] == [IMAGE_TOKEN_ID] * IMAGE_TOKENS
    return input_ids[IMAGE_TOKENS:]


@pytest.fixture(scope="module")
def caption_ids(tiny_florence2) -> list[int]:
    """The encoder's text ids, then the decoder's as generate() returns them: </s> <s> answer </s>."""
    answer = tiny_florence2.processor.tokenizer(ANSWER, add_special_tokens=False).input_ids
    return encoder_text_ids(tiny_florence2) + [EOS_ID, BOS_ID] + answer + [EOS_ID]


@pytest.fixture(scope="module")
def caption(tiny_florence2, caption_ids):
    return tiny_florence2.caption_from_ids(caption_ids, len(encoder_text_ids(tiny_florence2)) + 1)


def decoder_logits_by_hand(explainer: Florence2Explainer, pixel_values: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """(decoder ids, V): the projected image tokens put in front of the encoder's text
    embeddings, BART's encoder and decoder run on them, the LM head on the decoder's states."""
    model = explainer.model.model
    encoder_length = ids.index(EOS_ID) + 1
    image_tokens = model.get_image_features(pixel_values).pooler_output  # (1, 17, D)
    text = model.get_input_embeddings()(torch.tensor([ids[:encoder_length]]))
    encoded = model.language_model.encoder(inputs_embeds=torch.cat([image_tokens, text], dim=1)).last_hidden_state
    decoded = model.language_model.decoder(
        input_ids=torch.tensor([ids[encoder_length:]]), encoder_hidden_states=encoded
    ).last_hidden_state
    return explainer.model.lm_head(decoded)[0]


def word_score(log_probs: torch.Tensor, ids: list[int], word, encoder_length: int) -> torch.Tensor:
    """Summed log p of a word's pieces from the decoder's log-probabilities (row j scores the
    decoder's id j + 1)."""
    return sum(log_probs[p - encoder_length - 1, ids[p]] for p in range(word.start, word.end))


def test_only_the_decoders_words_are_words_and_the_task_is_the_prompt(tiny_florence2, caption, caption_ids):
    assert [word.text for word in caption.words] == ANSWER_WORDS
    assert all(word.start >= caption.prompt_length for word in caption.words)
    assert caption.text == ANSWER.strip(), "the caption is the decoder's text: no question, no special ids"
    circles = caption.words[2]
    assert circles.end - circles.start > 1, "the test needs a word of several pieces"
    assert {IMAGE_TOKEN_ID, BOS_ID, EOS_ID} <= tiny_florence2.special_ids
    assert tiny_florence2.encoder_length(caption_ids) == len(encoder_text_ids(tiny_florence2))


def test_logits_before_a_token_score_it(tiny_florence2, caption, caption_ids):
    """Golden value computed by hand through the model's parts, against the off-by-one row."""
    image = random_image(1)
    encoder_length = tiny_florence2.encoder_length(caption_ids)
    with torch.no_grad():
        logits = decoder_logits_by_hand(tiny_florence2, tiny_florence2.pixel_values([image]), caption_ids)
    logits = logits.double().numpy()

    def log_p_by_hand(decoder_row: int, token_id: int) -> float:
        shifted = logits[decoder_row] - logits[decoder_row].max()
        return float(shifted[token_id] - np.log(np.exp(shifted).sum()))

    red = caption.words[1]
    position = red.start
    expected = log_p_by_hand(position - encoder_length - 1, caption_ids[position])
    misaligned = log_p_by_hand(position - encoder_length, caption_ids[position])
    assert abs(expected - misaligned) > 1e-3, "the test must tell the two alignments apart"

    teacher_forced = tiny_florence2.token_log_probs([image], caption_ids)[0]
    # The encoder's ids and the decoder's start id are read, never predicted.
    assert np.isnan(teacher_forced[: encoder_length + 1]).all()
    assert teacher_forced[position] == pytest.approx(expected, abs=1e-5)
    batched = tiny_florence2.token_log_probs([random_image(30), image], caption_ids)
    np.testing.assert_allclose(batched[1], teacher_forced, rtol=1e-5, atol=1e-5)
    assert not np.allclose(batched[0][encoder_length + 1 :], teacher_forced[encoder_length + 1 :])
    (maps,) = tiny_florence2.explain(image, caption, word_indices=[1], piece=0)
    assert maps.score == pytest.approx(expected, abs=1e-5)
    whole_word = sum(log_p_by_hand(p - encoder_length - 1, caption_ids[p]) for p in range(red.start, red.end))
    (maps,) = tiny_florence2.explain(image, caption, word_indices=[1])
    assert maps.score == pytest.approx(whole_word, abs=1e-5)


def capture_and_differentiate(explainer, module, image, ids, word, output_index=0):
    """One hand-written forward pass with a hook on ``module``: its output and the word's gradient."""
    captured: dict[str, torch.Tensor] = {}

    def keep(module, inputs, output, sink=captured) -> None:  # None: output unchanged
        sink.setdefault("output", output[output_index] if isinstance(output, tuple) else output)

    handle = module.register_forward_hook(keep)
    try:
        pixel_values = explainer.pixel_values([image]).requires_grad_(True)
        with torch.enable_grad():
            log_probs = decoder_logits_by_hand(explainer, pixel_values, ids).log_softmax(-1)
            score = word_score(log_probs, ids, word, ids.index(EOS_ID) + 1)
            (gradient,) = torch.autograd.grad(score, captured["output"])
    finally:
        handle.remove()
    return captured["output"].detach(), gradient


def test_all_vision_stages_in_one_pass_equal_one_pass_per_stage(tiny_florence2, caption, caption_ids):
    """Each stage's HiResCAM by hand on its own feature map, averaged over the blocks of its grid
    that one encoder token covers; the last map is the projected tokens after the mean token."""
    image = random_image(3)
    (maps,) = tiny_florence2.explain(image, caption, word_indices=[2], method="hirescam")
    assert maps.layer_names[-1] == f"vision stage {STAGES}/{STAGES}, projected image tokens"
    word = caption.words[2]
    for stage, module in enumerate(tiny_florence2.vision_layers):
        activation, gradient = capture_and_differentiate(tiny_florence2, module, image, caption_ids, word)
        if stage < STAGES - 1:
            side = activation.shape[-1]
            stage_map = hires_cam(activation[0].flatten(1).T, gradient[0].flatten(1).T).reshape(side, side).numpy()
            block = side // GRID
            assert block > 1, "the test needs a stage finer than the token grid"
            expected = stage_map.reshape(GRID, block, GRID, block).mean(axis=(1, 3)).ravel()
        else:
            assert activation.shape[1] == IMAGE_TOKENS
            expected = hires_cam(activation[0, 1:], gradient[0, 1:]).numpy()
        np.testing.assert_allclose(maps.cam_patches[stage], expected, rtol=1e-4, atol=1e-10)
    assert maps.cam_patches.shape == (STAGES, PATCHES)
    assert (maps.cam_patches.max(axis=1) > 0).all()


@pytest.mark.parametrize("method", ["cross_attention", "cross_attention_softmax"])
def test_all_cross_attention_layers_in_one_pass_equal_one_pass_per_layer(tiny_florence2, caption, caption_ids, method):
    image = random_image(4)
    (maps,) = tiny_florence2.explain(image, caption, word_indices=[2], method=method)
    word = caption.words[2]
    encoder_length = tiny_florence2.encoder_length(caption_ids)
    rows = slice(word.start - encoder_length - 1, word.end - encoder_length - 1)  # the decoder's rows
    for layer, module in enumerate(tiny_florence2.cross_attentions):
        attention, gradient = capture_and_differentiate(
            tiny_florence2, module, image, caption_ids, word, output_index=1
        )
        assert attention.shape[-1] == IMAGE_TOKENS + encoder_length, "keys: image tokens, then the prompt"
        per_key = torch.relu(gradient[0] * attention[0])
        if method == "cross_attention_softmax":  # the gradient at the scores: over all keys, the prompt's too
            at_scores = attention[0] * (gradient[0] - (attention[0] * gradient[0]).sum(dim=-1, keepdim=True))
            per_key = (per_key + torch.relu(at_scores)) / 2
        by_hand = per_key[:, rows, 1:IMAGE_TOKENS].mean(dim=0).sum(dim=0)
        np.testing.assert_allclose(maps.cam_patches[layer], by_hand.numpy(), rtol=1e-4, atol=1e-10)
        if method == "cross_attention":
            np.testing.assert_allclose(
                by_hand.numpy(),
                gradient_attention(attention[0][:, rows].transpose(0, 1), gradient[0][:, rows].transpose(0, 1))
                .sum(dim=0)[1:IMAGE_TOKENS].numpy(),
                rtol=1e-5, atol=1e-10,
            )
        assert by_hand.max() > 0
    assert maps.cam_patches.shape == (DECODER_LAYERS + 1, PATCHES)
    np.testing.assert_allclose(maps.cam_patches[-1], maps.cam_patches[:-1].mean(axis=0), rtol=1e-5, atol=1e-12)
    assert tiny_florence2.default_method == "cross_attention_softmax"
    assert tiny_florence2.default_layer(method) == DECODER_LAYERS


@pytest.mark.parametrize("method", METHODS)
def test_all_words_at_once_equal_each_word_alone(tiny_florence2, caption, method):
    assert [word.text for word in caption.words] == ANSWER_WORDS
    assert_all_words_at_once_equal_each_alone(tiny_florence2, caption, random_image(6), method, PATCHES)


def test_occlusion_is_the_drop_in_log_p_when_a_patch_is_zeroed(tiny_florence2, caption, caption_ids):
    image = random_image(7)
    (maps,) = tiny_florence2.explain(image, caption, word_indices=[5], method="occlusion")
    word = caption.words[5]
    encoder_length = tiny_florence2.encoder_length(caption_ids)
    pixel_values = tiny_florence2.pixel_values([image])

    def log_p(pixels: torch.Tensor) -> float:
        with torch.no_grad():
            log_probs = decoder_logits_by_hand(tiny_florence2, pixels, caption_ids).log_softmax(-1)
        return float(word_score(log_probs, caption_ids, word, encoder_length))

    occluded = pixel_values.clone()
    occluded[:, :, TOKEN_SIZE : 2 * TOKEN_SIZE, 2 * TOKEN_SIZE : 3 * TOKEN_SIZE] = 0  # token row 1, column 2
    expected = max(log_p(pixel_values) - log_p(occluded), 0.0)
    assert maps.cam_patches[0, 1 * GRID + 2] == pytest.approx(expected, abs=1e-5)
    assert maps.cam_patches.max() > 0, "a map of zeros would match any patch whose drop is zero"


@pytest.mark.parametrize("image_size", [(80, 48), (40, 120)])
def test_squash_geometry_matches_the_real_processor(tiny_florence2, image_size):
    (view,) = tiny_florence2.image_geometry(image_size).views
    assert view.grid_shape == (GRID, GRID)
    assert_patch_boxes_reach_their_own_patches(tiny_florence2, image_size)


def test_captions_come_from_the_caption_tasks(tiny_florence2):
    assert tiny_florence2.prompt_choices == CAPTION_TASKS and tiny_florence2.prompt_label == "Task"
    image = random_image(12)
    for task in ("", *CAPTION_TASKS):
        caption = tiny_florence2.caption(image, prompt=task, max_new_tokens=4)
        text_ids = encoder_text_ids(tiny_florence2, task or CAPTION_TASKS[0])
        assert caption.token_ids[: len(text_ids)] == tuple(text_ids)
        assert caption.prompt_length == len(text_ids) + 1
        assert caption.token_ids[len(text_ids) : len(text_ids) + 2] == (EOS_ID, BOS_ID), "</s> <s> start the decoder"
        assert len(text_ids) + 2 < len(caption.token_ids) <= len(text_ids) + 1 + 4
        assert caption.words, "the tiny model's generation config keeps it from repeating <s>"
        answer = [
            token_id for token_id in caption.token_ids[caption.prompt_length :]
            if token_id not in tiny_florence2.special_ids
        ]
        assert caption.text == tiny_florence2.processor.tokenizer.decode(answer).strip()
        tiny_florence2.explain(image, caption, word_indices=[0])  # the explanation reads it as it is
    detailed = encoder_text_ids(tiny_florence2, "<DETAILED_CAPTION>")
    assert detailed != encoder_text_ids(tiny_florence2, "<CAPTION>")
    beams = tiny_florence2.caption(image, prompt="<DETAILED_CAPTION>", max_new_tokens=3, num_beams=2)
    assert beams.token_ids[: len(detailed)] == tuple(detailed)


@pytest.mark.parametrize("prompt", ["<OD>", "a </s> in the question"])
def test_other_tasks_and_special_tokens_are_refused_with_a_message(tiny_florence2, prompt):
    with pytest.raises(ValueError, match="captioner|special tokens"):
        tiny_florence2.caption(random_image(13), prompt=prompt, max_new_tokens=2)


def test_sdpa_cross_attention_fails_loudly(caption, monkeypatch):
    model, processor = build_tiny_florence2()
    explainer = explainer_for_model(model, processor)
    model.set_attn_implementation({"text_config": "sdpa"})  # behind the explainer's back
    with pytest.raises(MissingCaptureError, match="eager"):
        explainer.explain(random_image(9), caption, word_indices=[0], method="cross_attention")
    monkeypatch.setattr(model, "set_attn_implementation", lambda implementation: None)
    with pytest.raises(MissingCaptureError, match="eager"):
        Florence2Explainer(model, processor)


def test_no_hook_is_left_even_after_an_error(tiny_florence2, caption):
    # The vision tower and the encoder run (their hooks fire), then the decoder raises.
    decoder = tiny_florence2.model.model.language_model.decoder
    assert_no_hook_is_left_after_an_error(
        tiny_florence2, caption, random_image(10), METHODS, decoder, ("cross_attention", "hirescam")
    )


def test_explaining_leaves_no_gradient_on_shared_parameters(tiny_florence2, caption):
    assert_parameters_get_no_gradient(tiny_florence2, caption, random_image(11), METHODS)


def test_threads_sharing_one_explainer_get_what_they_get_alone(tiny_florence2, caption):
    jobs = [(random_image(20 + index), index % len(caption.words), method)
            for index, method in enumerate(["cross_attention", "hirescam", "gradcam", "cross_attention"])]
    assert_threads_get_what_they_get_alone(tiny_florence2, caption, jobs)


def test_sanity_check_copy_randomises_the_top_vision_blocks(tiny_florence2, caption_ids):
    image = random_image(31)
    before = {name: value.clone() for name, value in tiny_florence2.model.state_dict().items()}
    randomised = tiny_florence2.randomised_copy(top_layers=1, seed=0)
    assert tiny_florence2.vision_tower_layers()[-1] is tiny_florence2.model.model.vision_tower.blocks[-1][-1]
    pixel_values = tiny_florence2.pixel_values([image])
    with torch.no_grad():
        trained_tokens = tiny_florence2.model.get_image_features(pixel_values).pooler_output
        random_tokens = randomised.model.get_image_features(pixel_values).pooler_output
    assert (random_tokens - trained_tokens).abs().max() > 1e-2, "the image tokens the encoder reads change"
    # A random tiny BART barely reads the image, but it does read it: not one log p stays equal.
    encoder_length = tiny_florence2.encoder_length(caption_ids)
    trained = tiny_florence2.token_log_probs([image], caption_ids)[0, encoder_length + 1 :]
    assert np.abs(randomised.token_log_probs([image], caption_ids)[0, encoder_length + 1 :] - trained).max() > 1e-5
    for name, value in tiny_florence2.model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_the_page_captions_with_the_task_chosen_in_the_sidebar(tiny_florence2_dir, monkeypatch):
    """The whole page runs for every family in test_app_families.py; here, the task select box
    reaches ``caption``."""
    from tests.app_helpers import pick_example, start_app

    asked_tasks = []
    original_caption = Florence2Explainer.caption

    def recording_caption(self, image, prompt="", *args, **kwargs):
        asked_tasks.append(prompt)
        return original_caption(self, image, prompt, *args, **kwargs)

    monkeypatch.setattr(Florence2Explainer, "caption", recording_caption)
    monkeypatch.setenv("VLM_EXPLAINER_CAPTIONER_DIR", str(tiny_florence2_dir))
    app = start_app()
    local = next(label for label in app.sidebar.selectbox(key="model_label").options if label.startswith("Local"))
    app.sidebar.selectbox(key="model_label").set_value(local).run()
    app.sidebar.selectbox(key="prompt_choice").set_value("<MORE_DETAILED_CAPTION>").run()
    pick_example(app, "photo_chelsea.jpg")
    assert not app.exception, app.exception
    assert asked_tasks and set(asked_tasks) == {"<MORE_DETAILED_CAPTION>"}
    assert app.button_group[0].options, "the caption's words are offered"
