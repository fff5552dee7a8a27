"""Speed and memory of token Grad-CAM on the full BLIP-base architecture (random weights).

Random weights cost exactly what the real checkpoint costs (same config, same shapes), and
need no download. Every number is the median of ``--repeats`` runs, measured side by side in
this one process so that ratios are fair on a busy machine. The ``_unflushed`` measures run the
same work without flushing denormal floats, which on some CPUs is ten times slower.

    python bench/speed.py --json bench/results/speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from models.denormals import set_flush_denormal_everywhere
from models.explainer import CaptionerExplainer
from models.families import explainer_for_model
from models.hooks import capture_outputs
from utils.image_utils import overlay_heatmap
from utils.video_utils import encode_mp4, layer_frames


def build_blip_base_architecture(flush_denormals: bool = True) -> CaptionerExplainer:
    """BLIP base as configured by ``BlipConfig()`` defaults, random weights, synthetic vocabulary."""
    config = BlipConfig()
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval().requires_grad_(False)
    text_config = config.text_config
    vocabulary = {f"word{index}": index for index in range(text_config.vocab_size)}
    for name, index in [("[PAD]", text_config.pad_token_id), ("[SEP]", text_config.sep_token_id),
                        ("[DEC]", text_config.bos_token_id), ("[UNK]", 100), ("[CLS]", 101)]:
        vocabulary.pop(next(word for word, value in vocabulary.items() if value == index))
        vocabulary[name] = index
    size = config.vision_config.image_size
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": size, "width": size}),
        tokenizer=BertTokenizer(vocab=vocabulary),
    )
    return explainer_for_model(model, processor, torch.device("cpu"), flush_denormals)


def interleaved_medians(functions: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed in interleaved rounds (A, B, C, A, B, C, ...), so a
    slow spell on a shared machine hits every measure alike and the ratios stay fair."""
    timings: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            timings[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in timings.items()}


def forward_and_gradient(
    explainer: CaptionerExplainer, image: Image.Image, token_ids: list[int], position: int, layers: list
) -> None:
    """One forward pass and one gradient of one token with respect to the given vision layers."""
    set_flush_denormal_everywhere(explainer.flush_denormals)  # as the explainer's own methods do
    inputs = {
        name: value.requires_grad_(True) if value.is_floating_point() else value
        for name, value in explainer.model_inputs([image]).items()
    }
    with torch.enable_grad(), capture_outputs(layers) as captured:
        logits = explainer.teacher_forced_logits(inputs, torch.tensor([token_ids]))
        score = logits[0, position - 1].log_softmax(-1)[token_ids[position]]
        torch.autograd.grad(score, captured)


def naive_all_layers(explainer: CaptionerExplainer, image: Image.Image, token_ids: list[int], position: int) -> None:
    """The reference design's way: a separate forward and backward pass for every layer."""
    for layer in explainer.methods["gradcam"].modules:
        forward_and_gradient(explainer, image, token_ids, position, [layer])


def first_heatmap(explainer: CaptionerExplainer, image: Image.Image, caption, word: int) -> np.ndarray:
    """What the page does between showing the caption and showing the first heatmap: the chosen
    word's maps alone (the other words are filled in after), drawn over the displayed image.

    Grad-CAM, like the other measures: its gradient crosses the whole vision tower, so it costs
    at least what the default method (gradient x cross-attention, decoder only) costs.
    """
    (maps,) = explainer.explain(image, caption, [word], method="gradcam")
    heat = explainer.image_geometry(image.size).cams_to_image(maps.cam_patches)
    return overlay_heatmap(image, heat[explainer.default_layer(maps.method)])


def encode_layer_video(explainer: CaptionerExplainer, image: Image.Image, cam_patches: np.ndarray) -> bytes:
    """The app's video: every layer's overlay held, cross-faded, encoded as H.264."""
    heat_maps = explainer.image_geometry(image.size).cams_to_image(cam_patches)
    labels = explainer.layer_names("gradcam")
    frames = layer_frames(image, heat_maps, labels, "word", alpha=0.5, colormap="jet", hold_frames=12, fade_frames=6)
    return encode_mp4(frames, fps=12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--words", type=int, default=8, help="caption length in words")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)

    explainer = build_blip_base_architecture()
    unflushed = explainer_for_model(explainer.model, explainer.processor, explainer.device, flush_denormals=False)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    bos, sep = explainer.model.config.text_config.bos_token_id, explainer.model.config.text_config.sep_token_id
    token_ids = [bos, *range(1000, 1000 + arguments.words), sep]
    caption = explainer.caption_from_ids(token_ids)
    word = len(caption.words) // 2
    position = caption.words[word].start
    repeats = arguments.repeats

    (maps,) = explainer.explain(image, caption, [word], method="gradcam")  # warm-up: allocator, hooks
    first_layer = explainer.methods["gradcam"].modules[:1]  # the vision layers Grad-CAM reads
    results = interleaved_medians(
        {
            # The floor: the gradient reaches the first vision layer, so it crosses all of them.
            "fwd_bwd_s": lambda: forward_and_gradient(explainer, image, token_ids, position, first_layer),
            "fwd_bwd_unflushed_s": lambda: forward_and_gradient(unflushed, image, token_ids, position, first_layer),
            "all_layers_one_word_s": lambda: explainer.explain(image, caption, [word], method="gradcam"),
            "all_layers_one_word_unflushed_s": lambda: unflushed.explain(image, caption, [word], method="gradcam"),
            "first_heatmap_s": lambda: first_heatmap(explainer, image, caption, word),
            "naive_all_layers_one_word_s": lambda: naive_all_layers(explainer, image, token_ids, position),
            "all_words_all_layers_s": lambda: explainer.explain(image, caption, method="gradcam"),
            "caption_s": lambda: explainer.caption(image, max_new_tokens=20),
            "video_encode_s": lambda: encode_layer_video(explainer, image, maps.cam_patches),
        },
        arguments.repeats,
    )
    results["n_words"] = len(caption.words)
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["ratios"] = {
        "all_layers_one_word / fwd_bwd": results["all_layers_one_word_s"] / results["fwd_bwd_s"],
        "naive_all_layers_one_word / fwd_bwd": results["naive_all_layers_one_word_s"] / results["fwd_bwd_s"],
        "all_words_all_layers / (n_words x fwd_bwd)": results["all_words_all_layers_s"]
        / (results["n_words"] * results["fwd_bwd_s"]),
        "first_heatmap / all_layers_one_word": results["first_heatmap_s"] / results["all_layers_one_word_s"],
        "fwd_bwd_unflushed / fwd_bwd": results["fwd_bwd_unflushed_s"] / results["fwd_bwd_s"],
        "all_layers_one_word_unflushed / all_layers_one_word": results["all_layers_one_word_unflushed_s"]
        / results["all_layers_one_word_s"],
    }
    results["setup"] = {
        "model": "BlipConfig() defaults, random weights",
        "parameters_m": sum(parameter.numel() for parameter in explainer.model.parameters()) / 1e6,
        "grid": explainer.image_geometry(image.size).views[0].grid_shape,
        "patch_size": explainer.patch_size,
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "denormals_flushed": explainer.flush_denormals,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor()}",
    }

    width = max(len(key) for key in results)
    for key, value in results.items():
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                print(f"{key + ': ' + sub_key:<{width + 40}} {sub_value}")
        else:
            print(f"{key:<{width + 40}} {value:.3f}" if isinstance(value, float) else f"{key:<{width + 40}} {value}")
    if arguments.json:
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        arguments.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
