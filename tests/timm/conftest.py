"""Fixtures of the timm adapter tests: a small input batch and a stock (cross-entropy) checkpoint."""

from __future__ import annotations

import pytest
import safetensors.torch
import timm
import torch


@pytest.fixture
def x():
    """Two random 32x32 RGB images [2, 3, 32, 32]."""
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def ce_weights(tmp_path_factory):
    """A stock (cross-entropy) test_resnet with 5 classes, saved as .safetensors and .pth."""
    directory = tmp_path_factory.mktemp("ce")
    torch.manual_seed(3)
    state = timm.create_model("test_resnet", num_classes=5).state_dict()
    safetensors.torch.save_file(state, str(directory / "ce.safetensors"))
    torch.save(state, directory / "ce.pth")
    return directory, state


@pytest.fixture
def same_backbone():
    """``same_backbone(model, state)``: every non-classifier tensor of ``state`` equals the model's."""

    def check(model, state, classifier: str = "fc."):
        current = model.state_dict()
        return all(torch.equal(current[k], v) for k, v in state.items() if not k.startswith(classifier))

    return check
