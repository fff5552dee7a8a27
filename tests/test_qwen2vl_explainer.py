"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL explainers on tiny random models: captions through the chat template,
alignment in one long sequence, one-pass equivalences, merge-block (and window) order, geometry,
hooks, threads. Every test runs for each of the three families."""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.vision_utils import get_vision_window_index

from models.cam_methods import gradient_attention, hires_cam
from models.explainer import DEFAULT_INSTRUCTION, PromptTooLongError
from models.families import load_captioner
from models.hooks import capture_outputs
from models.qwen2vl_explainer import Qwen2_5_VLExplainer, Qwen2VLExplainer, Qwen3VLExplainer
from tests.conftest import random_image
from tests.engine_checks import assert_projector_map_is_gradient_x_input
from tests.geometry_checks import MIN_WHITENESS
from tests.tiny_qwen2vl import (
    IM_END_ID,
    IMAGE_ID,
    MERGE_SIZE,
    TEXT_LAYERS,
    VISION_DEPTH,
    VISION_END_ID,
    VISION_START_ID,
    build_tiny_qwen2vl,
    save_tiny_qwen2vl,
)

ANSWER = "a red dog on grassy squares."
IMAGE_SIZE = (48, 40)  # (width, height): 40 x 48 model pixels, 10 x 12 patches, 30 image tokens


FAMILIES = {"qwen2_vl": Qwen2VLExplainer, "qwen2_5_vl": Qwen2_5_VLExplainer, "qwen3_vl": Qwen3VLExplainer}


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny_qwen_dir(request, tmp_path_factory):
    model_type = request.param
    return save_tiny_qwen2vl(*build_tiny_qwen2vl(model_type=model_type), tmp_path_factory.mktemp(model_type))


@pytest.fixture(scope="module")
def tiny_qwen(tiny_qwen_dir) -> Qwen2VLExplainer:
    explainer = load_captioner(str(tiny_qwen_dir), device="cpu")
    assert type(explainer) is FAMILIES[explainer.model.config.model_type]
    return explainer


def prompt_and_answer_batch(explainer: Qwen2VLExplainer, image: Image.Image, answer: str = ANSWER) -> dict:
    """The processor's own inputs for the templated instruction plus an answer and <|im_end|>."""
    text = explainer.prompt_text(DEFAULT_INSTRUCTION) + answer + "<|im_end|>"
    return explainer.processor(images=[image], text=[text], return_tensors="pt")


@pytest.fixture(scope="module")
def caption(tiny_qwen):
    image = random_image(0, IMAGE_SIZE)
    prompt = tiny_qwen.processor(images=[image], text=[tiny_qwen.prompt_text(DEFAULT_INSTRUCTION)])
    prompt_length = len(prompt["input_ids"][0])
    ids = prompt_and_answer_batch(tiny_qwen, image)["input_ids"][0].tolist()
    assert ids[:prompt_length] == list(prompt["input_ids"][0]), "the answer must not change the prompt's ids"
    return tiny_qwen.caption_from_ids(ids, prompt_length)


def count_forward_hooks(model: torch.nn.Module) -> int:
    return sum(len(module._forward_hooks) for module in model.modules())


def unmerge(values: np.ndarray, grid_shape: tuple[int, int]) -> np.ndarray:
    """Values in the processor's flattened order (2x2 blocks contiguous) -> row-major, written
    as the inverse of the processor's own reshape (independent of the explainer's index maths)."""
    rows, columns = grid_shape
    blocks = values.reshape(rows // MERGE_SIZE, columns // MERGE_SIZE, MERGE_SIZE, MERGE_SIZE)
    return blocks.transpose(0, 2, 1, 3).reshape(rows * columns)


def block_outputs_in_merge_order(explainer, values: np.ndarray, image) -> np.ndarray:
    """A vision block's per-token values in the flattened patches' order: Qwen2.5-VL's tower
    holds merge blocks in window order, undone as the tower itself undoes it after the merger."""
    if explainer.model.config.model_type != "qwen2_5_vl":
        return values
    visual = explainer.model.model.visual
    window_index, _ = get_vision_window_index(
        explainer.model_inputs([image])["image_grid_thw"],
        spatial_merge_size=visual.spatial_merge_size,
        window_size=visual.window_size,
        patch_size=visual.patch_size,
    )
    units = values.reshape(-1, MERGE_SIZE**2)
    return units[torch.argsort(window_index).numpy()].ravel()


def grid_of(explainer, image) -> tuple[int, int]:
    _, rows, columns = explainer.model_inputs([image])["image_grid_thw"][0].tolist()
    return rows, columns


def test_answer_words_only_and_special_ids(tiny_qwen, caption):
    assert [word.text for word in caption.words] == ["a", "red", "dog", "on", "grassy", "squares", "."]
    assert caption.text == ANSWER, "the caption is the answer, without the template or the instruction"
    assert all(word.start >= caption.prompt_length for word in caption.words)
    assert caption.token_ids[-1] == IM_END_ID
    grassy = caption.words[4]
    assert grassy.end - grassy.start > 1, "the tests need a word of several pieces"
    for token in (IMAGE_ID, VISION_START_ID, VISION_END_ID, IM_END_ID):
        assert token in tiny_qwen.special_ids
    assert caption.token_ids.count(IMAGE_ID) == 30


def test_caption_goes_through_the_chat_template_with_the_instruction(tiny_qwen):
    image = random_image(8, IMAGE_SIZE)
    caption = tiny_qwen.caption(image, max_new_tokens=4)
    expected_prompt = tiny_qwen.processor(images=[image], text=[tiny_qwen.prompt_text(DEFAULT_INSTRUCTION)])
    prompt_ids = tuple(expected_prompt["input_ids"][0])
    assert caption.prompt_length == len(prompt_ids)
    assert caption.token_ids[: caption.prompt_length] == prompt_ids
    assert caption.prompt_length < len(caption.token_ids) <= caption.prompt_length + 4
    assert DEFAULT_INSTRUCTION in tiny_qwen.processor.tokenizer.decode(list(prompt_ids))
    assert all(word.start >= caption.prompt_length for word in caption.words)

    asked = tiny_qwen.caption(image, prompt="What colour is the dog?", max_new_tokens=3)
    asked_prompt = tiny_qwen.processor.tokenizer.decode(list(asked.token_ids[: asked.prompt_length]))
    assert "What colour is the dog?" in asked_prompt and DEFAULT_INSTRUCTION not in asked_prompt
    assert asked_prompt.endswith("<|im_start|>assistant\n")
    assert tiny_qwen.prompt_label == "Instruction" and DEFAULT_INSTRUCTION in tiny_qwen.prompt_help


def test_generation_stops_at_the_position_limit_and_a_prompt_that_fills_it_is_refused(tiny_qwen):
    model, processor = build_tiny_qwen2vl(model_type=tiny_qwen.model.config.model_type, max_positions=64)
    short = type(tiny_qwen)(model, processor)
    image = random_image(8, IMAGE_SIZE)
    caption = short.caption(image, max_new_tokens=60)
    assert short.max_caption_tokens == 64
    assert caption.prompt_length == 59 and len(caption.token_ids) == 64  # no EOS: the limit ends it
    with pytest.raises(PromptTooLongError, match="of the model's 64 token positions"):
        short.caption(image, prompt="Describe this image in one sentence. What colour is the dog?")


def test_logits_before_a_token_score_it(tiny_qwen, caption):
    """Golden value: log p(ids[p]) comes from logits[p - 1] of the model's own forward pass on the
    processor's inputs (positions from its own mm_token_type_ids), computed here in numpy."""
    image = random_image(0, IMAGE_SIZE)
    with torch.no_grad():
        logits = tiny_qwen.model(**prompt_and_answer_batch(tiny_qwen, image)).logits[0].double().numpy()

    def log_p_by_hand(row: int, token_id: int) -> float:
        shifted = logits[row] - logits[row].max()
        return float(shifted[token_id] - np.log(np.exp(shifted).sum()))

    red_position = caption.words[1].start
    expected = log_p_by_hand(red_position - 1, caption.token_ids[red_position])
    misaligned = log_p_by_hand(red_position, caption.token_ids[red_position])
    assert abs(expected - misaligned) > 1e-3, "the test must tell the two alignments apart"

    teacher_forced = tiny_qwen.token_log_probs([image], caption.token_ids)[0]
    assert np.isnan(teacher_forced[0])
    assert teacher_forced[red_position] == pytest.approx(expected, abs=1e-5)
    (maps,) = tiny_qwen.explain(image, caption, word_indices=[1], method="attention")
    assert maps.score == pytest.approx(expected, abs=1e-5)
    assert maps.foil is None
    grassy = caption.words[4]
    (maps,) = tiny_qwen.explain(image, caption, word_indices=[4], method="hirescam")
    by_hand = sum(log_p_by_hand(p - 1, caption.token_ids[p]) for p in range(grassy.start, grassy.end))
    assert maps.score == pytest.approx(by_hand, abs=1e-5)


def test_contrastive_target_compares_the_foil_spelled_as_the_word(tiny_qwen, caption):
    """Byte-level BPE: "red" after a space is the piece "Ġred", so the foil "blue" is "Ġblue"."""
    image = random_image(2, IMAGE_SIZE)
    position = caption.words[1].start  # " red"
    tokenizer = tiny_qwen.processor.tokenizer
    assert caption.pieces[position] == "Ġred"
    (foil_id,) = tokenizer(" blue", add_special_tokens=False).input_ids
    assert foil_id != tokenizer("blue", add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        logits = tiny_qwen.model(**prompt_and_answer_batch(tiny_qwen, image)).logits[0]
    log_probs = logits[position - 1].log_softmax(-1)
    expected = (log_probs[caption.token_ids[position]] - log_probs[foil_id]).item()
    (maps,) = tiny_qwen.explain(image, caption, word_indices=[1], foil="blue")
    assert maps.score == pytest.approx(expected, abs=1e-5)
    assert maps.foil == "blue"


def test_the_default_contrasts_each_word_with_the_models_runner_up(tiny_qwen, caption):
    """The family's default target is log p(word) - log p(the most probable other id, never a
    special one) at the word's first piece; a given foil overrides the runner-up."""
    assert tiny_qwen.default_method == "attention_contrast"
    image = random_image(3, IMAGE_SIZE)
    position = caption.words[1].start
    with torch.no_grad():
        logits = tiny_qwen.model(**prompt_and_answer_batch(tiny_qwen, image)).logits[0]
    log_probs = logits[position - 1].double().log_softmax(-1)
    ranked = [token_id for token_id in log_probs.argsort(descending=True).tolist()
              if token_id != caption.token_ids[position] and token_id not in tiny_qwen.special_ids]  # fmt: skip
    runner_up = ranked[0]
    expected = (log_probs[caption.token_ids[position]] - log_probs[runner_up]).item()
    (maps,) = tiny_qwen.explain(image, caption, word_indices=[1])
    assert maps.score == pytest.approx(expected, abs=1e-5)
    assert maps.foil == tiny_qwen.processor.tokenizer.decode([runner_up]).strip()
    (given,) = tiny_qwen.explain(image, caption, word_indices=[1], foil="blue")
    assert given.foil == "blue"


def test_the_runner_up_is_read_off_the_explanations_own_forward_pass(tiny_qwen, caption):
    """Contrasting with the runner-up costs no second forward pass over the model."""
    calls = []
    handle = tiny_qwen.model.register_forward_hook(lambda module, inputs, output: calls.append(1))
    try:
        for method in ("attention", "attention_contrast"):
            calls.clear()
            tiny_qwen.explain(random_image(4, IMAGE_SIZE), caption, word_indices=[1, 2], method=method)
            assert len(calls) == 1, method
    finally:
        handle.remove()


def one_word_pass(explainer, image, caption, word_index, module, output_index=0):
    """(output, gradient) of one module for one word, from a forward pass of the model's own."""
    batch = prompt_and_answer_batch(explainer, image)
    assert batch["input_ids"][0].tolist() == list(caption.token_ids)
    word = caption.words[word_index]
    captured: dict[str, torch.Tensor] = {}

    def keep(module, inputs, output):
        captured.setdefault("output", output[output_index] if isinstance(output, tuple) else output)

    handle = module.register_forward_hook(keep)
    try:
        pixel_values = batch["pixel_values"].requires_grad_(True)
        with torch.enable_grad():
            logits = explainer.model(**{**batch, "pixel_values": pixel_values}).logits
            log_probs = logits[0].log_softmax(-1)
            score = sum(log_probs[p - 1, caption.token_ids[p]] for p in range(word.start, word.end))
            (gradient,) = torch.autograd.grad(score, captured["output"])
    finally:
        handle.remove()
    return captured["output"].detach(), gradient


def test_all_vision_layers_in_one_pass_equal_one_pass_per_layer(tiny_qwen, caption):
    image = random_image(3, IMAGE_SIZE)
    grid = grid_of(tiny_qwen, image)
    (maps,) = tiny_qwen.explain(image, caption, word_indices=[4], method="hirescam")
    assert maps.cam_patches.shape == (VISION_DEPTH, grid[0] * grid[1])
    assert len(tiny_qwen.vision_layers) == VISION_DEPTH
    for layer_index, layer in enumerate(tiny_qwen.vision_layers):
        output, gradient = one_word_pass(tiny_qwen, image, caption, 4, layer)
        in_merge_order = block_outputs_in_merge_order(tiny_qwen, hires_cam(output, gradient).numpy(), image)
        expected = unmerge(in_merge_order, grid)  # every token is a patch: no CLS
        np.testing.assert_allclose(maps.cam_patches[layer_index], expected, rtol=1e-4, atol=1e-9)


def test_all_language_layers_in_one_pass_equal_one_pass_per_layer(tiny_qwen, caption):
    image = random_image(4, IMAGE_SIZE)
    rows, columns = grid_of(tiny_qwen, image)
    word = caption.words[4]
    image_columns = [p for p, token in enumerate(caption.token_ids) if token == IMAGE_ID]
    (maps,) = tiny_qwen.explain(image, caption, word_indices=[4], method="attention")
    assert maps.cam_patches.shape == (TEXT_LAYERS + 1, rows * columns)
    for layer_index, attention_module in enumerate(tiny_qwen.attentions):
        attention, gradient = one_word_pass(tiny_qwen, image, caption, 4, attention_module, output_index=1)
        query_rows = slice(word.start - 1, word.end - 1)
        per_piece = gradient_attention(
            attention[0, :, query_rows].transpose(0, 1), gradient[0, :, query_rows].transpose(0, 1)
        )
        tokens = per_piece.sum(0)[image_columns].numpy()  # one per merged 2x2 block, row-major blocks
        blocks = tokens.reshape(rows // MERGE_SIZE, columns // MERGE_SIZE)
        expected = np.kron(blocks, np.ones((MERGE_SIZE, MERGE_SIZE))).ravel()  # each patch gets its block's
        np.testing.assert_allclose(maps.cam_patches[layer_index], expected, rtol=1e-4, atol=1e-9)
    assert maps.cam_patches[:TEXT_LAYERS].max() > 0, "the mean of blank maps would prove nothing"
    np.testing.assert_allclose(maps.cam_patches[-1], maps.cam_patches[:TEXT_LAYERS].mean(axis=0), rtol=1e-5)
    assert maps.layer_names[-1] == f"language model attention, mean of all {TEXT_LAYERS} layers"
    assert tiny_qwen.default_method == "attention_contrast"
    assert tiny_qwen.default_layer("attention") == TEXT_LAYERS


def test_image_tokens_cover_the_patches_the_models_own_3d_positions_say(tiny_qwen, caption):
    """The merged-token -> patch mapping agrees with the M-RoPE (height, width) positions that
    the model gives each image token."""
    image = random_image(0, IMAGE_SIZE)
    batch = prompt_and_answer_batch(tiny_qwen, image)
    positions, _ = tiny_qwen.model.model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"]
    )
    image_positions = positions[:, 0, batch["input_ids"][0] == IMAGE_ID]  # (3, tokens)
    block_rows = (image_positions[1] - image_positions[1].min()).numpy()
    block_columns = (image_positions[2] - image_positions[2].min()).numpy()
    rows, columns = grid_of(tiny_qwen, image)
    token_of_patch = tiny_qwen.image_token_of_patch(tiny_qwen.model_inputs([image])).numpy()
    for patch, token in enumerate(token_of_patch):
        row, column = divmod(patch, columns)
        assert (block_rows[token], block_columns[token]) == (row // MERGE_SIZE, column // MERGE_SIZE)


@pytest.mark.parametrize("method", ["attention", "hirescam", "gradcam", "projector", "occlusion"])
def test_all_words_at_once_equal_each_word_alone(tiny_qwen, caption, method):
    image = random_image(5, IMAGE_SIZE)
    together = tiny_qwen.explain(image, caption, method=method)
    assert [maps.word for maps in together] == [word.text for word in caption.words]
    for index, maps in enumerate(together):
        (alone,) = tiny_qwen.explain(image, caption, word_indices=[index], method=method)
        assert maps.score == pytest.approx(alone.score, abs=1e-5)
        np.testing.assert_allclose(maps.cam_patches, alone.cam_patches, rtol=1e-4, atol=1e-9)
        assert maps.cam_patches.shape == (
            len(tiny_qwen.layer_names(method)),
            tiny_qwen.image_geometry(image.size).patch_count,
        )
        assert np.isfinite(maps.cam_patches).all() and (maps.cam_patches >= 0).all()


def test_occlusion_is_the_drop_in_log_p_when_a_patch_is_zeroed(tiny_qwen, caption):
    image = random_image(6, IMAGE_SIZE)
    (maps,) = tiny_qwen.explain(image, caption, word_indices=[2], method="occlusion")
    position = caption.words[2].start
    batch = prompt_and_answer_batch(tiny_qwen, image)
    rows, columns = grid_of(tiny_qwen, image)

    def log_p(pixel_values: torch.Tensor) -> float:
        with torch.no_grad():
            logits = tiny_qwen.model(**{**batch, "pixel_values": pixel_values}).logits
        return logits[0, position - 1].log_softmax(-1)[caption.token_ids[position]].item()

    merge_index_of_patch = unmerge(np.arange(rows * columns), (rows, columns))  # the test's own unmerge
    strongest = int(maps.cam_patches[0].argmax())
    assert maps.cam_patches[0, strongest] > 1e-4, "the test needs a patch that matters"
    for patch in (strongest, 1 * columns + 2):  # and patch row 1, column 2, whatever it does
        occluded = batch["pixel_values"].clone()
        occluded[merge_index_of_patch[patch]] = 0
        expected = max(log_p(batch["pixel_values"]) - log_p(occluded), 0.0)
        assert maps.cam_patches[0, patch] == pytest.approx(expected, abs=1e-5)


def patch_means(explainer, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
    """(patches,) mean of each patch the real image processor makes of ``image``, put in
    row-major order by the explainer's own ``patch_order``, and the processor's grid."""
    batch = explainer.processor.image_processor(images=[image], return_tensors="pt")
    means = batch["pixel_values"].mean(dim=1)  # flattened, merge-block order
    _, rows, columns = batch["image_grid_thw"][0].tolist()
    return means[explainer.patch_order(batch)].numpy(), (rows, columns)


@pytest.mark.parametrize("image_size", [(80, 48), (40, 120), (48, 40)])
def test_aspect_geometry_matches_the_real_processor(tiny_qwen, image_size):
    """tests/geometry_checks.py reads a (3, H, W) tensor; Qwen2-VL's pixels are flattened patches,
    so the same one-hot check runs here on per-patch means, through the explainer's reorder."""
    geometry = tiny_qwen.image_geometry(image_size)
    (view,) = geometry.views
    black = np.zeros((image_size[1], image_size[0], 3), dtype=np.uint8)
    darkest, grid = patch_means(tiny_qwen, Image.fromarray(black))
    assert view.grid_shape == grid, "the geometry's grid is the processor's smart_resize grid"
    assert grid[0] != grid[1]
    brightest, _ = patch_means(tiny_qwen, Image.fromarray(black + 255))
    for patch_id in range(geometry.patch_count):
        box = geometry.patch_box_image(patch_id)
        pixels = black.copy()
        pixels[box.y0 : box.y1, box.x0 : box.x1] = 255
        means, _ = patch_means(tiny_qwen, Image.fromarray(pixels))
        whiteness = (means - darkest) / (brightest - darkest)
        found = int(whiteness.argmax())
        assert found == patch_id, f"patch {patch_id} (box {box} of {image_size}) lands on model patch {found}"
        assert whiteness[patch_id] >= MIN_WHITENESS, (patch_id, box, whiteness[patch_id])


def test_every_language_layer_returns_attention_and_sdpa_fails_loudly(tiny_qwen, caption):
    image = random_image(7, IMAGE_SIZE)
    inputs = tiny_qwen.model_inputs([image])
    with torch.no_grad(), capture_outputs(tiny_qwen.attentions, output_index=1) as captured:
        tiny_qwen.teacher_forced_logits(inputs, torch.tensor([caption.token_ids]))
    length = len(caption.token_ids)
    heads = tiny_qwen.model.config.text_config.num_attention_heads
    assert [None if value is None else tuple(value.shape) for value in captured] == [(1, heads, length, length)] * (
        TEXT_LAYERS
    )

    model, processor = build_tiny_qwen2vl(model_type=tiny_qwen.model.config.model_type)
    sdpa = type(tiny_qwen)(model, processor)
    model.set_attn_implementation({"text_config": "sdpa"})  # as a careless later change would
    with pytest.raises(RuntimeError, match="attn_implementation='eager'"):
        sdpa.explain(image, caption, word_indices=[1], method="attention")


def test_deepest_vision_map_is_not_blank(tiny_qwen, caption):
    """The last block feeds only the merger's LayerNorm: gradient x activation on its raw output
    is zero, so the explainer reads the normalised output."""
    image = random_image(11, IMAGE_SIZE)
    maps = tiny_qwen.explain(image, caption, method="hirescam")
    # Not rounding noise: on the scale of the shallower blocks' maps.
    assert all(word_maps.cam_patches[-1].max() > 1e-2 * word_maps.cam_patches[:-1].max() for word_maps in maps)
    raw_last_block = tiny_qwen.model.model.visual.blocks[-1]
    output, gradient = one_word_pass(tiny_qwen, image, caption, 1, raw_last_block)
    assert hires_cam(output, gradient).abs().max() < 1e-6


def test_no_hook_is_left_even_after_an_error(tiny_qwen, caption, monkeypatch):
    image = random_image(9, IMAGE_SIZE)
    tiny_qwen.explain(image, caption, word_indices=[0])
    hooks_before = count_forward_hooks(tiny_qwen.model)

    def broken_language_model(*args, **kwargs):
        raise RuntimeError("language model failed")

    # The vision blocks run (their hooks fire), then the language model raises inside the block.
    monkeypatch.setattr(tiny_qwen.model.model.language_model, "forward", broken_language_model)
    for method in ("hirescam", "attention", "occlusion"):
        with pytest.raises(RuntimeError, match="language model failed"):
            tiny_qwen.explain(image, caption, method=method)
    assert count_forward_hooks(tiny_qwen.model) == hooks_before


def test_explaining_leaves_no_gradient_on_shared_parameters(tiny_qwen, caption):
    for method in tiny_qwen.methods:
        tiny_qwen.explain(random_image(12, IMAGE_SIZE), caption, word_indices=[1, 4], method=method)
    assert all(parameter.grad is None for parameter in tiny_qwen.model.parameters())
    assert not any(parameter.requires_grad for parameter in tiny_qwen.model.parameters())


def test_threads_sharing_one_explainer_get_bit_equal_results(tiny_qwen, caption):
    jobs = [
        (random_image(20 + index, IMAGE_SIZE), index % len(caption.words), method)
        for index, method in enumerate(["attention", "hirescam", "gradcam", "attention"])
    ]
    alone = [tiny_qwen.explain(image, caption, [word], method)[0] for image, word, method in jobs]
    caption_alone = tiny_qwen.caption(random_image(30, (64, 24)), max_new_tokens=3)
    barrier = threading.Barrier(len(jobs) + 1)

    def work(index: int) -> list:
        image, word, method = jobs[index]
        barrier.wait()  # start together so the forward passes really overlap
        return [tiny_qwen.explain(image, caption, [word], method)[0] for _ in range(3)]

    def caption_work() -> list:
        barrier.wait()  # generate() beside the explanations (positions must not leak between them)
        return [tiny_qwen.caption(random_image(30, (64, 24)), max_new_tokens=3) for _ in range(3)]

    with ThreadPoolExecutor(max_workers=len(jobs) + 1) as pool:
        captions = pool.submit(caption_work)
        results = list(pool.map(work, range(len(jobs))))  # re-raises any thread's exception
        assert captions.result() == [caption_alone] * 3
    for index, expected in enumerate(alone):
        assert len(results[index]) == 3
        for got in results[index]:
            assert got.score == expected.score
            np.testing.assert_array_equal(got.cam_patches, expected.cam_patches)


def test_a_hub_style_folder_with_a_video_processor_section_loads(tiny_qwen, tiny_qwen_dir):
    processor_config = json.loads((tiny_qwen_dir / "processor_config.json").read_text())
    family = type(tiny_qwen)
    assert processor_config["processor_class"] == family.processor_class.__name__.removeprefix("ImageOnly")
    assert "video_processor" in processor_config
    explainer = family.from_pretrained(str(tiny_qwen_dir), device="cpu")
    assert explainer.model.config.text_config._attn_implementation == "eager"
    assert not hasattr(explainer.processor, "video_processor")


def test_qwen2_5_vision_blocks_are_in_window_order(tiny_qwen):
    """The tiny Qwen2.5-VL's windows really reorder its tokens (else its vision tests would not
    tell the two orders apart); Qwen2-VL's and Qwen3-VL's blocks keep the flattened patches' order."""
    inputs = tiny_qwen.model_inputs([random_image(0, IMAGE_SIZE)])
    same = torch.equal(tiny_qwen.vision_token_order(inputs), tiny_qwen.patch_order(inputs))
    assert same == (tiny_qwen.model.config.model_type != "qwen2_5_vl")


def test_the_app_captions_and_explains_with_a_local_qwen_folder(tmp_path):
    """The page through AppTest on a tiny Qwen2-VL named by the server's local-folder setting:
    the instruction box, the default method and the runner-up it contrasts with, a heatmap, then
    the causal test, without an error."""
    from tests.app_helpers import pick_example, start_app
    from tests.tiny_models import build_tiny_clip, save_tiny

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLM_EXPLAINER_CAPTIONER_DIR", str(save_tiny_qwen2vl(*build_tiny_qwen2vl(), tmp_path / "qwen")))
        patch.setenv("VLM_EXPLAINER_CLIP_DIR", str(save_tiny(*build_tiny_clip(), tmp_path / "clip")))
        app = start_app()
        local = next(label for label in app.sidebar.selectbox(key="model_label").options if label.startswith("Local"))
        app.sidebar.selectbox(key="model_label").set_value(local).run()
        assert not app.exception, app.exception
        assert [box.label for box in app.sidebar.text_input] == ["Instruction"]
        pick_example(app, "photo_chelsea.jpg")  # 451 x 300: not square
        assert not app.exception, app.exception
        assert "Describe this image" not in app.subheader[0].value, "the caption heading shows the answer alone"
        assert app.selectbox(key="method").value == "attention_contrast"
        assert any("” against “" in caption.value for caption in app.caption), "the page names the runner-up"
        assert len(app.get("image")) >= 1
        app.slider(key="auto_fraction").set_value(25).run()
        app.button(key="auto_region").click().run()
        app.button(key="regenerate").click().run()
        assert not app.exception, app.exception


@pytest.mark.parametrize("image_processor_type", ["Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast"])
def test_the_hubs_older_layout_loads_with_the_pil_processor(tiny_qwen, tiny_qwen_dir, tmp_path, image_processor_type):
    """preprocessor_config.json (naming the torchvision processor, as the Qwen checkpoints do),
    video_preprocessor_config.json and chat_template.json instead of processor_config.json."""
    folder = tmp_path / "hub-layout"
    shutil.copytree(tiny_qwen_dir, folder)
    sections = json.loads((folder / "processor_config.json").read_text())
    (folder / "processor_config.json").unlink()
    processor_name = sections["processor_class"]
    image_section = dict(sections["image_processor"], image_processor_type=image_processor_type)
    (folder / "preprocessor_config.json").write_text(json.dumps({**image_section, "processor_class": processor_name}))
    video_section = {**sections["video_processor"], "processor_class": processor_name}
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video_section))
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))

    explainer = load_captioner(str(folder), device="cpu")
    assert type(explainer) is type(tiny_qwen)
    assert type(explainer.processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    image = random_image(8, IMAGE_SIZE)
    assert explainer.caption(image, max_new_tokens=3) == tiny_qwen.caption(image, max_new_tokens=3)


def test_the_projector_map_is_gradient_x_input_at_the_image_tokens(tiny_qwen, caption):
    """The merger's output (Qwen2.5-VL: still in window order, which the explainer undoes), each
    merged token's value on the four patches of its block."""
    image = random_image(9, IMAGE_SIZE)
    token_of_patch = tiny_qwen.image_token_of_patch(tiny_qwen.model_inputs([image]))
    assert_projector_map_is_gradient_x_input(
        tiny_qwen, tiny_qwen.model.model.language_model, image, caption, 2, lambda tokens: tokens[token_of_patch]
    )
