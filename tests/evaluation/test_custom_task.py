"""A task registered in this file alone (image classification) runs through the experiment
runner and the reports without any change to them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from zmask import ZMask
from zmask.evaluation import ExperimentSpec, build_defenses, run_experiments
from zmask.tasks import TASKS, register_task, stack_items

from ..toy import TOY_CONFIG, ToyNet, clean_batches, patched_batch


class Accuracy:
    def __init__(self) -> None:
        self.correct = self.total = 0

    def compute(self) -> dict[str, float]:
        return {"accuracy": self.correct / max(self.total, 1)}


class ClassificationTask:
    name: ClassVar[str] = "toy_classification"
    metric_key: ClassVar[str] = "accuracy"
    paper_patch_sizes: ClassVar = ((96, 128), {"L": (32, 32)})
    objectives: ClassVar[tuple[str, ...]] = ("untargeted",)

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def forward(self, images):
        return self.model(images)

    def collate(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return stack_items(items, ("image", "label"))

    def attack_terms(self, output, batch, images, patch_masks, weight, objective="untargeted"):
        return {"ce": (weight, -nn.functional.cross_entropy(output, batch["label"]))}

    def metric(self) -> Accuracy:
        return Accuracy()

    def update_metric(self, accumulator: Accuracy, output, batch, patch_masks) -> None:
        accumulator.correct += int((output.argmax(1) == batch["label"]).sum())
        accumulator.total += len(batch["label"])

    def render(self, axis, image, output) -> None:
        axis.imshow(image.permute(1, 2, 0).numpy())
        axis.set_xlabel(f"class {int(output.argmax())}")

    def overlay(self, image, output):
        return image


class ToyClassifier(nn.Module):
    """The toy network with a global-average-pooled linear head (4 classes)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = ToyNet()
        self.head = nn.Linear(32, 4)

    def forward(self, images):
        return self.head(self.body(images).mean((2, 3)))


@pytest.fixture
def classification():
    register_task(ClassificationTask)
    yield ClassificationTask
    TASKS.remove(ClassificationTask.name)


def test_toy_classification_task_runs_the_experiments(tmp_path, classification):
    model = ToyClassifier().eval()
    body_layers = TOY_CONFIG.replace(shallow_layers=("body.c1", "body.c2"), deep_layers=("body.c2", "body.c3"))
    defense = ZMask(model, body_layers, seed=0)
    defense.fit_statistics(clean_batches(3))
    images, masks = patched_batch(4)
    defense.fit_fusion([(torch.cat([clean_batches(1, 4)[0], images]), torch.cat([torch.zeros_like(masks), masks]))])
    defense.calibrate([(torch.cat([clean_batches(1, 4, seed=5)[0], images]), torch.cat([torch.zeros_like(masks), masks]))])
    generator = torch.Generator().manual_seed(3)
    data = [{"image": torch.rand(3, 96, 128, generator=generator) * 0.2 + 0.4, "label": torch.tensor(i % 4)} for i in range(6)]
    patch = (torch.rand(3, 32, 32, generator=generator) > 0.5).float()
    task = TASKS.get("toy_classification")(model)
    masking, detectors = build_defenses(model, defense, data, [patch], ["zmask", "lgs", "none", "hn"], progress=False, batch_size=3)
    spec = ExperimentSpec("toy classification", {"L": patch}, seed=0, batch_size=3, examples=1)
    results = run_experiments(task, data, defense, spec, masking, detectors, tmp_path, progress=False)
    assert results["metric"] == "accuracy"
    assert set(results["masking"]["L"]) == {"zmask", "lgs", "none", "hn"}
    assert all(0.0 <= results["masking"][s][d]["accuracy"] <= 1.0 for s in ("no patch", "L") for d in ("zmask", "lgs", "none"))
    assert "hn" in results["detection"]["L"] and "zmask" in results["detection"]["L"]
    assert "accuracy" in (tmp_path / "summary.md").read_text() and (tmp_path / "examples.png").is_file()
    assert json.loads((tmp_path / "results.json").read_text())["results"]["metric"] == "accuracy"
