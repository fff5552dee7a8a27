"""The training script's shortcuts change only how fast the decoder demo trains, never what it learns."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from utils.shapes_world import object_size_range

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_shapes_demo.py"


@pytest.fixture(scope="module")
def script():
    """scripts/train_shapes_demo.py as a module (its dataclasses need it in sys.modules)."""
    spec = importlib.util.spec_from_file_location("train_shapes_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_the_training_patch_embedding_gives_the_conv3d_s_outputs_and_gradients_on_images(script):
    torch.manual_seed(0)
    model = script.build_qwen2vl_for_training(script.build_qwen2vl_tokenizer())
    embedding = model.model.visual.patch_embed
    weight = embedding.proj.weight  # (D, 3, T, P, P)
    patches = script.image_patches(16, weight)
    outputs, gradients = [], []
    for forward in (embedding.forward, type(embedding).forward.__get__(embedding)):
        weight.grad = None
        output = forward(patches)
        output.square().sum().backward()
        outputs.append(output.detach())
        gradients.append(weight.grad.clone())
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    assert torch.allclose(gradients[0], gradients[1], atol=1e-4)
    assert gradients[0].abs().max() > 0


def test_the_curriculum_s_scenes_hold_only_the_larger_half_of_the_object_sizes(script):
    seeds = range(script.QWEN2VL_SEED_START, script.QWEN2VL_SEED_START + 60)
    size = (100, 150)
    smallest, largest = object_size_range(min(size))
    floor, _ = object_size_range(min(size), script.LARGE_OBJECT_FLOOR)
    assert smallest < floor < largest

    def object_sides(size_floor: float) -> list[int]:
        scenes = [script.training_scene(seed, size, size_floor) for seed in seeds]
        return [item.box[2] - item.box[0] for scene in scenes for item in scene.objects]

    assert min(object_sides(script.LARGE_OBJECT_FLOOR)) >= floor
    assert min(object_sides(0.0)) < floor
