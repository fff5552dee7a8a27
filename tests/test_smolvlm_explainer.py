"""SmolVLM explainer on a tiny random SmolVLM: chat template, alignment, tiles, one-pass
equivalences, eager attention, hooks, threads."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Idefics3Processor

from models.cam_methods import gradient_attention, hires_cam
from models.explainer import PromptTooLongError
from models.families import load_captioner
from models.hooks import capture_outputs
from models.smolvlm_explainer import DEFAULT_INSTRUCTION, Idefics3Explainer, SmolVLMExplainer
from tests.conftest import random_image
from tests.engine_checks import assert_projector_map_is_gradient_x_input, assert_threads_get_what_they_get_alone
from tests.geometry_checks import MIN_WHITENESS
from tests.tiny_smolvlm import END_OF_UTTERANCE, build_tiny_smolvlm, save_tiny_smolvlm

IMAGE_SIZE = (48, 40)  # random_image's default: 2 x 2 tiles plus the global view
ANSWER = " a red circle and two squares."


@pytest.fixture(scope="module", params=["smolvlm", "idefics3"])
def tiny_smolvlm(request, tmp_path_factory) -> SmolVLMExplainer:
    """Every test runs on both names of the architecture, loaded from their folders."""
    folder = save_tiny_smolvlm(tmp_path_factory.mktemp(f"tiny_{request.param}"), model_type=request.param)
    return load_captioner(str(folder), device="cpu")


@pytest.fixture(scope="module")
def caption(tiny_smolvlm):
    """The chat prompt for a 48 x 40 image, then ANSWER and the end of the utterance."""
    tokenizer = tiny_smolvlm.processor.tokenizer
    prompt = tiny_smolvlm.prompt_ids(random_image(0), DEFAULT_INSTRUCTION)
    answer = tokenizer(ANSWER, add_special_tokens=False).input_ids
    ids = prompt + answer + [tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)]
    return tiny_smolvlm.caption_from_ids(ids, len(prompt))


def count_forward_hooks(model: torch.nn.Module) -> int:
    return sum(len(module._forward_hooks) for module in model.modules())


def logits_of(explainer, image, ids, pixel_values=None) -> torch.Tensor:
    inputs = explainer.model_inputs([image])
    with torch.no_grad():
        return explainer.model(
            input_ids=torch.tensor([list(ids)]),
            pixel_values=inputs["pixel_values"] if pixel_values is None else pixel_values,
            pixel_attention_mask=inputs["pixel_attention_mask"],
        ).logits[0]


def test_loaded_through_its_config_with_eager_attention_in_every_language_layer(tiny_smolvlm, caption):
    expected = {"smolvlm": SmolVLMExplainer, "idefics3": Idefics3Explainer}[tiny_smolvlm.model.config.model_type]
    assert type(tiny_smolvlm) is expected
    inputs = tiny_smolvlm.model_inputs([random_image(0)])
    with capture_outputs(tiny_smolvlm.attentions, output_index=1) as captured, torch.no_grad():
        tiny_smolvlm.teacher_forced_logits(inputs, torch.tensor([caption.token_ids]))
    length = len(caption.token_ids)
    assert len(captured) == tiny_smolvlm.model.config.text_config.num_hidden_layers
    for attention in captured:
        assert attention is not None and attention.shape[-2:] == (length, length)
        torch.testing.assert_close(attention.sum(-1), torch.ones_like(attention.sum(-1)))


def test_the_explainer_asks_for_eager_attention_and_fails_loudly_without_it(caption):
    model, processor = build_tiny_smolvlm()
    model.set_attn_implementation({"text_config": "sdpa"})  # as transformers loads it by default
    explainer = SmolVLMExplainer(model, processor)
    assert model.config.text_config._attn_implementation == "eager"
    (maps,) = explainer.explain(random_image(0), caption, word_indices=[0], method="attention")
    assert maps.cam_patches.max() > 0
    model.set_attn_implementation({"text_config": "sdpa"})  # as if someone switched it back
    with pytest.raises(RuntimeError, match="attn_implementation='eager'"):
        explainer.explain(random_image(0), caption, word_indices=[0], method="attention")


def test_words_are_the_answer_only(tiny_smolvlm, caption):
    assert [word.text for word in caption.words] == ["a", "red", "circle", "and", "two", "squares", "."]
    assert caption.words[0].start == caption.prompt_length
    assert caption.text.endswith(ANSWER.strip())
    tokenizer = tiny_smolvlm.processor.tokenizer
    for token in ("<image>", "<fake_token_around_image>", "<global-img>", "<row_1_col_1>", END_OF_UTTERANCE):
        assert tokenizer.convert_tokens_to_ids(token) in tiny_smolvlm.special_ids, token
    assert caption.token_ids.count(tiny_smolvlm.image_token_id) == 5 * tiny_smolvlm.tokens_per_tile


def test_caption_answers_the_instruction_through_the_chat_template(tiny_smolvlm):
    image = random_image(8)
    tokenizer = tiny_smolvlm.processor.tokenizer
    caption = tiny_smolvlm.caption(image, max_new_tokens=4)
    prompt = tokenizer.decode(caption.token_ids[: caption.prompt_length])
    assert prompt.startswith("<|im_start|>User:")
    assert prompt.endswith(f"{DEFAULT_INSTRUCTION}{END_OF_UTTERANCE}\nAssistant:")
    assert caption.prompt_length == len(tiny_smolvlm.prompt_ids(image, DEFAULT_INSTRUCTION))
    assert caption.prompt_length < len(caption.token_ids) <= caption.prompt_length + 4
    assert all(word.start >= caption.prompt_length for word in caption.words)
    asked = tiny_smolvlm.caption(image, prompt="What colour is the square?", max_new_tokens=3)
    asked_prompt = tokenizer.decode(asked.token_ids[: asked.prompt_length])
    assert "What colour is the square?" in asked_prompt and DEFAULT_INSTRUCTION not in asked_prompt
    beams = tiny_smolvlm.caption(image, max_new_tokens=3, num_beams=2)
    assert beams.token_ids[: beams.prompt_length] == caption.token_ids[: caption.prompt_length]
    assert beams.prompt_length < len(beams.token_ids) <= beams.prompt_length + 3


def test_logits_before_a_token_score_it(tiny_smolvlm, caption):
    """Golden value: log p(ids[p]) comes from logits[p - 1], computed here by hand in numpy."""
    image = random_image(0)
    logits = logits_of(tiny_smolvlm, image, caption.token_ids).double().numpy()

    def log_p_by_hand(row: int, token_id: int) -> float:
        shifted = logits[row] - logits[row].max()
        return float(shifted[token_id] - np.log(np.exp(shifted).sum()))

    red = caption.words[1].start
    expected = log_p_by_hand(red - 1, caption.token_ids[red])
    misaligned = log_p_by_hand(red, caption.token_ids[red])
    assert abs(expected - misaligned) > 1e-3, "the test must tell the two alignments apart"
    teacher_forced = tiny_smolvlm.token_log_probs([image], caption.token_ids)[0]
    assert np.isnan(teacher_forced[0])
    assert teacher_forced[red] == pytest.approx(expected, abs=1e-5)
    (maps,) = tiny_smolvlm.explain(image, caption, word_indices=[1], method="attention")
    assert maps.score == pytest.approx(expected, abs=1e-5)


def test_a_multi_piece_word_scores_the_sum_of_its_pieces(tiny_smolvlm, caption):
    squares = caption.words[5]
    assert squares.end - squares.start > 1, "the test needs a word of several pieces"
    image = random_image(1)
    per_token = tiny_smolvlm.token_log_probs([image], caption.token_ids)[0]
    (maps,) = tiny_smolvlm.explain(image, caption, word_indices=[5], method="attention")
    assert maps.score == pytest.approx(per_token[squares.start : squares.end].sum(), abs=1e-5)


def one_pass_gradient(explainer, image, caption, word_index, module, output_index=0):
    """(output, gradient) of one module for one word, from a forward pass of its own."""
    word = caption.words[word_index]
    with capture_outputs([module], output_index=output_index) as captured, torch.enable_grad():
        inputs = explainer.model_inputs([image])
        pixel_values = inputs["pixel_values"].requires_grad_(True)
        logits = explainer.model(
            input_ids=torch.tensor([caption.token_ids]),
            pixel_values=pixel_values,
            pixel_attention_mask=inputs["pixel_attention_mask"],
        ).logits
        log_probs = logits[0].log_softmax(-1)
        score = sum(log_probs[p - 1, caption.token_ids[p]] for p in range(word.start, word.end))
        (gradient,) = torch.autograd.grad(score, captured)
    return captured[0].detach(), gradient


def test_all_vision_layers_in_one_pass_equal_one_pass_per_layer(tiny_smolvlm, caption):
    image = random_image(3)
    (maps,) = tiny_smolvlm.explain(image, caption, word_indices=[5], method="hirescam")
    patch_count = tiny_smolvlm.image_geometry(image.size).patch_count
    assert maps.cam_patches.shape == (len(tiny_smolvlm.vision_layers), patch_count)
    for layer_index, layer in enumerate(tiny_smolvlm.vision_layers):
        output, gradient = one_pass_gradient(tiny_smolvlm, image, caption, 5, layer)
        assert output.shape[0] == 5, "tiles and the global view are the vision tower's batch"
        expected = hires_cam(output, gradient).flatten()  # every token: no CLS to drop
        np.testing.assert_allclose(maps.cam_patches[layer_index], expected.numpy(), rtol=1e-4, atol=1e-9)


def test_all_attention_layers_in_one_pass_equal_one_pass_per_layer(tiny_smolvlm, caption):
    image = random_image(3)
    (maps,) = tiny_smolvlm.explain(image, caption, word_indices=[5], method="attention")
    word = caption.words[5]
    columns = [p for p, token_id in enumerate(caption.token_ids) if token_id == tiny_smolvlm.image_token_id]
    for layer_index, attention_module in enumerate(tiny_smolvlm.attentions):
        attention, gradient = one_pass_gradient(tiny_smolvlm, image, caption, 5, attention_module, output_index=1)
        per_token = sum(
            gradient_attention(attention[0, :, row], gradient[0, :, row]) for row in range(word.start - 1, word.end - 1)
        )[columns]
        expected = tiny_smolvlm.tokens_to_patches(per_token)
        np.testing.assert_allclose(maps.cam_patches[layer_index], expected.numpy(), rtol=1e-4, atol=1e-9)
    assert maps.cam_patches[:-1].max() > 0, "the mean of blank maps would prove nothing"
    np.testing.assert_allclose(maps.cam_patches[-1], maps.cam_patches[:-1].mean(axis=0), rtol=1e-5, atol=1e-9)
    assert maps.layer_names[-1] == f"language model attention, mean of all {len(tiny_smolvlm.attentions)} layers"
    assert tiny_smolvlm.default_method == "attention_contrast"
    assert tiny_smolvlm.default_layer("attention") == len(tiny_smolvlm.attentions)


@pytest.mark.parametrize("method", ["attention", "hirescam", "gradcam", "projector", "occlusion"])
def test_all_words_at_once_equal_each_word_alone(tiny_smolvlm, caption, method):
    image = random_image(4)
    together = tiny_smolvlm.explain(image, caption, method=method)
    assert [maps.word for maps in together] == [word.text for word in caption.words]
    for index, maps in enumerate(together):
        (alone,) = tiny_smolvlm.explain(image, caption, word_indices=[index], method=method)
        assert maps.score == pytest.approx(alone.score, abs=1e-5)
        np.testing.assert_allclose(maps.cam_patches, alone.cam_patches, rtol=1e-4, atol=1e-9)
        assert maps.cam_patches.shape == (
            len(tiny_smolvlm.layer_names(method)),
            tiny_smolvlm.image_geometry(image.size).patch_count,
        )
        assert np.isfinite(maps.cam_patches).all() and (maps.cam_patches >= 0).all()
    assert any(maps.cam_patches.max() > 0 for maps in together)


@pytest.mark.parametrize("tile, row, column", [(1, 1, 2), (4, 3, 0)])  # a tile, then the global view
def test_occlusion_is_the_drop_in_log_p_when_a_patch_of_a_tile_is_zeroed(tiny_smolvlm, caption, tile, row, column):
    image = random_image(5)
    (maps,) = tiny_smolvlm.explain(image, caption, word_indices=[2], method="occlusion")
    position = caption.words[2].start
    patch = tiny_smolvlm.patch_size
    pixel_values = tiny_smolvlm.model_inputs([image])["pixel_values"]

    def log_p(pixels: torch.Tensor) -> float:
        logits = logits_of(tiny_smolvlm, image, caption.token_ids, pixels)
        return logits[position - 1].log_softmax(-1)[caption.token_ids[position]].item()

    occluded = pixel_values.clone()
    occluded[0, tile, :, row * patch : (row + 1) * patch, column * patch : (column + 1) * patch] = 0
    expected = max(log_p(pixel_values) - log_p(occluded), 0.0)
    rows, columns = tiny_smolvlm.tile_grid
    assert maps.cam_patches[0, tile * rows * columns + row * columns + column] == pytest.approx(expected, abs=1e-5)


def test_pixel_shuffle_tokens_cover_the_patches_the_explainer_gives_them(tiny_smolvlm):
    """The connector's own pixel shuffle on patch numbers: each image token carries exactly the
    patches ``tokens_to_patches`` spreads its value over."""
    rows, columns = tiny_smolvlm.tile_grid
    patch_numbers = torch.arange(rows * columns, dtype=torch.float32).reshape(1, -1, 1)
    shuffled = tiny_smolvlm.model.model.connector.pixel_shuffle(patch_numbers, tiny_smolvlm.scale_factor)[0]
    assert shuffled.shape[0] == tiny_smolvlm.tokens_per_tile
    for token in range(tiny_smolvlm.tokens_per_tile):
        one_hot = torch.zeros(2 * tiny_smolvlm.tokens_per_tile)  # two tiles: tokens stay in their own tile
        one_hot[tiny_smolvlm.tokens_per_tile + token] = 1
        spread = tiny_smolvlm.tokens_to_patches(one_hot)
        assert set(spread.nonzero().flatten().tolist()) == {rows * columns + int(p) for p in shuffled[token]}


@pytest.mark.parametrize("image_size", [(48, 40), (40, 120), (130, 50), (16, 16), (33, 31), (300, 7)])
def test_tile_layout_is_the_processors(tiny_smolvlm, image_size):
    image = Image.new("RGB", image_size)
    processed = tiny_smolvlm.processor.image_processor(images=[[image]], return_row_col_info=True)
    assert tiny_smolvlm.tile_layout(image_size) == (processed["rows"][0][0], processed["cols"][0][0])
    geometry = tiny_smolvlm.image_geometry(image_size)
    assert len(geometry.views) == len(processed["pixel_values"][0])


def patch_whiteness(explainer, image: np.ndarray, black: np.ndarray, white: np.ndarray) -> np.ndarray:
    """(patches,) 0 where a model patch (tile after tile) stayed black, 1 where all white."""

    def brightness(pixels: np.ndarray) -> np.ndarray:
        processed = explainer.processor.image_processor(images=[[Image.fromarray(pixels)]], return_tensors="np")
        tiles = processed["pixel_values"][0].mean(axis=1)  # (tiles, S, S)
        rows, columns = explainer.tile_grid
        count, height, width = tiles.shape
        return tiles.reshape(count, rows, height // rows, columns, width // columns).mean(axis=(2, 4)).ravel()

    return (brightness(image) - brightness(black)) / (brightness(white) - brightness(black))


@pytest.mark.parametrize("image_size, tiles", [((96, 40), (1, 2)), ((40, 120), (2, 1)), ((80, 48), (2, 2))])
def test_tiled_geometry_matches_the_real_processor(tiny_smolvlm, image_size, tiles):
    """tests.geometry_checks for tiles: each patch's box, painted white on black and sent through
    the real image processor, is brightest at that very patch among the patches of its own view
    (tile or global view). The generic check asks for the brightest patch over all views, which
    cannot hold here: a box of the global view covers whole patches of the tiles too."""
    geometry = tiny_smolvlm.image_geometry(image_size)
    assert tiny_smolvlm.tile_layout(image_size) == tiles
    assert len(geometry.views) == tiles[0] * tiles[1] + 1  # the tiles, then the global view
    black = np.zeros((image_size[1], image_size[0], 3), dtype=np.uint8)
    starts = np.cumsum([0] + [view.patch_count for view in geometry.views])
    for patch_id in range(geometry.patch_count):
        box = geometry.patch_box_image(patch_id)
        pixels = black.copy()
        pixels[box.y0 : box.y1, box.x0 : box.x1] = 255
        whiteness = patch_whiteness(tiny_smolvlm, pixels, black, black + 255)
        view = int(np.searchsorted(starts, patch_id, side="right")) - 1
        own_view = whiteness[starts[view] : starts[view + 1]]
        found = starts[view] + int(own_view.argmax())
        assert found == patch_id, f"patch {patch_id} (box {box} of {image_size}) lands on model patch {found}"
        assert whiteness[patch_id] >= MIN_WHITENESS, (patch_id, box, whiteness[patch_id])


def test_no_hook_is_left_even_after_an_error(tiny_smolvlm, caption, monkeypatch):
    image = random_image(6)
    tiny_smolvlm.explain(image, caption, word_indices=[0])  # transformers installs its own hooks once
    hooks_before = count_forward_hooks(tiny_smolvlm.model)

    def broken_language_model(*args, **kwargs):
        raise RuntimeError("language model failed")

    # The vision layers run (their hooks fire), then the language model raises.
    monkeypatch.setattr(tiny_smolvlm.model.model.text_model, "forward", broken_language_model)
    for method in ("hirescam", "attention", "occlusion"):
        with pytest.raises(RuntimeError, match="language model failed"):
            tiny_smolvlm.explain(image, caption, method=method)
    assert count_forward_hooks(tiny_smolvlm.model) == hooks_before


def test_explaining_leaves_no_gradient_on_shared_parameters(tiny_smolvlm, caption):
    for method in ("attention", "hirescam"):
        tiny_smolvlm.explain(random_image(7), caption, method=method)
    assert all(parameter.grad is None for parameter in tiny_smolvlm.model.parameters())
    assert not any(parameter.requires_grad for parameter in tiny_smolvlm.model.parameters())


def test_threads_sharing_one_explainer_get_bit_equal_results(tiny_smolvlm, caption):
    jobs = [(random_image(10 + index), index % len(caption.words), method)
            for index, method in enumerate(["attention", "hirescam", "gradcam", "attention"])]
    assert_threads_get_what_they_get_alone(tiny_smolvlm, caption, jobs)


@pytest.mark.parametrize("image_size", [(48, 40), (96, 40), (16, 16)])
def test_prompt_and_pixels_are_what_transformers_own_processor_makes(tiny_smolvlm, image_size):
    """Idefics3Processor (the processor of SmolVLM-256M's checkpoints; SmolVLMProcessor needs a
    video processor and num2words, absent here) writes the same ids and the same pixels."""
    ours = tiny_smolvlm.processor
    theirs = Idefics3Processor(
        image_processor=ours.image_processor,
        tokenizer=copy.deepcopy(ours.tokenizer),  # it adds tokens to the tokenizer it is given
        image_seq_len=tiny_smolvlm.tokens_per_tile,
        chat_template=ours.chat_template,
    )
    image = random_image(30, image_size)
    expected = theirs(text=[ours.prompt_text(DEFAULT_INSTRUCTION)], images=[[image]], return_tensors="pt")
    assert tiny_smolvlm.prompt_ids(image, DEFAULT_INSTRUCTION) == expected["input_ids"][0].tolist()
    inputs = tiny_smolvlm.model_inputs([image])
    torch.testing.assert_close(inputs["pixel_values"], expected["pixel_values"], rtol=0, atol=0)
    torch.testing.assert_close(inputs["pixel_attention_mask"], expected["pixel_attention_mask"], rtol=0, atol=0)


def test_a_folder_saved_by_transformers_processor_with_a_video_section_loads(tmp_path):
    """The layout of the hub's checkpoints: the image processor nested in processor_config.json
    (here beside a video processor section, as SmolVLM2 folders hold, which needs torchvision)
    and the chat template in its own file. The image-only processor reads what it needs."""
    model, ours = build_tiny_smolvlm(model_type="idefics3")
    model.save_pretrained(tmp_path)
    Idefics3Processor(
        image_processor=ours.image_processor, tokenizer=copy.deepcopy(ours.tokenizer), image_seq_len=4,
        chat_template=ours.chat_template,
    ).save_pretrained(tmp_path)
    config_file = tmp_path / "processor_config.json"
    processor_config = json.loads(config_file.read_text())
    assert "image_processor" in processor_config and not (tmp_path / "preprocessor_config.json").exists()
    processor_config["video_processor"] = {"video_processor_type": "SmolVLMVideoProcessor", "fps": 1}
    config_file.write_text(json.dumps(processor_config))
    explainer = load_captioner(str(tmp_path), device="cpu")
    assert type(explainer) is Idefics3Explainer
    reference = SmolVLMExplainer(*build_tiny_smolvlm(model_type="idefics3"))
    image = random_image(31, (96, 40))
    assert explainer.prompt_ids(image, DEFAULT_INSTRUCTION) == reference.prompt_ids(image, DEFAULT_INSTRUCTION)
    assert explainer.special_ids == reference.special_ids
    caption = explainer.caption(image, max_new_tokens=3)
    assert caption.token_ids[: caption.prompt_length] == tuple(reference.prompt_ids(image, DEFAULT_INSTRUCTION))


def test_generation_stops_at_the_models_position_limit_and_a_full_prompt_is_refused():
    model, processor = build_tiny_smolvlm()
    image = random_image(9)
    prompt_length = len(SmolVLMExplainer(model, processor).prompt_ids(image, DEFAULT_INSTRUCTION))
    model, processor = build_tiny_smolvlm(max_positions=prompt_length + 3)
    model.lm_head.weight.data.zero_()  # every logit 0: greedy writes id 0, never the end of utterance
    explainer = SmolVLMExplainer(model, processor)
    caption = explainer.caption(image, max_new_tokens=60)
    assert caption.token_ids[prompt_length:] == (0, 0, 0)
    with pytest.raises(PromptTooLongError, match="Shorten the prompt"):
        explainer.caption(image, prompt="Describe this image in one sentence, please, with many words.")


def test_the_sanity_checks_randomised_copy_changes_the_vision_maps_only_on_the_copy(tiny_smolvlm, caption):
    image = random_image(12)
    (before,) = tiny_smolvlm.explain(image, caption, [1], "hirescam")
    randomised = tiny_smolvlm.randomised_copy(top_layers=2, seed=0)
    (after,) = randomised.explain(image, caption, [1], "hirescam")
    assert not np.allclose(before.cam_patches[-1], after.cam_patches[-1])
    (again,) = tiny_smolvlm.explain(image, caption, [1], "hirescam")
    np.testing.assert_array_equal(before.cam_patches, again.cam_patches)


def test_the_projector_map_is_gradient_x_input_at_the_image_tokens(tiny_smolvlm, caption):
    """The connector's output, tile after tile, each token's value spread over the patches its
    pixel shuffle folded into it."""
    assert_projector_map_is_gradient_x_input(
        tiny_smolvlm, tiny_smolvlm.model.model.text_model, random_image(9), caption, 2, tiny_smolvlm.tokens_to_patches
    )
