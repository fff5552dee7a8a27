"""LLaVA-OneVision explainer on tiny random models: a global view plus tiles of a padded canvas,
unpadded and (with anyres_max_1) shrunk packed image tokens, captions through the chat template,
alignment in one long sequence, one-pass equivalences, geometry against the real processor,
hooks, threads. Every test runs on both packings (anyres_max_9: none of these sizes shrinks;
anyres_max_1: every tiled grid does)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from models.cam_methods import gradient_attention, hires_cam
from models.explainer import DEFAULT_INSTRUCTION, PromptTooLongError
from models.families import load_captioner
from models.hooks import capture_outputs
from models.llava_onevision_explainer import LlavaOnevisionExplainer
from tests.conftest import random_image
from tests.engine_checks import assert_projector_map_is_gradient_x_input, assert_threads_get_what_they_get_alone
from tests.geometry_checks import MIN_WHITENESS
from tests.tiny_llava_onevision import (
    GRID,
    PATCH_SIZE,
    TEXT_LAYERS,
    VISION_LAYERS,
    build_tiny_llava_onevision,
    save_tiny_llava_onevision,
)
from tests.tiny_qwen2vl import IM_END_ID

ANSWER = "a red dog on grassy squares."
IMAGE_SIZE = (50, 40)  # (width, height): a 2 x 2 tile canvas, padded above and below
METHODS = ["attention", "hirescam", "gradcam", "projector", "occlusion"]


@pytest.fixture(scope="module", params=[9, 1], ids=["anyres_max_9", "anyres_max_1"])
def tiny_ov_dir(request, tmp_path_factory):
    model, processor = build_tiny_llava_onevision(max_tiles=request.param)
    return save_tiny_llava_onevision(model, processor, tmp_path_factory.mktemp(f"onevision{request.param}"))


@pytest.fixture(scope="module")
def tiny_ov(tiny_ov_dir) -> LlavaOnevisionExplainer:
    explainer = load_captioner(str(tiny_ov_dir), device="cpu")
    assert type(explainer) is LlavaOnevisionExplainer
    return explainer


def prompt_and_answer_batch(explainer, image: Image.Image, answer: str = ANSWER) -> dict:
    """The processor's own inputs for the templated instruction plus an answer and <|im_end|>."""
    text = explainer.prompt_text(DEFAULT_INSTRUCTION) + answer + "<|im_end|>"
    return explainer.processor(images=[image], text=[text], return_tensors="pt")


@pytest.fixture(scope="module")
def caption(tiny_ov):
    image = random_image(0, IMAGE_SIZE)
    prompt_length = len(tiny_ov.prompt_ids(image, DEFAULT_INSTRUCTION)[0])
    ids = prompt_and_answer_batch(tiny_ov, image)["input_ids"][0].tolist()
    return tiny_ov.caption_from_ids(ids, prompt_length)


def shrinks(explainer, image_size) -> bool:
    layout = explainer.layout(image_size)
    return layout.packed_shape != (len(layout.kept_rows), len(layout.kept_columns))


def image_token_count(explainer, image_size) -> int:
    rows, columns = explainer.layout(image_size).packed_shape
    return GRID * GRID + rows * (columns + 1)


def test_loaded_through_its_config_with_eager_attention_and_every_vision_layer(tiny_ov):
    assert tiny_ov.model.config.text_config._attn_implementation == "eager"
    assert len(tiny_ov.vision_layers) == VISION_LAYERS  # the projector reads the last layer
    assert tiny_ov.prefix_tokens == 0, "SigLIP has no CLS token"
    assert not hasattr(tiny_ov.processor, "video_processor")
    assert tiny_ov.default_method == "attention_contrast"


def test_answer_words_only_and_image_tokens_as_the_layout_counts_them(tiny_ov, caption):
    assert [word.text for word in caption.words] == ["a", "red", "dog", "on", "grassy", "squares", "."]
    assert caption.text == ANSWER
    assert all(word.start >= caption.prompt_length for word in caption.words)
    assert caption.token_ids[-1] == IM_END_ID
    assert caption.words[4].end - caption.words[4].start > 1, "the tests need a word of several pieces"
    assert tiny_ov.image_token_id in tiny_ov.special_ids
    assert caption.token_ids.count(tiny_ov.image_token_id) == image_token_count(tiny_ov, IMAGE_SIZE)


@pytest.mark.parametrize("image_size", [(50, 40), (40, 90), (80, 30), (70, 70), (31, 29)])
def test_layout_is_the_processors_and_the_models(tiny_ov, image_size):
    """Tiles as many as the processor cuts, image tokens as many as it writes (and the model fills)."""
    image = random_image(1, image_size)
    layout = tiny_ov.layout(image_size)
    batch = tiny_ov.processor.image_processor(images=[image], return_tensors="pt")
    assert batch["pixel_values"].shape[1] == 1 + layout.tiles[0] * layout.tiles[1]
    prompt = tiny_ov.prompt_ids(image, DEFAULT_INSTRUCTION)[0].tolist()
    assert prompt.count(tiny_ov.image_token_id) == image_token_count(tiny_ov, image_size)


def test_caption_goes_through_the_chat_template_with_the_instruction(tiny_ov):
    image = random_image(8, IMAGE_SIZE)
    caption = tiny_ov.caption(image, max_new_tokens=4)
    prompt = tiny_ov.processor(images=[image], text=[tiny_ov.prompt_text(DEFAULT_INSTRUCTION)])
    prompt_ids = tuple(prompt["input_ids"][0])
    assert caption.token_ids[: caption.prompt_length] == prompt_ids
    assert caption.prompt_length < len(caption.token_ids) <= caption.prompt_length + 4
    asked = tiny_ov.caption(image, prompt="What colour is the dog?", max_new_tokens=3)
    asked_prompt = tiny_ov.processor.tokenizer.decode(list(asked.token_ids[: asked.prompt_length]))
    assert "What colour is the dog?" in asked_prompt and DEFAULT_INSTRUCTION not in asked_prompt
    assert asked_prompt.endswith("<|im_start|>assistant\n")


def test_a_prompt_that_fills_every_position_is_refused_with_a_message():
    explainer = LlavaOnevisionExplainer(*build_tiny_llava_onevision(max_positions=60))
    assert explainer.max_caption_tokens == 60
    with pytest.raises(PromptTooLongError, match="of the model's 60 token positions"):
        explainer.caption(random_image(13, (70, 70)))


def test_logits_before_a_token_score_it(tiny_ov, caption):
    """Golden value: log p(ids[p]) comes from logits[p - 1] of the model's own forward pass on
    the processor's inputs, computed here in numpy."""
    image = random_image(0, IMAGE_SIZE)
    with torch.no_grad():
        logits = tiny_ov.model(**prompt_and_answer_batch(tiny_ov, image)).logits[0].double().numpy()

    def log_p_by_hand(row: int, token_id: int) -> float:
        shifted = logits[row] - logits[row].max()
        return float(shifted[token_id] - np.log(np.exp(shifted).sum()))

    red_position = caption.words[1].start
    expected = log_p_by_hand(red_position - 1, caption.token_ids[red_position])
    assert abs(expected - log_p_by_hand(red_position, caption.token_ids[red_position])) > 1e-3
    assert tiny_ov.token_log_probs([image], caption.token_ids)[0][red_position] == pytest.approx(expected, abs=1e-5)
    grassy = caption.words[4]
    (maps,) = tiny_ov.explain(image, caption, word_indices=[4], method="hirescam")
    by_hand = sum(log_p_by_hand(p - 1, caption.token_ids[p]) for p in range(grassy.start, grassy.end))
    assert maps.score == pytest.approx(by_hand, abs=1e-5)


def one_word_pass(explainer, image, caption, word_index, module, output_index=0):
    """(output, gradient) of one module for one word, from a forward pass of the model's own."""
    batch = prompt_and_answer_batch(explainer, image)
    word = caption.words[word_index]
    captured: dict[str, torch.Tensor] = {}

    def keep(module, inputs, output):
        captured.setdefault("output", output[output_index] if isinstance(output, tuple) else output)

    handle = module.register_forward_hook(keep)
    try:
        pixel_values = batch["pixel_values"].requires_grad_(True)
        with torch.enable_grad():
            log_probs = explainer.model(**{**batch, "pixel_values": pixel_values}).logits[0].log_softmax(-1)
            score = sum(log_probs[p - 1, caption.token_ids[p]] for p in range(word.start, word.end))
            (gradient,) = torch.autograd.grad(score, captured["output"])
    finally:
        handle.remove()
    return captured["output"].detach(), gradient


def test_packed_image_tokens_hold_the_patches_the_explainer_gives_them(tiny_ov):
    """Against the model's own packing (unpad, shrink, newlines): unshrunk, the packed token of
    each patch is that patch's projector output; shrunk, every packed token but the newlines
    is some patch's, and no patch points at a newline."""
    image = random_image(2, IMAGE_SIZE)
    inputs = tiny_ov.model_inputs([image])
    model = tiny_ov.model.model
    with torch.no_grad(), capture_outputs([model.multi_modal_projector]) as captured:
        features = model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    (packed,) = features.pooler_output
    per_patch = captured[0].reshape(-1, captured[0].shape[-1])  # (views x grid^2, D), vision-token order
    vision_tokens, image_tokens = tiny_ov.vision_token_of_patch(inputs), tiny_ov.image_token_of_patch(inputs)
    assert len(packed) == image_token_count(tiny_ov, IMAGE_SIZE)
    newlines = torch.isclose(packed, model.image_newline.expand_as(packed)).all(dim=1)
    assert not newlines[image_tokens].any()
    assert set(image_tokens.tolist()) == set(torch.nonzero(~newlines).ravel().tolist())
    if not shrinks(tiny_ov, IMAGE_SIZE):
        torch.testing.assert_close(packed[image_tokens], per_patch[vision_tokens])


def test_all_vision_layers_in_one_pass_equal_one_pass_per_layer(tiny_ov, caption):
    image = random_image(3, IMAGE_SIZE)
    inputs = tiny_ov.model_inputs([image])
    (maps,) = tiny_ov.explain(image, caption, word_indices=[4], method="hirescam")
    assert maps.cam_patches.shape == (VISION_LAYERS, tiny_ov.image_geometry(IMAGE_SIZE).patch_count)
    for layer_index, layer in enumerate(tiny_ov.vision_layers):
        output, gradient = one_word_pass(tiny_ov, image, caption, 4, layer)  # (views, grid^2, D)
        expected = hires_cam(output, gradient).ravel()[tiny_ov.vision_token_of_patch(inputs)]
        np.testing.assert_allclose(maps.cam_patches[layer_index], expected.numpy(), rtol=1e-4, atol=1e-9)
    assert maps.cam_patches.max() > 0


def test_all_language_layers_in_one_pass_equal_one_pass_per_layer(tiny_ov, caption):
    image = random_image(4, IMAGE_SIZE)
    inputs = tiny_ov.model_inputs([image])
    word = caption.words[4]
    image_columns = [p for p, token in enumerate(caption.token_ids) if token == tiny_ov.image_token_id]
    (maps,) = tiny_ov.explain(image, caption, word_indices=[4], method="attention")
    for layer_index, attention_module in enumerate(tiny_ov.attention_layers):
        attention, gradient = one_word_pass(tiny_ov, image, caption, 4, attention_module, output_index=1)
        rows = slice(word.start - 1, word.end - 1)
        per_piece = gradient_attention(attention[0, :, rows].transpose(0, 1), gradient[0, :, rows].transpose(0, 1))
        expected = per_piece.sum(0)[image_columns][tiny_ov.image_token_of_patch(inputs)]
        np.testing.assert_allclose(maps.cam_patches[layer_index], expected.numpy(), rtol=1e-4, atol=1e-9)
    assert maps.cam_patches[:TEXT_LAYERS].max() > 0, "the mean of blank maps would prove nothing"
    np.testing.assert_allclose(maps.cam_patches[-1], maps.cam_patches[:TEXT_LAYERS].mean(axis=0), rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_all_words_at_once_equal_each_word_alone(tiny_ov, caption, method):
    image = random_image(5, IMAGE_SIZE)
    together = tiny_ov.explain(image, caption, method=method)
    for index, maps in enumerate(together):
        (alone,) = tiny_ov.explain(image, caption, word_indices=[index], method=method)
        assert maps.score == pytest.approx(alone.score, abs=1e-5)
        np.testing.assert_allclose(maps.cam_patches, alone.cam_patches, rtol=1e-4, atol=1e-9)
        patches = tiny_ov.image_geometry(IMAGE_SIZE).patch_count
        assert maps.cam_patches.shape == (len(tiny_ov.layer_names(method)), patches)
        assert np.isfinite(maps.cam_patches).all() and (maps.cam_patches >= 0).all()


def test_the_projector_map_is_gradient_x_input_at_the_image_tokens(tiny_ov, caption):
    if shrinks(tiny_ov, IMAGE_SIZE):
        pytest.skip("a shrunk grid blends projector outputs: the language model's inputs are not the projector's")
    image = random_image(9, IMAGE_SIZE)
    token_of_patch = tiny_ov.image_token_of_patch(tiny_ov.model_inputs([image]))
    assert_projector_map_is_gradient_x_input(
        tiny_ov, tiny_ov.model.model.language_model, image, caption, 1, lambda tokens: tokens[token_of_patch]
    )


def test_occlusion_is_the_drop_in_log_p_when_a_patch_of_a_view_is_zeroed(tiny_ov, caption):
    image = random_image(6, IMAGE_SIZE)
    (maps,) = tiny_ov.explain(image, caption, word_indices=[2], method="occlusion")
    position = caption.words[2].start
    batch = prompt_and_answer_batch(tiny_ov, image)
    view_token = tiny_ov.vision_token_of_patch(tiny_ov.model_inputs([image]))

    def log_p(pixel_values: torch.Tensor) -> float:
        with torch.no_grad():
            logits = tiny_ov.model(**{**batch, "pixel_values": pixel_values}).logits
        return logits[0, position - 1].log_softmax(-1)[caption.token_ids[position]].item()

    strongest = int(maps.cam_patches[0].argmax())
    assert maps.cam_patches[0, strongest] > 1e-4, "the test needs a patch that matters"
    for patch in (strongest, GRID * GRID + 1):  # and the first tile's second kept patch
        view, local = divmod(int(view_token[patch]), GRID * GRID)
        top, left = (index * PATCH_SIZE for index in divmod(local, GRID))
        occluded = batch["pixel_values"].clone()
        occluded[0, view, :, top : top + PATCH_SIZE, left : left + PATCH_SIZE] = 0
        expected = max(log_p(batch["pixel_values"]) - log_p(occluded), 0.0)
        assert maps.cam_patches[0, patch] == pytest.approx(expected, abs=1e-5)


def view_patch_brightness(explainer, pixels: np.ndarray) -> np.ndarray:
    """(views x grid^2,) mean of each patch of each view the real processor makes of ``pixels``;
    the last px of a view, seen by no patch, left out."""
    batch = explainer.processor.image_processor(images=[Image.fromarray(pixels)], return_tensors="np")
    (views,) = batch["pixel_values"]
    seen = views[:, :, : GRID * PATCH_SIZE, : GRID * PATCH_SIZE].mean(axis=1)
    return seen.reshape(len(views), GRID, PATCH_SIZE, GRID, PATCH_SIZE).mean(axis=(2, 4)).ravel()


@pytest.mark.parametrize("image_size", [(50, 40), (40, 90), (80, 30), (31, 29)])
def test_geometry_matches_the_real_processor(tiny_ov, image_size):
    """Each patch's box, painted white on black and sent through the real image processor, is
    brightest at that patch's own token among the patches of its view (global view or tile)."""
    geometry = tiny_ov.image_geometry(image_size)
    batch = tiny_ov.processor.image_processor(images=[random_image(0, image_size)], return_tensors="pt")
    view_token = tiny_ov.vision_token_of_patch(batch).numpy()
    black = np.zeros((image_size[1], image_size[0], 3), dtype=np.uint8)
    darkest = view_patch_brightness(tiny_ov, black)
    white_over_image = view_patch_brightness(tiny_ov, black + 255) - darkest  # less where a patch is over padding
    per_view = GRID * GRID
    for patch_id in range(geometry.patch_count):
        box = geometry.patch_box_image(patch_id)
        pixels = black.copy()
        pixels[box.y0 : box.y1, box.x0 : box.x1] = 255
        gain = view_patch_brightness(tiny_ov, pixels) - darkest
        view = view_token[patch_id] // per_view
        # Where: one scale for every patch (a patch mostly over padding is never the whitest).
        found = view * per_view + int(gain[view * per_view : (view + 1) * per_view].argmax())
        assert found == view_token[patch_id], f"patch {patch_id} (box {box} of {image_size}) lands on token {found}"
        # How much: the box whitens (nearly) all of the patch's part that lies on the image.
        assert gain[found] / white_over_image[found] >= MIN_WHITENESS, (patch_id, box)


def test_every_language_layer_returns_attention_and_sdpa_fails_loudly(tiny_ov, caption):
    image = random_image(7, IMAGE_SIZE)
    with torch.no_grad(), capture_outputs(tiny_ov.attention_layers, output_index=1) as captured:
        tiny_ov.teacher_forced_logits(tiny_ov.model_inputs([image]), torch.tensor([caption.token_ids]))
    assert all(value is not None and value.shape[-1] == len(caption.token_ids) for value in captured)
    assert len(captured) == TEXT_LAYERS
    sdpa = LlavaOnevisionExplainer(*build_tiny_llava_onevision(max_tiles=tiny_ov.max_tiles))
    sdpa.model.set_attn_implementation({"text_config": "sdpa"})  # as a careless later change would
    with pytest.raises(RuntimeError, match="attn_implementation='eager'"):
        sdpa.explain(image, caption, word_indices=[1], method="attention")


def test_no_hook_is_left_even_after_an_error(tiny_ov, caption, monkeypatch):
    image = random_image(9, IMAGE_SIZE)
    hooks_before = sum(len(module._forward_hooks) for module in tiny_ov.model.modules())

    def broken_language_model(*args, **kwargs):
        raise RuntimeError("language model failed")

    monkeypatch.setattr(tiny_ov.model.model.language_model, "forward", broken_language_model)
    for method in ("hirescam", "attention", "projector", "occlusion"):
        with pytest.raises(RuntimeError, match="language model failed"):
            tiny_ov.explain(image, caption, method=method)
    assert sum(len(module._forward_hooks) for module in tiny_ov.model.modules()) == hooks_before


def test_explaining_leaves_no_gradient_on_shared_parameters(tiny_ov, caption):
    for method in tiny_ov.methods:
        tiny_ov.explain(random_image(12, IMAGE_SIZE), caption, word_indices=[1, 4], method=method)
    assert all(parameter.grad is None for parameter in tiny_ov.model.parameters())


def test_threads_sharing_one_explainer_get_bit_equal_results(tiny_ov, caption):
    jobs = [
        (random_image(20 + index, IMAGE_SIZE), index % len(caption.words), method)
        for index, method in enumerate(["attention", "hirescam", "projector", "attention"])
    ]
    assert_threads_get_what_they_get_alone(tiny_ov, caption, jobs)


def test_a_hub_style_folder_with_a_video_processor_section_loads(tiny_ov_dir):
    processor_config = json.loads((tiny_ov_dir / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "LlavaOnevisionProcessor"
    assert "video_processor" in processor_config
    explainer = LlavaOnevisionExplainer.from_pretrained(str(tiny_ov_dir), device="cpu")
    assert explainer.processor.num_image_tokens == GRID * GRID
