"""The ART bridge: ZMaskPreprocessor (forward value, straight-through gradient, layouts), ZMaskDetector
(fit, detect, errors), and ART's own AdversarialPatchPyTorch run end to end against a defended model."""

from __future__ import annotations

import importlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("art")

from art.attacks.evasion import AdversarialPatchPyTorch  # noqa: E402
from art.estimators.classification import PyTorchClassifier  # noqa: E402

from tests.toy import TOY_CONFIG, ToyNet, clean_batches, fitted_toy_defense, patched_batch  # noqa: E402
from zmask import FusionTraining, ZMask  # noqa: E402
from zmask.attacks import random_noise_patch  # noqa: E402
from zmask.errors import ConfigError, NotFittedError, ZMaskError  # noqa: E402
from zmask.evaluation import FitPlan  # noqa: E402
from zmask.integrations.art import ZMaskDetector, ZMaskPreprocessor  # noqa: E402

SHAPE = (3, 96, 128)
CLASSES = 4


class ToyClassifier(nn.Module):
    """ToyNet with a linear head on its channel maxima (so that a local patch can move the logits)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = ToyNet()
        self.head = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).amax((2, 3)))


def classifier(model: nn.Module, defences=None) -> PyTorchClassifier:
    return PyTorchClassifier(model, nn.CrossEntropyLoss(), input_shape=SHAPE, nb_classes=CLASSES, clip_values=(0.0, 1.0),
                             preprocessing_defences=defences, device_type="cpu")


def patch_attack(estimator: PyTorchClassifier) -> AdversarialPatchPyTorch:
    return AdversarialPatchPyTorch(estimator, rotation_max=20.0, scale_min=0.35, scale_max=0.45, learning_rate=0.2, max_iter=40,
                                   batch_size=8, patch_shape=(3, 40, 40), patch_type="square", targeted=True, verbose=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second thread only adds synchronisation (10x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------- preprocessor
@pytest.fixture(scope="module")
def toy_defense() -> ZMask:
    return fitted_toy_defense()


@pytest.fixture(scope="module")
def mixed_batch(toy_defense) -> torch.Tensor:
    """Two patched and two clean toy images; the patched ones are flagged, the clean ones not."""
    patched, _ = patched_batch(2, seed=5)
    images = torch.cat([patched, clean_batches(1, 2, seed=11)[0]])
    flagged = toy_defense.detect(images).flagged
    assert flagged.tolist() == [True, True, False, False]
    return images


def test_forward_is_the_masked_input_zmask_reprocesses(toy_defense, mixed_batch):
    expected = toy_defense.apply_mask(mixed_batch, toy_defense.detect(mixed_batch).keep_mask)
    with torch.no_grad():
        masked, y = ZMaskPreprocessor(toy_defense).forward(mixed_batch, "labels")
    assert y == "labels" and torch.equal(masked, expected)
    assert not torch.equal(masked[:2], mixed_batch[:2]) and torch.equal(masked[2:], mixed_batch[2:])
    x = mixed_batch.clone().requires_grad_(True)  # the straight-through estimate leaves the values as they are
    assert torch.equal(ZMaskPreprocessor(toy_defense).forward(x)[0].detach(), expected)


def test_channels_last_layout(toy_defense, mixed_batch):
    first, _ = ZMaskPreprocessor(toy_defense).forward(mixed_batch)
    last, _ = ZMaskPreprocessor(toy_defense, channels_first=False).forward(mixed_batch.permute(0, 2, 3, 1).contiguous())
    assert torch.equal(last, first.permute(0, 2, 3, 1))


def _input_gradient(preprocessor: ZMaskPreprocessor, images: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    x = images.clone().requires_grad_(True)
    (preprocessor.forward(x)[0] * upstream).sum().backward()
    return x.grad


def test_straight_through_gradient_sees_through_the_mask(toy_defense, mixed_batch):
    upstream = torch.randn(mixed_batch.shape, generator=torch.Generator().manual_seed(0))
    keep = toy_defense.detect(mixed_batch).keep_mask
    through = _input_gradient(ZMaskPreprocessor(toy_defense), mixed_batch, upstream)
    identity = _input_gradient(ZMaskPreprocessor(toy_defense, gradient="identity"), mixed_batch, upstream)
    assert torch.equal(identity, upstream)
    assert torch.isfinite(through).all()
    # Where the mask is constant (masked pixels with the mask treated as fixed) the gradient would be
    # upstream * keep; the estimate adds the path through the soft mask and the flag: not zero on the
    # masked pixels of the flagged images, whose value does not depend on x at all.
    hidden = keep.expand_as(mixed_batch) == 0
    assert hidden[:2].any() and through[:2][hidden[:2]].abs().max() > 0
    assert (through - upstream * keep).abs().flatten(1).amax(1)[:2].min() > 0


def test_preprocessor_rejects_bad_settings_and_input(toy_defense):
    with pytest.raises(ConfigError, match="gradient"):
        ZMaskPreprocessor(toy_defense, gradient="bpda")
    with pytest.raises(ZMaskError, match="ZMask"):
        ZMaskPreprocessor(ToyNet())
    with pytest.raises(ZMaskError, match="channels"):
        ZMaskPreprocessor(toy_defense).forward(torch.rand(1, 96, 128, 3))


# ---------------------------------------------------------------------------------------- detector
def test_detector_report_and_errors(toy_defense, mixed_batch):
    detector = ZMaskDetector(toy_defense)
    report, flagged = detector.detect(mixed_batch.numpy(), batch_size=3)
    analysis = toy_defense.detect(mixed_batch)
    assert flagged.tolist() == analysis.flagged.tolist() and flagged.dtype == bool
    np.testing.assert_allclose(report["score"], analysis.score.detach().numpy(), rtol=1e-6)
    assert report["threshold"] == toy_defense.state.threshold and report["patch_mask"].shape == (4, 96, 128)
    assert report["patch_mask"][:2].any(axis=(1, 2)).all()
    _, last = ZMaskDetector(toy_defense, channels_first=False).detect(mixed_batch.permute(0, 2, 3, 1).numpy())
    assert last.tolist() == flagged.tolist()
    unfitted = ZMaskDetector(ZMask(ToyNet(), TOY_CONFIG))
    with pytest.raises(NotFittedError):
        unfitted.detect(mixed_batch.numpy())
    with pytest.raises(ConfigError, match="patches"):
        unfitted.fit(mixed_batch.numpy())


def test_import_zmask_does_not_load_art_and_missing_art_is_a_clear_error(monkeypatch):
    code = "import sys, zmask, zmask.integrations; print('art' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
    monkeypatch.setitem(sys.modules, "art", None)  # what an environment without ART looks like to import
    monkeypatch.delitem(sys.modules, "zmask.integrations.art")
    with pytest.raises(ImportError, match=r"zmask\[art\]") as error:
        importlib.import_module("zmask.integrations.art")
    assert isinstance(error.value, ZMaskError)


# ---------------------------------------------------------------------------------------- ART end to end
@pytest.fixture(scope="module")
def art_run() -> dict[str, float]:
    return art_experiment()


def art_experiment() -> dict[str, float]:
    """Fit ZMaskDetector on clean toy images (fusion block on random-noise patches), craft a targeted
    patch with ART's AdversarialPatchPyTorch against the undefended ART classifier, and measure on
    held-out images; then craft one against the defended classifier (gradients through the
    preprocessor). Takes a few seconds."""
    np.random.seed(0)
    torch.manual_seed(0)
    model = ToyClassifier().eval()
    config = TOY_CONFIG.replace(shallow_layers=("body.c1", "body.c2"), deep_layers=("body.c2", "body.c3"), mask_dilation=4, fill_value=0.5)
    train = torch.cat(clean_batches(8, 4, seed=0)).numpy()
    test = torch.cat(clean_batches(4, 4, seed=7)).numpy()
    detector = ZMaskDetector(ZMask(model, config))
    plan = FitPlan(12, 12, 8, placements=4, fusion=FusionTraining(epochs=30, batch_size=8, learning_rate=0.05, min_steps=300))
    detector.fit(train, patches=[random_noise_patch((32, 32), seed=s) for s in range(4)], plan=plan)

    plain = classifier(model)
    defended = classifier(model, [ZMaskPreprocessor(detector.defense)])
    clean_labels = plain.predict(test).argmax(1)
    logits = plain.predict(test).mean(0)
    logits[np.bincount(clean_labels, minlength=CLASSES).argmax()] = -np.inf
    target = int(logits.argmax())  # the runner-up class
    attacked_images = train[:8]
    goal = np.eye(CLASSES)[[target] * len(attacked_images)]

    figures: dict[str, float] = {}
    for name, estimator in (("plain", plain), ("adaptive", defended)):
        attack = patch_attack(estimator)
        attack.generate(attacked_images, y=goal)
        patched = attack.apply_patch(test, scale=0.4).astype(np.float32)
        figures[f"{name}_flag_rate"] = float(detector.detect(patched)[1].mean())
        figures[f"{name}_success_undefended"] = float((plain.predict(patched).argmax(1) == target).mean())
        figures[f"{name}_success_defended"] = float((defended.predict(patched).argmax(1) == target).mean())
    figures["clean_flag_rate"] = float(detector.detect(test)[1].mean())
    figures["clean_accuracy_defended"] = float((defended.predict(test).argmax(1) == clean_labels).mean())
    print("ART figures:", figures)
    return figures


def test_art_patch_is_flagged_and_defused(art_run):
    assert art_run["plain_success_undefended"] >= 0.75  # the ART attack works on the undefended model
    assert art_run["plain_flag_rate"] >= 0.8 and art_run["clean_flag_rate"] <= 0.2
    assert art_run["plain_success_defended"] <= art_run["plain_success_undefended"] - 0.5
    assert art_run["clean_accuracy_defended"] >= 0.8


def test_art_attack_through_the_preprocessor_optimises_a_patch(art_run):
    """ART's attack gets its gradients through ZMaskPreprocessor (straight-through): the patch it
    crafts against the defended classifier is a working patch (with no gradient it would stay the
    initial grey square and fool nothing). On this toy it is still flagged and masked."""
    assert art_run["adaptive_success_undefended"] >= 0.75


def test_robust_dpatch_through_an_art_object_detector():
    """The detection path: ART's RobustDPatch against ART's PyTorchObjectDetector wrapping a torchvision
    Faster R-CNN (random weights, 320 x 320) with ZMaskPreprocessor as its preprocessing defence.
    Random weights give tiny gradients, so what is checked is the plumbing: predictions and loss
    gradients go through the defence, the model's train/eval modes survive it, and the patch ART
    produces is flagged on held-out images while the clean ones are not."""
    from art.attacks.evasion import RobustDPatch
    from art.estimators.object_detection import PyTorchObjectDetector
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    from zmask import ZMaskConfig
    from zmask.models import TorchvisionDetector

    torch.manual_seed(0)
    raw = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=5).eval()
    config = ZMaskConfig.for_detection(["model.backbone.body.1", "model.backbone.body.2"], ["model.backbone.body.2", "model.backbone.body.4"],
                                       input_size=(320, 320))
    images = np.random.default_rng(0).uniform(0.3, 0.7, (20, 3, 320, 320)).astype(np.float32)
    detector = ZMaskDetector(ZMask(TorchvisionDetector(raw), config))
    detector.fit(images[:16], patches=[random_noise_patch((80, 80), seed=0)], plan=FitPlan(4, 6, 6))
    estimator = PyTorchObjectDetector(raw, input_shape=(3, 320, 320), clip_values=(0.0, 1.0), device_type="cpu",
                                      attack_losses=("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"),
                                      preprocessing_defences=[ZMaskPreprocessor(detector.defense)])
    assert len(estimator.predict(images[16:18])) == 2
    targets = [{"boxes": np.array([[10.0, 10.0, 100.0, 100.0]], dtype=np.float32), "labels": np.array([1]),
                "scores": np.array([1.0], dtype=np.float32)}] * 2
    gradient = estimator.loss_gradient(images[:2], targets)
    assert gradient.shape == (2, 3, 320, 320) and np.isfinite(gradient).all()
    assert raw.training  # ART leaves its model in train mode; the defence ran in eval mode and gave the mode back
    attack = RobustDPatch(estimator, patch_shape=(3, 64, 64), patch_location=(100, 100), max_iter=1, batch_size=2, sample_size=1,
                          learning_rate=0.1, targeted=True, verbose=False)
    patch = attack.generate(images[:2], y=targets)
    assert patch.shape == (3, 64, 64)
    _, flagged = detector.detect(attack.apply_patch(images[16:]))
    _, clean_flagged = detector.detect(images[16:])
    assert raw.training
    assert flagged.mean() >= 0.75 and clean_flagged.mean() <= 0.25
