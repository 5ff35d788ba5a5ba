"""The ``zmask`` argument parser and ``--config`` files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import UsageError
from .checks import (MAX_BATCH, MAX_EPOCHS, MAX_FRAMES, MAX_IMAGES, MAX_PLACEMENTS, MAX_REPEATS, MAX_RESAMPLES, MAX_SEED, MAX_SIDE,
                     MAX_STEPS, MAX_THREADS, bounded_int, finite_float, positive_int, probability)

# The parser is built without importing torch or the library (``zmask --version`` and usage errors
# answer at once), so the help names the built-in registry entries from these lists (a test keeps
# them equal to the registries); entries registered by extensions are accepted all the same, and
# checked when the command runs.
BUILTIN_TASK_OBJECTIVES = {"segmentation": ("untargeted",), "detection": ("untargeted", "vanishing")}
BUILTIN_DEFENSES = ("zmask", "lgs", "masknet", "hn", "fpda", "none")
BUILTIN_ADAPTIVE_OBJECTIVES = ("mask", "flag", "end_to_end", "suppress", "suppress_all", "flag_evasion", "decoy")
OVERWRITE_HELP = "replace the outputs of an earlier zmask run at --out (files zmask did not write are never replaced)"

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
DATA_HELP = ("dataset folder (default: the preset's dataset from the assets); for a module:factory model, segmentation: "
             "{split}.txt listing 'image label' pairs relative to the folder (SegNet/CamVid layout), detection: the COCO layout")
PROFILE_HELP = "profile file from `zmask fit` (default: the profile shipped with the preset, if it has one)"
MAX_CONFIG_BYTES = 1024 * 1024
ALLOW_OTHER_WEIGHTS_HELP = ("use the profile even though the model's weights differ from those it was fitted on "
                            "(its recorded weights fingerprint); the statistics are then those of other weights")
# Namespace entries a --config file may not set: the subcommand, internal fields, --debug, --config,
# and the permission to name code, which only the command line gives.
CONFIG_FORBIDDEN = frozenset({"command", "required_options", "debug", "config", "allow_config_code"})
# Options whose value may name Python code to import and run (``module:factory``, ``path.py:factory``).
CODE_OPTIONS = ("model", "layers")
ALLOW_CONFIG_CODE_HELP = ("let the --config file name Python code to import and run (a --model module:factory or "
                          "path.py:factory); without it a configuration file may name presets, paths and numbers only, "
                          "and your own model is given with --model on the command line")
class _DuplicateKey(Exception):
    """A key given twice in one mapping of a configuration file (``where``: its line, if known)."""

    def __init__(self, key: Any, where: str = "") -> None:
        super().__init__(key, where)
        self.key, self.where = key, where


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' ``object_pairs_hook``: a dict, or :class:`_DuplicateKey` for a key given twice."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _yaml_loader() -> type:
    """``yaml.SafeLoader`` that raises :class:`_DuplicateKey` for a key given twice in one mapping
    (PyYAML keeps the last value without a word); merge keys (``<<: *base``) may still be overridden."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            if isinstance(node, yaml.MappingNode):
                seen: set[Any] = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        duplicate = key in seen
                        seen.add(key)
                    except TypeError:  # an unhashable key: the base class reports it
                        continue
                    if duplicate:
                        raise _DuplicateKey(key, f" (line {key_node.start_mark.line + 1})")
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def _load_config_file(path: str) -> dict[str, Any]:
    """The option values of a YAML or JSON ``--config`` file (a mapping; no key twice, no tags that
    build Python objects: ``yaml.SafeLoader``)."""
    import yaml

    file = Path(path)
    if not file.exists():
        raise UsageError(f"configuration file {file} does not exist")
    if not file.is_file():
        raise UsageError(f"configuration file {file} is not a file")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise UsageError(f"configuration file {file} is larger than {MAX_CONFIG_BYTES} bytes")
    kind = "JSON" if file.suffix.lower() == ".json" else "YAML"
    try:
        text = file.read_bytes().decode("utf-8")
        data = json.loads(text, object_pairs_hook=_unique_pairs) if kind == "JSON" else yaml.load(text, Loader=_yaml_loader())
    except _DuplicateKey as duplicate:
        raise UsageError(f"configuration file {file} sets {_describe(duplicate.key)} twice{duplicate.where}: "
                         "keep one (a repeated key would silently take the last value)") from None
    except UnicodeDecodeError:
        raise UsageError(f"configuration file {file} is not UTF-8 text") from None
    except (ValueError, RecursionError, yaml.YAMLError) as error:  # JSONDecodeError is a ValueError
        reason = "nested too deeply" if isinstance(error, RecursionError) else " ".join(str(error).split())
        raise UsageError(f"configuration file {file} is not valid {kind}: {reason}") from None
    if not isinstance(data, dict):
        raise UsageError(f"configuration file {file} must hold a mapping of option names to values")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise UsageError(f"configuration file {file}: option names must be strings, got {_describe(key)} ({type(key).__name__})")
        name = key.replace("-", "_")
        if name in values:
            raise UsageError(f"configuration file {file} sets option {key!r} twice")
        values[name] = value
    return values


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML or JSON file with option values (flags given on the command line win)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors, and debug log messages")
    parser.add_argument("--verbose", action="store_true", help="log what the library does (fitting, calibration, profiles, downloads)")
    parser.add_argument("--seed", type=bounded_int(0, MAX_SEED), default=0, help="seed of every random choice (default 0)")
    parser.add_argument("--threads", type=positive_int(MAX_THREADS), default=None,
                        help="CPU threads for torch (default: half the CPU cores this process may use, 1 on a machine of up to 2 cores)")


MODEL_HELP = ("a model preset (see `zmask models`), or your own model as my_pkg.my_module:factory or path/to/file.py:factory "
              "(a callable returning a wrapped nn.Module; then give --task, --input-size and, to fit, --shallow/--deep)")


def _add_user_model(parser: argparse.ArgumentParser, layers: bool = True) -> None:
    """The options that describe a model given as ``module:factory`` instead of a preset name."""
    group = parser.add_argument_group("your own model (--model module:factory)")
    if layers:
        group.add_argument("--shallow", nargs="+", metavar="LAYER",
                           help="shallow layers S (default: the preset's; a module:factory model needs them to fit, and otherwise reads them from --profile)")
        group.add_argument("--deep", nargs="+", metavar="LAYER",
                           help="deep layers D (default: the preset's; a module:factory model needs them to fit, and otherwise reads them from --profile)")
    group.add_argument("--task", metavar="TASK",
                       help=f"the model's task, {' or '.join(BUILTIN_TASK_OBJECTIVES)} or a registered one (required for a module:factory model)")
    group.add_argument("--input-size", type=positive_int(MAX_SIDE), nargs=2, metavar=("H", "W"),
                       help="the model's input height and width; images are resized or letterboxed to it "
                            "(required for a module:factory model, unless its --profile records it)")
    group.add_argument("--num-classes", type=positive_int(65536), help="classes the model predicts (segmentation: required for a module:factory model)")
    group.add_argument("--ignore-index", type=int, help="label value of unlabelled pixels in a segmentation --data folder (default 255)")
    group.add_argument("--allow-config-code", action="store_true", help=ALLOW_CONFIG_CODE_HELP)


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
    demo.add_argument("--out", help="output folder (default: a new folder demo/<date-time> in the user cache, $ZMASK_CACHE or ~/.cache/zmask)")
    demo.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    demo.add_argument("--images", type=positive_int(MAX_IMAGES), default=40, help="CamVid val images to evaluate (default 40)")
    demo.add_argument("--quick", action="store_true", help="tiny sizes (for tests)")

    fit = command("fit", "fit Z-Mask (statistics, fusion block, threshold) on a model preset and training data -> profile")
    required(fit, "--model", help=MODEL_HELP)
    required(fit, "--patches", nargs="+", help="patch PNGs used to train the fusion block")
    required(fit, "--out", help="profile file to write (.safetensors)")
    fit.add_argument("--overwrite", action="store_true", help="replace an existing profile at --out (a file that is not a zmask profile is never replaced)")
    fit.add_argument("--data", help=DATA_HELP)
    fit.add_argument("--split", default="train", help="split of the data to fit on (default train)")
    _add_user_model(fit)
    fit.add_argument("--statistics-images", type=positive_int(MAX_IMAGES), default=120, help="clean images for the statistics mu, sigma (default 120)")
    fit.add_argument("--fusion-images", type=positive_int(MAX_IMAGES), default=120, help="images (clean or patched) that train the fusion block (default 120)")
    fit.add_argument("--calibration-images", type=positive_int(MAX_IMAGES), default=80, help="images (clean or patched) that choose lambda0 by ROC (default 80)")
    fit.add_argument("--placements", type=positive_int(MAX_PLACEMENTS), default=1,
                     help="draws per fusion / calibration image (clean or patched at a fresh place); > 1 stretches a small split")
    fit.add_argument("--target-fpr", type=probability, metavar="FPR",
                     help="choose lambda0 as the threshold with the highest TPR whose false-positive rate on the clean "
                          "calibration images is at most FPR (default: Youden's J, the paper's max TPR - FPR)")
    fit.add_argument("--hard-negatives", type=probability, default=0.0, metavar="SHARE",
                     help="share of the clean fusion and calibration samples that carry a harmless occluder (random noise or a crop "
                          "of another image) labelled 'no patch', so the flag means adversarial rather than unusual; --target-fpr then "
                          "bounds the false alarms on plain and on occluded clean images each (default 0: the paper)")
    fit.add_argument("--calibrate-mask", action="store_true",
                     help="choose the soft-mask threshold of Eq. 4 (default 0.5, the paper's) for the best patch-mask IoU on the "
                          "patched calibration samples; without it the fit still reports that IoU and warns if the masks are empty")
    fit.add_argument("--layered", action="store_true",
                     help="beyond the paper: the channel-extreme score of the analysed layers joins the Z-Mask score in one flag "
                          "whose thresholds are calibrated together (--target-fpr bounds the combination), and a flagged frame's "
                          "keep-mask is chosen among candidates by re-running each (docs/method.md, 'Layered evidence')")
    fit.add_argument("--headroom", type=float, metavar="H",
                     help="instead of ROC (--target-fpr, Youden's J): each threshold is the highest clean calibration score plus H "
                          "times its distance to the clean median, just above the clean range whatever the fitting patches score, "
                          "so that an adaptive attack has to look clean, not merely less than the patches (docs/method.md)")
    fit.add_argument("--candidate-choice", choices=["clearance", "effect"], default="clearance",
                     help="with --layered: how a flagged frame's keep-mask is chosen. clearance (default): the smallest mask whose "
                          "re-pass is no longer flagged; effect: windows tiling the image (placed without reading the evidence) join "
                          "the candidates, and among masks that remove some evidence and hide at most twice the largest patch the "
                          "one whose re-pass changes the output most wins (a decoy region the attacker makes look suspicious then "
                          "loses to the patch); more re-passes per flagged frame")
    fit.add_argument("--layers", choices=["auto"],
                     help="auto: choose S and D on the training images (separability, localisation, cost of every candidate "
                          "layer down to 1/8 resolution); the evidence goes into the profile")
    fit.add_argument("--layer-candidates", nargs="+", metavar="LAYER", help="with --layers auto: the layers to choose among")
    fit.add_argument("--max-overhead", type=probability, metavar="R",
                     help="choose the heatmap grid (the preset's, then halved) whose defended clean frame costs at most 1 + R forward "
                          "passes on this machine at --threads (0.25: within 1.25x); the profile records the measured grids and the "
                          "layers' evidence at the preset's and the chosen grid (default: the preset's grid)")
    fit.add_argument("--heatmap-size", type=positive_int(4096), nargs=2, metavar=("H", "W"),
                     help="the heatmap grid (SPR kernels scaled with it); with --max-overhead, the finest grid to try")
    fit.add_argument("--epochs", type=positive_int(MAX_EPOCHS), default=40, help="fusion block training epochs (default 40; at least 300 optimiser steps are taken)")

    defend = command("defend", "run a fitted defense on images or videos: masked images, masks, heatmaps, one JSON line per image "
                               "or frame; a defended video per video input")
    defend.add_argument("inputs", nargs="+", help=f"image files, folders of images, or videos ({', '.join(VIDEO_SUFFIXES)})")
    required(defend, "--model", help="the model the profile was fitted for: " + MODEL_HELP)
    defend.add_argument("--profile", help=PROFILE_HELP)
    required(defend, "--out", help="output folder (new or empty, or an earlier defend run's with --overwrite)")
    defend.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    _add_user_model(defend, layers=False)
    defend.add_argument("--frames", action="store_true", help="treat each input folder as the frames of one video, in name order")
    defend.add_argument("--allow-other-weights", action="store_true", help=ALLOW_OTHER_WEIGHTS_HELP)
    defend.add_argument("--temporal-on", type=positive_int(MAX_FRAMES), default=1, metavar="K",
                        help="videos: raise the flag after K consecutive flagged frames (default 1: each frame on its own, Eq. 4)")
    defend.add_argument("--temporal-off", type=bounded_int(0, MAX_FRAMES), default=0, metavar="K",
                        help="videos: keep masking K frames after the last flagged one (default 0)")
    defend.add_argument("--batch-size", type=positive_int(MAX_BATCH), default=1, help="videos: frames per forward pass (default 1)")

    attack = command("attack", "craft an adversarial patch (plain, activation-aware beta, or defense-aware alpha) -> PNG + JSON")
    required(attack, "--model", help=MODEL_HELP)
    attack.add_argument("--size", default="L", choices=["S", "M", "L"], help="the paper's patch size, scaled to the input")
    attack.add_argument("--beta", type=finite_float, default=1.0, help="Eq. 5 weight of the adversarial loss (1 = plain attack)")
    attack.add_argument("--alpha", type=finite_float, default=1.0, help="Eq. 6 weight of the adversarial loss")
    attack.add_argument("--defense-attack", metavar="NAME",
                        help=f"defense-aware attack objective (needs --profile): {', '.join(BUILTIN_ADAPTIVE_OBJECTIVES)}")
    attack.add_argument("--profile", help="fitted Z-Mask profile for beta < 1 or defense-aware attacks (default: the preset's shipped profile)")
    attack.add_argument("--objective", default="untargeted",
                        help="the task's attack objective (" + "; ".join(f"{n}: {', '.join(o)}" for n, o in BUILTIN_TASK_OBJECTIVES.items()) + ")")
    attack.add_argument("--steps", type=positive_int(MAX_STEPS), default=150, help="optimisation steps (default 150)")
    attack.add_argument("--batch-size", type=positive_int(MAX_BATCH), default=8, help="images per optimisation step (default 8)")
    attack.add_argument("--lr", type=finite_float, default=0.03, help="Adam learning rate in [0, 1] pixel units")
    attack.add_argument("--smoothness", type=finite_float, default=0.0, help="weight of the smoothness term")
    attack.add_argument("--split", default="train", help="split of the data the patch is optimised on (default train)")
    attack.add_argument("--limit", type=positive_int(MAX_IMAGES), help="use only the first N images")
    attack.add_argument("--data", help=DATA_HELP)
    attack.add_argument("--resume", help="start from this patch PNG")
    required(attack, "--out", help="patch PNG to write (a JSON sidecar <name>.json is written beside it)")
    attack.add_argument("--overwrite", action="store_true", help="replace an existing zmask patch at --out and its sidecar (other files are never replaced)")
    attack.add_argument("--noise", action="store_true", help="write a random-noise patch of the same size instead (the control)")
    _add_user_model(attack, layers=False)

    evaluate = command("evaluate", "the paper's experiments on a fitted model -> report folder (JSON, Markdown, figures)")
    required(evaluate, "--model", help=MODEL_HELP)
    evaluate.add_argument("--profile", help=PROFILE_HELP)
    required(evaluate, "--out", help="report folder to write (results.json, summary.md, figures): new or empty, or an earlier report with --overwrite")
    evaluate.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    evaluate.add_argument("--patch", action="append", default=[], metavar="NAME=PNG", help="a patch setting of the masking table (repeatable)")
    evaluate.add_argument("--beta-patch", action="append", default=[], metavar="BETA=PNG", help="a patch of the beta sweep (repeatable)")
    evaluate.add_argument("--alpha-patch", action="append", default=[], metavar="ATTACK:ALPHA=PNG", help="a defense-aware patch (repeatable)")
    evaluate.add_argument("--random-noise", action="store_true", help="add a random-noise patch of the L size")
    evaluate.add_argument("--physical", action="store_true",
                          help="also evaluate every --patch seen through physical conditions (print gamut and tone curve, light, "
                               "perspective, blur, JPEG): rows 'NAME physical'")
    evaluate.add_argument("--allow-other-weights", action="store_true", help=ALLOW_OTHER_WEIGHTS_HELP)
    evaluate.add_argument("--defenses", nargs="+", metavar="DEFENSE",
                          help=f"registered defenses to compare (default: all registered: {', '.join(BUILTIN_DEFENSES)} and any an extension adds)")
    evaluate.add_argument("--split", default="val", help="split of the data to evaluate on (default val)")
    evaluate.add_argument("--limit", type=positive_int(MAX_IMAGES), help="evaluate only the first N images")
    evaluate.add_argument("--data", help=DATA_HELP)
    evaluate.add_argument("--batch-size", type=positive_int(MAX_BATCH), default=4, help="images per forward pass (default 4)")
    evaluate.add_argument("--train-images", type=positive_int(MAX_IMAGES), default=80, help="training images for MaskNet and HN/FPDA")
    evaluate.add_argument("--bootstrap", type=bounded_int(0, MAX_RESAMPLES), default=500,
                          help="bootstrap resamples of the images for the confidence intervals (default 500; 0: none)")
    _add_user_model(evaluate, layers=False)

    bench = command("bench", "performance figures: SPR speed-up, defense overhead, images per second")
    bench.add_argument("--model", default="espnet_camvid", help="model preset (default espnet_camvid)")
    bench.add_argument("--repeats", type=positive_int(MAX_REPEATS), default=9, help="interleaved timed runs per figure (median; default 9)")
    bench.add_argument("--batch-sizes", type=positive_int(MAX_BATCH), nargs="+", default=[1, 8], help="batch sizes for images/s (default 1 8)")
    bench.add_argument("--no-literal", action="store_true", help="skip the (slow) literal reference implementation")
    bench.add_argument("--profile", help="a fitted profile of the model to time, loaded whole (default: the preset's shipped "
                       "profile's layers and grid with statistics of the timed frame)")
    bench.add_argument("--quick", action="store_true", help="small sizes (for tests)")

    table = command("table", "the paper's Table 1 across models: one row per preset from its evaluation report, with the "
                             "defense's cost measured now (zmask bench) -> a Markdown file")
    required(table, "--report", nargs="+", metavar="PRESET=FOLDER",
             help="a preset and the folder of its `zmask evaluate` report (results.json; evaluated with the zmask and none "
                  "defenses, an L patch and --random-noise), one per row in this order")
    required(table, "--out", help="the Markdown file to write (.md; an earlier table of zmask's is replaced with --overwrite)")
    table.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    table.add_argument("--bench-threads", type=positive_int(MAX_THREADS), nargs="+", default=[1, 2], metavar="N",
                       help="thread counts of the cost columns (default 1 2)")
    table.add_argument("--repeats", type=positive_int(MAX_REPEATS), default=9, help="interleaved timed runs per cost figure (median; default 9)")
    table.add_argument("--no-bench", action="store_true", help="leave the cost columns out (no timing)")

    models = command("models", "list model presets and their layers")
    models.add_argument("--layers", metavar="MODEL", help="list every layer name of a preset or of a module:factory model")
    models.add_argument("--allow-config-code", action="store_true", help=ALLOW_CONFIG_CODE_HELP)

    assets = command("assets", "which assets are present, which are missing, where each comes from")
    assets.add_argument("--download", metavar="NAME", help="download an asset that has a public URL into the cache")
    return parser


def _subcommand_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand of :func:`build_parser`'s parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise UsageError(f"no subcommand {command!r}")


def _explicit_options(command: str, argv: list[str]) -> set[str]:
    """Destinations of the options given on the command line (abbreviations and ``--opt=value``
    included): ``argv`` parsed again with every default suppressed."""
    parser = build_parser()
    for action in _subcommand_parser(parser, command)._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _describe(value: Any) -> str:
    """A config value for an error message: containers by size only (a YAML alias bomb has an
    exponentially long repr), scalars cut to a readable length."""
    if isinstance(value, (dict, list, tuple, set)):
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _config_value(action: argparse.Action, key: str, value: Any, file: str) -> Any:
    """A ``--config`` file's value for ``action``, parsed and checked as the command line would be."""
    where = f"configuration file {file}: option {key!r}"

    def one(item: Any) -> Any:
        convert = action.type
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            expected = getattr(convert, "__name__", "a string") if convert is not None else "a string"
            raise UsageError(f"{where} expects {expected}, got {_describe(item)}")
        if convert is None:
            converted: Any = str(item)
        else:
            if not callable(convert):
                raise UsageError(f"{where}: the option takes no value from a file")
            try:
                converted = convert(str(item))
            except (argparse.ArgumentTypeError, ValueError, TypeError) as error:
                raise UsageError(f"{where}: {error}") from None
        if action.choices is not None and converted not in action.choices:
            raise UsageError(f"{where}: {converted!r} is not one of {', '.join(map(str, action.choices))}")
        return converted

    if action.nargs == 0:  # a flag (store_true / store_false)
        if not isinstance(value, bool):
            raise UsageError(f"{where} is a flag: give true or false, got {_describe(value)}")
        return value
    if value is None:
        if action.default is not None:
            raise UsageError(f"{where} cannot be null")
        return None
    several = isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if not several:
        return one(value)
    items = value if isinstance(value, list) else [value]
    if isinstance(action.nargs, int) and not isinstance(action, argparse._AppendAction) and len(items) != action.nargs:
        raise UsageError(f"{where} expects {action.nargs} values, got {len(items)}")
    if action.nargs == "+" and not items:
        raise UsageError(f"{where} expects at least one value")
    return [one(item) for item in items]


def _apply_config_file(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """Fill ``args`` from its ``--config`` file: options only (not the subcommand, positional
    inputs, ``--debug``, ``--config`` or internal fields), each value parsed with the option's own
    type; options given on the command line always win."""
    if not getattr(args, "config", None):
        return args
    values = _load_config_file(args.config)
    actions = {action.dest: action for action in _subcommand_parser(parser, args.command)._actions}
    for key in values:
        action = actions.get(key)
        if key in CONFIG_FORBIDDEN or (action is not None and not action.option_strings):
            raise UsageError(f"configuration file {args.config}: {key!r} cannot be set in a configuration file "
                             f"({'give it on the command line' if key != 'required_options' else 'an internal field'})")
        if action is None or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            known = sorted(dest for dest, a in actions.items() if a.option_strings and dest not in CONFIG_FORBIDDEN | {"help"})
            raise UsageError(f"unknown options in {args.config}: {key} (options of zmask {args.command}: {', '.join(known)})")
    parsed = {key: _config_value(actions[key], key, value, args.config) for key, value in values.items()}
    given = _explicit_options(args.command, argv)
    _refuse_config_code(args, parsed, given)
    for key, value in parsed.items():
        if key not in given:
            setattr(args, key, value)
    return args


def _refuse_config_code(args: argparse.Namespace, parsed: dict[str, Any], given: set[str]) -> None:
    """A configuration file is data: a ``module:factory`` it names (code that zmask would import and
    run) is refused unless the command line names the model itself (then the file's value is not
    used) or gives ``--allow-config-code``."""
    if getattr(args, "allow_config_code", False):
        return
    for key in CODE_OPTIONS:
        value = parsed.get(key)
        if key in given or not isinstance(value, str) or ":" not in value:
            continue
        flag = "--" + key.replace("_", "-")
        raise UsageError(f"configuration file {args.config}: {key} {_describe(value)} names Python code to import and run, which a "
                         f"configuration file may not do: give {flag} {value} on the command line, or add --allow-config-code "
                         f"if you trust {args.config}")
