"""Activation capture and clean statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zmask import ActivationCapture, StatisticsAccumulator
from zmask.core.statistics import resize_nearest, split_planes


class InPlaceNet(nn.Module):
    """conv -> in-place ReLU, a shared module used twice, and a tuple-returning block."""

    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, x - 1

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.shared = nn.Conv2d(4, 4, 1)
        self.pair = self.Pair()

    def forward(self, x):
        y = self.relu(self.conv(x))
        y = self.shared(self.shared(y))
        a, b = self.pair(y)
        return a + b


def test_capture_clones_before_inplace_ops():
    model = InPlaceNet()
    x = torch.randn(2, 3, 8, 8)
    with ActivationCapture(model, ["conv", "pair[1]"], on_repeat="error") as capture:
        model(x)
    expected = model.conv(x)
    torch.testing.assert_close(capture.activations["conv"], expected)
    assert (capture.activations["conv"] < 0).any(), "the in-place ReLU must not have changed the captured map"
    assert capture.activations["pair[1]"].shape == (2, 4, 8, 8)


def test_capture_repeat_policies():
    model = InPlaceNet()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="ran more than once"):
        with ActivationCapture(model, ["shared"]):
            model(x)
    results = {}
    for policy in ("first", "last"):
        with ActivationCapture(model, ["shared"], on_repeat=policy) as capture:
            model(x)
        results[policy] = capture.activations["shared"]
    first = model.shared(model.relu(model.conv(x)))
    torch.testing.assert_close(results["first"], first)
    torch.testing.assert_close(results["last"], model.shared(first))


def test_capture_errors_name_the_problem():
    model = InPlaceNet()
    with pytest.raises(ValueError, match="no layer 'convv'.*did you mean 'conv'"):
        ActivationCapture(model, ["convv"])
    with pytest.raises(ValueError, match=r"returns a tuple of 2 items.*pair\[0\]"):
        with ActivationCapture(model, ["pair"]):
            model(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="single tensor"):
        with ActivationCapture(model, ["conv[0]"]):
            model(torch.randn(1, 3, 8, 8))


def test_capture_is_differentiable_and_removes_hooks():
    model = InPlaceNet()
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    with ActivationCapture(model, ["conv"]) as capture:
        model(x)
    capture.activations["conv"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not model.conv._forward_hooks


def test_reference_estimator_is_mean_of_per_image_stats():
    generator = torch.Generator().manual_seed(0)
    maps = [torch.randn(3, 5, 6, 8, generator=generator) * (i + 1) + i for i in range(3)]
    accumulator = StatisticsAccumulator((6, 8))
    for batch in maps:
        accumulator.update({"layer": batch})
    stats = accumulator.compute()["layer"]
    everything = torch.cat(maps).double()
    torch.testing.assert_close(stats.mean.view(-1), everything.mean((2, 3)).mean(0).float())
    torch.testing.assert_close(stats.std.view(-1), everything.std((2, 3)).mean(0).float())
    assert accumulator.images == 9


def test_pooled_estimator_and_merge_match_one_pass():
    generator = torch.Generator().manual_seed(1)
    maps = [torch.randn(2, 4, 10, 12, generator=generator) * (i + 1) + 3 * i for i in range(4)]
    first, second = StatisticsAccumulator((10, 12), 2, "pooled"), StatisticsAccumulator((10, 12), 2, "pooled")
    for i, batch in enumerate(maps):
        (first if i < 2 else second).update({"layer": batch})
    first.merge(second)
    stats = first.compute()["layer"]
    planes = split_planes(torch.cat(maps).double(), 2)
    torch.testing.assert_close(stats.mean, planes.mean((0, 3)).float())
    torch.testing.assert_close(stats.std, planes.transpose(0, 2).reshape(2, 4, -1).transpose(0, 1).std(-1).float())


def test_statistics_are_taken_after_resizing():
    activation = torch.arange(4.0).view(1, 1, 2, 2)
    accumulator = StatisticsAccumulator((3, 3))
    accumulator.update({"layer": activation})
    resized = resize_nearest(activation, (3, 3))
    assert accumulator.compute()["layer"].mean.item() == pytest.approx(resized.mean().item())


def test_statistics_errors():
    with pytest.raises(ValueError, match="no clean images"):
        StatisticsAccumulator((4, 4)).compute()
    accumulator = StatisticsAccumulator((4, 4))
    accumulator.update({"layer": torch.randn(1, 3, 4, 4)})
    with pytest.raises(ValueError, match="changed its channel count"):
        accumulator.update({"layer": torch.randn(1, 5, 4, 4)})
    with pytest.raises(ValueError, match="B x C x H x W"):
        accumulator.update({"layer": torch.randn(1, 5)})


def test_statistics_merge_across_ranks_with_gloo(tmp_path):
    """Two processes, each with half of the images, end with the single-process statistics."""
    import torch.multiprocessing as mp

    generator = torch.Generator().manual_seed(4)
    maps = torch.randn(4, 3, 6, 8, generator=generator) * 2 + 1
    torch.save(maps, tmp_path / "maps.pt")
    mp.spawn(_rank_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    single = StatisticsAccumulator((6, 8), 1, "pooled")
    single.update({"layer": maps})
    expected = single.compute()["layer"]
    for rank in range(2):
        mean, std = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(mean, expected.mean)
        torch.testing.assert_close(std, expected.std)


def _rank_worker(rank: int, world: int, folder: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        maps = torch.load(f"{folder}/maps.pt")
        accumulator = StatisticsAccumulator((6, 8), 1, "pooled")
        accumulator.update({"layer": maps[rank::world]})
        accumulator.all_reduce()
        stats = accumulator.compute()["layer"]
        torch.save((stats.mean, stats.std), f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_uncopied_capture_falls_back_to_copies_when_the_model_changes_a_layer_in_place():
    """ZMask reads layer outputs without copying them, unless the forward pass modifies one in
    place afterwards: then that pass is redone with copies, and copies are kept from then on."""
    from torch import nn

    from zmask import ZMask

    from ..toy import TOY_CONFIG, clean_batches, seeded_toy

    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 16, 3, 2, 1), nn.Conv2d(16, 32, 3, 2, 1)

        def forward(self, x):
            a = self.c1(x)
            a.relu_()
            return torch.relu(self.c3(torch.relu(self.c2(a))))

    images = clean_batches(1)[0]
    model = InPlace().eval()
    defense = ZMask(model, TOY_CONFIG)
    with torch.no_grad():
        _, activations = defense.capture(images)
        assert defense._clone_activations
        assert torch.equal(activations["c1"], model.c1(images))
        plain = ZMask(seeded_toy(), TOY_CONFIG)
        _, activations = plain.capture(images)
        assert not plain._clone_activations and torch.equal(activations["c1"], plain.model.c1(images))


def test_flush_subnormals_zeroes_only_subnormals_and_keeps_gradients():
    from zmask.core.statistics import flush_subnormals

    tiny = torch.finfo(torch.float32).tiny
    values = torch.tensor([tiny / 4, -tiny / 8, tiny, -2 * tiny, 0.0, 1.5, -3.0])
    flushed = flush_subnormals(values)
    assert flushed.tolist() == [0.0, 0.0, tiny, -2 * tiny, 0.0, 1.5, -3.0]
    assert values[0] != 0  # not in place unless asked
    tracked = values.clone().requires_grad_()
    flush_subnormals(tracked, inplace=True).sum().backward()
    assert tracked.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
