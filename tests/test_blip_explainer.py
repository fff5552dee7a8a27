"""BLIP explainer on a tiny random BLIP: alignment, one-pass equivalences, hooks, threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from models.blip_explainer import BlipExplainer
from models.cam_methods import hires_cam
from models.explainer import PromptTooLongError
from models.hooks import capture_outputs
from models.loading import torch_threads
from tests.conftest import random_image
from tests.engine_checks import assert_threads_get_what_they_get_alone
from tests.geometry_checks import assert_patch_boxes_reach_their_own_patches
from tests.tiny_models import BOS_ID, SEP_ID, VOCABULARY, build_tiny_blip

# "a red dog ##s and blue square" with BLIP's BOS first and [SEP] last, as generate() returns it.
CAPTION_IDS = [BOS_ID] + [VOCABULARY[piece] for piece in ["a", "red", "dog", "##s", "and", "blue", "square"]] + [SEP_ID]


@pytest.fixture(scope="module")
def caption(tiny_blip):
    return tiny_blip.caption_from_ids(CAPTION_IDS)


def count_forward_hooks(model: torch.nn.Module) -> int:
    return sum(len(module._forward_hooks) for module in model.modules())


def test_words_merge_word_pieces_and_drop_special_tokens(caption):
    assert [word.text for word in caption.words] == ["a", "red", "dogs", "and", "blue", "square"]
    dogs = caption.words[2]
    assert caption.pieces[dogs.start : dogs.end] == ("dog", "##s")
    assert caption.text == "a red dogs and blue square"


def test_logits_before_a_token_score_it(tiny_blip, caption):
    """Golden value: log p(ids[t]) comes from logits[t - 1], computed here by hand in numpy."""
    image = random_image(0)
    with torch.no_grad():
        logits = tiny_blip.model(
            pixel_values=tiny_blip.pixel_values([image]), input_ids=torch.tensor([CAPTION_IDS])
        ).logits[0].double().numpy()

    def log_p_by_hand(row: int, token_id: int) -> float:
        shifted = logits[row] - logits[row].max()
        return float(shifted[token_id] - np.log(np.exp(shifted).sum()))

    red_position = caption.words[1].start
    expected = log_p_by_hand(red_position - 1, CAPTION_IDS[red_position])
    misaligned = log_p_by_hand(red_position, CAPTION_IDS[red_position])
    assert abs(expected - misaligned) > 1e-3, "the test must tell the two alignments apart"

    teacher_forced = tiny_blip.token_log_probs([image], CAPTION_IDS)[0]
    assert np.isnan(teacher_forced[0])
    assert teacher_forced[red_position] == pytest.approx(expected, abs=1e-5)
    (maps,) = tiny_blip.explain(image, caption, word_indices=[1])
    assert maps.score == pytest.approx(expected, abs=1e-5)


def test_multi_piece_word_scores_the_sum_of_its_pieces(tiny_blip, caption):
    image = random_image(1)
    per_token = tiny_blip.token_log_probs([image], CAPTION_IDS)[0]
    dogs = caption.words[2]
    (maps,) = tiny_blip.explain(image, caption, word_indices=[2])
    assert maps.score == pytest.approx(per_token[dogs.start : dogs.end].sum(), abs=1e-5)
    (first_piece,) = tiny_blip.explain(image, caption, word_indices=[2], piece=0)
    assert first_piece.score == pytest.approx(per_token[dogs.start], abs=1e-5)


def test_contrastive_target_is_the_log_p_difference(tiny_blip, caption):
    image = random_image(2)
    position = caption.words[1].start  # "red"
    with torch.no_grad():
        logits = tiny_blip.model(
            pixel_values=tiny_blip.pixel_values([image]), input_ids=torch.tensor([CAPTION_IDS])
        ).logits[0]
    log_probs = logits[position - 1].log_softmax(-1)
    expected = (log_probs[VOCABULARY["red"]] - log_probs[VOCABULARY["blue"]]).item()
    (maps,) = tiny_blip.explain(image, caption, word_indices=[1], foil="blue")
    assert maps.score == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="single word piece"):
        tiny_blip.explain(image, caption, word_indices=[1], foil="zebra crossing")


def test_all_layers_in_one_pass_equal_one_pass_per_layer(tiny_blip, caption):
    image = random_image(3)
    (maps,) = tiny_blip.explain(image, caption, word_indices=[2], method="hirescam")
    dogs = caption.words[2]
    for layer_index, layer in enumerate(tiny_blip.vision_layers):
        captured: dict[str, torch.Tensor] = {}
        # First call only: BLIP's final LayerNorm runs again on the pooled token.
        handle = layer.register_forward_hook(
            lambda module, inputs, output, sink=captured: sink.setdefault("output", output)
        )
        try:
            pixel_values = tiny_blip.pixel_values([image]).requires_grad_(True)
            with torch.enable_grad():
                logits = tiny_blip.model(pixel_values=pixel_values, input_ids=torch.tensor([CAPTION_IDS])).logits
                log_probs = logits[0].log_softmax(-1)
                score = sum(log_probs[p - 1, CAPTION_IDS[p]] for p in range(dogs.start, dogs.end))
                (gradient,) = torch.autograd.grad(score, captured["output"])
        finally:
            handle.remove()
        expected = hires_cam(captured["output"][0, 1:], gradient[0, 1:])
        np.testing.assert_allclose(maps.cam_patches[layer_index], expected.detach().numpy(), rtol=1e-4, atol=1e-9)
    assert maps.cam_patches.shape == (len(tiny_blip.vision_layers), tiny_blip.image_geometry(image.size).patch_count)


@pytest.mark.parametrize("method", ["hirescam", "gradcam", "cross_attention_softmax", "cross_attention", "occlusion"])
def test_all_words_at_once_equal_each_word_alone(tiny_blip, caption, method):
    image = random_image(4)
    together = tiny_blip.explain(image, caption, method=method)
    assert [maps.word for maps in together] == [word.text for word in caption.words]
    for index, maps in enumerate(together):
        (alone,) = tiny_blip.explain(image, caption, word_indices=[index], method=method)
        assert maps.score == pytest.approx(alone.score, abs=1e-5)
        np.testing.assert_allclose(maps.cam_patches, alone.cam_patches, rtol=1e-4, atol=1e-9)
        assert maps.cam_patches.shape[0] == len(tiny_blip.layer_names(method))
        assert np.isfinite(maps.cam_patches).all() and (maps.cam_patches >= 0).all()


@pytest.mark.parametrize("method", ["cross_attention_softmax", "cross_attention"])
def test_cross_attention_ends_with_the_mean_over_decoder_layers_shown_first(tiny_blip, caption, method):
    (maps,) = tiny_blip.explain(random_image(11), caption, word_indices=[2], method=method)
    layer_count = len(tiny_blip.cross_attentions)
    assert maps.cam_patches.shape[0] == layer_count + 1
    assert maps.layer_names[-1] == f"decoder cross-attention, mean of all {layer_count} layers"
    assert maps.cam_patches[:layer_count].max() > 0, "the mean of blank maps would prove nothing"
    np.testing.assert_allclose(maps.cam_patches[-1], maps.cam_patches[:layer_count].mean(axis=0), rtol=1e-5, atol=1e-9)
    assert tiny_blip.default_layer(method) == layer_count
    assert tiny_blip.default_layer("hirescam") == len(tiny_blip.vision_layers) - 1


def test_occlusion_is_the_drop_in_log_p_when_a_patch_is_zeroed(tiny_blip, caption):
    image = random_image(5)
    (maps,) = tiny_blip.explain(image, caption, word_indices=[4], method="occlusion")
    position = caption.words[4].start
    pixel_values = tiny_blip.pixel_values([image])
    patch = tiny_blip.patch_size

    def log_p(pixels: torch.Tensor) -> float:
        with torch.no_grad():
            logits = tiny_blip.model(pixel_values=pixels, input_ids=torch.tensor([CAPTION_IDS])).logits
        return logits[0, position - 1].log_softmax(-1)[CAPTION_IDS[position]].item()

    occluded = pixel_values.clone()
    occluded[:, :, patch : 2 * patch, 2 * patch : 3 * patch] = 0  # patch row 1, column 2
    expected = max(log_p(pixel_values) - log_p(occluded), 0.0)
    columns = tiny_blip.image_geometry(image.size).views[0].grid_shape[1]
    assert maps.cam_patches[0, 1 * columns + 2] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("image_size", [(80, 48), (40, 120)])
def test_squash_geometry_matches_the_real_processor(tiny_blip, image_size):
    assert_patch_boxes_reach_their_own_patches(tiny_blip, image_size)


def test_no_hook_is_left_even_after_an_error(tiny_blip, caption, monkeypatch):
    image = random_image(6)
    tiny_blip.explain(image, caption, word_indices=[0])  # transformers installs its own hooks once
    hooks_before = count_forward_hooks(tiny_blip.model)

    def broken_decoder(*args, **kwargs):
        raise RuntimeError("decoder failed")

    # The vision layers run (their hooks fire), then the decoder raises inside the hooked block.
    monkeypatch.setattr(tiny_blip.model.text_decoder, "forward", broken_decoder)
    for method in ("hirescam", "cross_attention"):
        with pytest.raises(RuntimeError, match="decoder failed"):
            tiny_blip.explain(image, caption, method=method)
    assert count_forward_hooks(tiny_blip.model) == hooks_before


def test_explaining_leaves_no_gradient_on_shared_parameters(tiny_blip, caption):
    tiny_blip.explain(random_image(7), caption)
    assert all(parameter.grad is None for parameter in tiny_blip.model.parameters())
    assert not any(parameter.requires_grad for parameter in tiny_blip.model.parameters())


def test_threads_sharing_one_explainer_get_what_they_get_alone(tiny_blip, caption):
    jobs = [(random_image(10 + index), index % len(caption.words), method)
            for index, method in enumerate(["hirescam", "cross_attention", "gradcam", "hirescam"])]
    assert_threads_get_what_they_get_alone(tiny_blip, caption, jobs, repeats=5, score_atol=1e-6, rtol=1e-5, atol=1e-10)


def test_caption_respects_max_new_tokens_and_prompt(tiny_blip):
    image = random_image(8)
    caption = tiny_blip.caption(image, max_new_tokens=4)
    assert caption.token_ids[0] == BOS_ID
    assert len(caption.token_ids) <= 1 + 4
    prompted = tiny_blip.caption(image, prompt="a picture of", max_new_tokens=3)
    assert prompted.token_ids[:4] == (BOS_ID, VOCABULARY["a"], VOCABULARY["picture"], VOCABULARY["of"])
    assert prompted.prompt_length == 4
    assert all(word.start >= 4 for word in prompted.words)
    assert prompted.text.startswith("a picture of")


@pytest.fixture(scope="module")
def endless_blip() -> BlipExplainer:
    """A tiny BLIP with 8 token positions that never ends a caption: it always writes "dog"."""
    model, processor = build_tiny_blip(max_positions=8)
    model.text_decoder.get_output_embeddings().bias.data[VOCABULARY["dog"]] = 1e4
    return BlipExplainer(model, processor)


def test_generation_stops_at_the_models_position_limit(endless_blip):
    image = random_image(9)
    assert endless_blip.max_caption_tokens == 8
    caption = endless_blip.caption(image, max_new_tokens=60, num_beams=2)  # used to raise IndexError
    assert caption.token_ids == (BOS_ID,) + (VOCABULARY["dog"],) * 7
    prompted = endless_blip.caption(image, prompt="a picture of", max_new_tokens=60)
    assert prompted.token_ids == (BOS_ID, VOCABULARY["a"], VOCABULARY["picture"], VOCABULARY["of"]) + (
        VOCABULARY["dog"],
    ) * 4


def test_a_prompt_that_fills_every_position_is_refused_with_a_message(endless_blip):
    with pytest.raises(PromptTooLongError, match="takes 9 of the model's 8 token positions"):
        endless_blip.caption(random_image(9), prompt="a red dog on grass and a cat")


def test_unknown_method_is_refused(tiny_blip, caption):
    with pytest.raises(ValueError, match="unknown method"):
        tiny_blip.explain(random_image(9), caption, method="magic")


def test_deepest_vision_map_is_not_blank(tiny_blip, caption):
    """The last layer feeds only a LayerNorm, whose input gradient is orthogonal to its input:
    gradient x activation on the raw output is zero, so the explainer reads the normalised one."""
    image = random_image(11)
    maps = tiny_blip.explain(image, caption, method="hirescam")
    assert all(word_maps.cam_patches[-1].max() > 0 for word_maps in maps)
    raw_last_layer = tiny_blip.model.vision_model.encoder.layers[-1]
    with capture_outputs([raw_last_layer]) as captured, torch.enable_grad():
        pixel_values = tiny_blip.pixel_values([image]).requires_grad_(True)
        logits = tiny_blip.model(pixel_values=pixel_values, input_ids=torch.tensor([CAPTION_IDS])).logits
        score = logits[0, 1].log_softmax(-1)[CAPTION_IDS[2]]
        (gradient,) = torch.autograd.grad(score, captured)
    assert hires_cam(captured[0][0, 1:], gradient[0, 1:]).abs().max() < 1e-6


def surviving_denormals() -> float:
    """Share of denormal results that survive an elementwise product big enough for torch to
    split across its intra-op threads: 1e-30 x 1e-10 is below float32's smallest normal number
    (1.2e-38), so it becomes zero exactly where flushing is on."""
    product = torch.full((1 << 20,), 1e-30) * 1e-10
    return (product != 0).float().mean().item()


@pytest.mark.skipif(not torch.set_flush_denormal(False), reason="this CPU cannot flush denormals")
def test_a_fresh_thread_flushes_denormals_in_all_its_workers_while_it_explains(tiny_blip, caption):
    """The flag belongs to each CPU thread: every Streamlit session has a thread of its own, and
    each of those has its own intra-op worker threads, created with the state it had then."""
    seen: dict[str, float] = {}

    def record(module, inputs, output) -> None:
        seen["during_forward"] = surviving_denormals()

    def work() -> None:
        with torch_threads(2):
            seen["before"] = surviving_denormals()  # creates the workers, without flushing
            handle = tiny_blip.model.vision_model.encoder.layers[0].register_forward_hook(record)
            try:
                tiny_blip.explain(random_image(20), caption, [1])
            finally:
                handle.remove()

    torch.set_flush_denormal(False)  # new threads inherit the creating thread's state
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == {"before": 1.0, "during_forward": 0.0}


@pytest.mark.parametrize("method", ["hirescam", "cross_attention", "occlusion"])
def test_flushing_denormals_keeps_maps_within_float32_rounding(tiny_blip, caption, method):
    unflushed = BlipExplainer(tiny_blip.model, tiny_blip.processor, tiny_blip.device, flush_denormals=False)
    image = random_image(21)
    for flushed_maps, plain_maps in zip(
        tiny_blip.explain(image, caption, method=method), unflushed.explain(image, caption, method=method), strict=True
    ):
        assert flushed_maps.score == pytest.approx(plain_maps.score, abs=1e-6)
        np.testing.assert_allclose(flushed_maps.cam_patches, plain_maps.cam_patches, rtol=1e-5, atol=1e-10)


def test_a_bfloat16_captioner_captions_and_explains_close_to_float32(tiny_blip_dir, tiny_blip, caption):
    from models.families import load_captioner

    half = load_captioner(str(tiny_blip_dir), device="cpu", precision="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    image = random_image(4)
    assert half.caption(image, max_new_tokens=4).token_ids[0] == BOS_ID
    # Gradient maps follow float32's; occlusion's log-p drops on this tiny random model are
    # below bfloat16's resolution, so only its shape and finiteness are checked.
    for method in ("gradcam", "cross_attention", "occlusion"):
        (full_maps,) = tiny_blip.explain(image, caption, [1], method=method)
        (half_maps,) = half.explain(image, caption, [1], method=method)
        assert half_maps.cam_patches.dtype == np.float32 and np.isfinite(half_maps.cam_patches).all()
        assert half_maps.cam_patches.shape == full_maps.cam_patches.shape
        if method != "occlusion":
            assert np.corrcoef(full_maps.cam_patches[-1], half_maps.cam_patches[-1])[0, 1] > 0.9, method
    half_log_p = half.token_log_probs([image], caption.token_ids)[0, 1:]
    np.testing.assert_allclose(half_log_p, tiny_blip.token_log_probs([image], caption.token_ids)[0, 1:], atol=0.1)
