"""The ``zmask`` argument parser and ``--config`` files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .._version import __version__
from ..attacks import ADAPTIVE_OBJECTIVES
from ..errors import UsageError
from ..evaluation import DEFENSES
from ..tasks import TASKS

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


def _load_config_file(path: str) -> dict[str, Any]:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"configuration file {file} does not exist")
    text = file.read_text()
    try:
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise UsageError(f"configuration file {file} is not valid {'JSON' if file.suffix == '.json' else 'YAML'}: {error}") from None
    if not isinstance(data, dict):
        raise UsageError(f"configuration file {file} must hold a mapping of option names to values")
    return {key.replace("-", "_"): value for key, value in data.items()}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML or JSON file with option values (flags given on the command line win)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zmask", description="Z-Mask: detect and mask adversarial patches (AAAI 2023).")
    parser.add_argument("--version", action="version", version=f"zmask {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _add_common(sub)
        sub.set_defaults(required_options=[])
        return sub

    def required(sub: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
        """An option that must be given on the command line or in the --config file."""
        action = sub.add_argument(flag, **kwargs)
        action.help = f"{action.help} (required)" if action.help else "(required)"
        sub.get_default("required_options").append(action.dest)

    demo = command("demo", "the whole pipeline on the real assets (ESPNet-CamVid): fit, attack, detect, mask, figure and summary")
    demo.add_argument("--out", default="zmask-demo", help="output folder (default ./zmask-demo)")
    demo.add_argument("--images", type=int, default=40, help="CamVid val images to evaluate (default 40)")
    demo.add_argument("--quick", action="store_true", help="tiny sizes (for tests)")

    fit = command("fit", "fit Z-Mask (statistics, fusion block, threshold) on a model preset and training data -> profile")
    required(fit, "--model", help="model preset (see `zmask models`)")
    required(fit, "--patches", nargs="+", help="patch PNGs used to train the fusion block")
    required(fit, "--out", help="profile file to write (.safetensors)")
    fit.add_argument("--data", help="dataset folder (default: the preset's dataset from the assets)")
    fit.add_argument("--split", default="train")
    fit.add_argument("--shallow", nargs="+", help="shallow layers S (default: the preset's)")
    fit.add_argument("--deep", nargs="+", help="deep layers D (default: the preset's)")
    fit.add_argument("--statistics-images", type=int, default=120)
    fit.add_argument("--fusion-images", type=int, default=120)
    fit.add_argument("--calibration-images", type=int, default=80)
    fit.add_argument("--placements", type=int, default=1,
                     help="draws per fusion / calibration image (clean or patched at a fresh place); > 1 stretches a small split")
    fit.add_argument("--epochs", type=int, default=40)

    defend = command("defend", "run a fitted defense on images or videos: masked images, masks, heatmaps, one JSON line per image "
                               "or frame; a defended video per video input")
    defend.add_argument("inputs", nargs="+", help=f"image files, folders of images, or videos ({', '.join(VIDEO_SUFFIXES)})")
    required(defend, "--model", help="model preset the profile was fitted for")
    required(defend, "--profile", help="profile file from `zmask fit`")
    required(defend, "--out", help="output folder")
    defend.add_argument("--frames", action="store_true", help="treat each input folder as the frames of one video, in name order")
    defend.add_argument("--temporal-on", type=int, default=1, metavar="K",
                        help="videos: raise the flag after K consecutive flagged frames (default 1: each frame on its own, Eq. 4)")
    defend.add_argument("--temporal-off", type=int, default=0, metavar="K",
                        help="videos: keep masking K frames after the last flagged one (default 0)")
    defend.add_argument("--batch-size", type=int, default=1, help="videos: frames per forward pass (default 1)")

    attack = command("attack", "craft an adversarial patch (plain, activation-aware beta, or defense-aware alpha) -> PNG + JSON")
    required(attack, "--model", help="model preset")
    attack.add_argument("--size", default="L", choices=["S", "M", "L"], help="the paper's patch size, scaled to the input")
    attack.add_argument("--beta", type=float, default=1.0, help="Eq. 5 weight of the adversarial loss (1 = plain attack)")
    attack.add_argument("--alpha", type=float, default=1.0, help="Eq. 6 weight of the adversarial loss")
    attack.add_argument("--defense-attack", metavar="NAME",
                        help=f"defense-aware attack objective (needs --profile): {', '.join(ADAPTIVE_OBJECTIVES.names())}")
    attack.add_argument("--profile", help="fitted Z-Mask profile (for beta < 1 or defense-aware attacks)")
    attack.add_argument("--objective", default="untargeted",
                        help="the task's attack objective (" + "; ".join(f"{n}: {', '.join(TASKS.get(n).objectives)}" for n in TASKS.names()) + ")")
    attack.add_argument("--steps", type=int, default=150)
    attack.add_argument("--batch-size", type=int, default=8)
    attack.add_argument("--lr", type=float, default=0.03, help="Adam learning rate in [0, 1] pixel units")
    attack.add_argument("--smoothness", type=float, default=0.0, help="weight of the smoothness term")
    attack.add_argument("--split", default="train")
    attack.add_argument("--limit", type=int, help="use only the first N images")
    attack.add_argument("--data", help="dataset folder (default: the preset's dataset from the assets)")
    attack.add_argument("--resume", help="start from this patch PNG")
    required(attack, "--out", help="patch PNG to write (a JSON sidecar is written beside it)")
    attack.add_argument("--noise", action="store_true", help="write a random-noise patch of the same size instead (the control)")

    evaluate = command("evaluate", "the paper's experiments on a fitted model -> report folder (JSON, Markdown, figures)")
    required(evaluate, "--model")
    required(evaluate, "--profile")
    required(evaluate, "--out")
    evaluate.add_argument("--patch", action="append", default=[], metavar="NAME=PNG", help="a patch setting of the masking table (repeatable)")
    evaluate.add_argument("--beta-patch", action="append", default=[], metavar="BETA=PNG", help="a patch of the beta sweep (repeatable)")
    evaluate.add_argument("--alpha-patch", action="append", default=[], metavar="ATTACK:ALPHA=PNG", help="a defense-aware patch (repeatable)")
    evaluate.add_argument("--random-noise", action="store_true", help="add a random-noise patch of the L size")
    evaluate.add_argument("--defenses", nargs="+", default=DEFENSES.names(),
                          help=f"registered defenses to compare (default: all of {', '.join(DEFENSES.names())})")
    evaluate.add_argument("--split", default="val")
    evaluate.add_argument("--limit", type=int)
    evaluate.add_argument("--data")
    evaluate.add_argument("--batch-size", type=int, default=4)
    evaluate.add_argument("--train-images", type=int, default=80, help="training images for MaskNet and HN/FPDA")

    bench = command("bench", "performance figures: SPR speed-up, defense overhead, images per second")
    bench.add_argument("--model", default="espnet_camvid", help="model preset (default espnet_camvid)")
    bench.add_argument("--repeats", type=int, default=9, help="interleaved timed runs per figure (median; default 9)")
    bench.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes for images/s (default 1 8)")
    bench.add_argument("--no-literal", action="store_true", help="skip the (slow) literal reference implementation")
    bench.add_argument("--quick", action="store_true", help="small sizes (for tests)")

    models = command("models", "list model presets and their layers")
    models.add_argument("--layers", metavar="PRESET", help="list every layer name of a preset")

    assets = command("assets", "which assets are present, which are missing, where each comes from")
    assets.add_argument("--download", metavar="NAME", help="download an asset that has a public URL into the cache")
    return parser


def _apply_config_file(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    if not getattr(args, "config", None):
        return args
    values = _load_config_file(args.config)
    known = vars(args)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UsageError(f"unknown options in {args.config}: {', '.join(unknown)}")
    given = {token.split("=")[0].lstrip("-").replace("-", "_") for token in argv if token.startswith("--")}
    for key, value in values.items():
        if key not in given:
            setattr(args, key, value)
    return args
