"""Your own model by reference: ``"my_pkg.my_module:factory"`` (or ``"path/to/file.py:factory"``)
becomes a :class:`~zmask.models.ModelPreset` built on the fly, so that fitting, defending,
attacking and evaluating it go through exactly the code the shipped presets use.

The factory is a callable returning a wrapped ``nn.Module`` (:class:`zmask.contracts.ModelWrapper`:
RGB in [0, 1] in, the task's output format out). It is called with the keywords it declares among
``pretrained`` and ``num_classes``, and with none otherwise.

Data folders, by task (``FOLDER_LAYOUTS``, keyed by the names of ``zmask.tasks.TASKS``):

- segmentation: the SegNet/CamVid list layout: ``{split}.txt`` (``train.txt``, ``val.txt``) with
  one "image label" pair of paths per line, relative to the folder; labels are single-channel
  images of class indices (``ignore_index`` for unlabelled pixels). Images and labels are resized
  to the input size (bilinear / nearest).
- detection: the COCO layout: ``train2017/`` and ``val2017/`` (or ``{split}/``) image folders and
  ``annotations/instances_{split}.json``; images are letterboxed to the input size.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from ..contracts import Task
from ..errors import ConfigError, ZMaskError, ZMaskTypeError
from ..registry import Registry
from ..tasks import TASKS, DetectionTask, SegmentationTask
from ..tasks.registry import is_preset_task
from .presets import ModelPreset, _coco_letterboxed, _coco_task, _letterbox_to_input, _resize_to_input, _segmentation_task

logger = logging.getLogger(__name__)


def is_factory_spec(name: str) -> bool:
    """Whether ``name`` reads as ``module:callable`` rather than a preset name."""
    return ":" in name


@dataclass(frozen=True)
class FolderLayout:
    """How a model from a factory gets its data and task object for one task.

    ``dataset(root, split, limit, input_size)``: the items of ``split`` in the folder ``root``;
    ``make_task``: as :attr:`ModelPreset.make_task`; ``prepare``: as :attr:`ModelPreset.prepare`;
    ``description``: the layout in one line, for error messages; ``needs_num_classes``: the task
    object needs the number of classes (segmentation metrics and attacks).
    """

    dataset: Callable[[Path, str, "int | None", tuple[int, int]], Dataset]
    make_task: Callable[[ModelPreset, nn.Module, str, "str | Path | None"], Task]
    prepare: Callable[[ModelPreset, Any], Any]
    description: str
    needs_num_classes: bool = False


FOLDER_LAYOUTS: Registry[FolderLayout] = Registry("data folder layout")


def _segnet_folder(root: Path, split: str, limit: int | None, size: tuple[int, int]) -> Dataset:
    from ..data import CamVid, ResizedSegmentation

    return ResizedSegmentation(CamVid(root, split, limit=limit), size)


def _coco_folder(root: Path, split: str, limit: int | None, size: tuple[int, int]) -> Dataset:
    return _coco_letterboxed(size)(split, limit, root)


def _user_detection_task(preset: ModelPreset, model: nn.Module, split: str, root: str | Path | None) -> Task:
    """The COCO task on the folder's annotations; without a folder, one that can draw but not score."""
    return _coco_task(preset, model, split, root) if root is not None else DetectionTask(model)


FOLDER_LAYOUTS.add(FolderLayout(_segnet_folder, _segmentation_task, _resize_to_input,
                                "{split}.txt listing 'image label' path pairs relative to the folder (the SegNet/CamVid layout)",
                                needs_num_classes=True),
                   SegmentationTask.name)
FOLDER_LAYOUTS.add(FolderLayout(_coco_folder, _user_detection_task, _letterbox_to_input,
                                "train2017/, val2017/ image folders and annotations/instances_{train,val}2017.json (the COCO layout)"),
                   DetectionTask.name)


def _import_module(module: str, spec: str) -> Any:
    """The module named in ``spec``: a dotted name on the Python path, or a ``.py`` file."""
    if module.endswith(".py") or "/" in module or "\\" in module:
        path = Path(module)
        if not path.is_file():
            raise ConfigError(f"model factory {spec!r}: file {path} does not exist")
        name = "zmask_user_factory_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        if name in sys.modules:
            return sys.modules[name]
        file_spec = importlib.util.spec_from_file_location(name, path)
        if file_spec is None or file_spec.loader is None:
            raise ConfigError(f"model factory {spec!r}: {path} cannot be imported as a Python module")
        loaded = importlib.util.module_from_spec(file_spec)
        sys.modules[name] = loaded
        try:
            with _user_code(spec, f"importing {path}"):
                file_spec.loader.exec_module(loaded)
        except BaseException:
            del sys.modules[name]
            raise
        return loaded
    try:
        with _user_code(spec, f"importing {module!r}"):
            return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name and (module == error.name or module.startswith(error.name + ".")):
            raise ConfigError(f"model factory {spec!r}: no module named {error.name!r} on the Python path "
                              "(run from the folder that holds it, install it, or give a file: path/to/file.py:factory)") from None
        raise ConfigError(f"model factory {spec!r}: importing {module!r} failed: {error}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"


@contextlib.contextmanager
def _user_code(spec: str, doing: str) -> Iterator[None]:
    """Run the user's code (importing the factory's module, calling the factory): a ``SyntaxError``,
    an exception or a ``sys.exit()`` in it becomes one ``ConfigError`` naming the factory (the
    original is chained, for ``--debug``); zmask's own errors, a missing module (reported by
    :func:`_import_module`) and Ctrl-C pass through."""
    try:
        yield
    except (ZMaskError, ModuleNotFoundError):
        raise
    except SyntaxError as error:
        where = f" ({error.filename}, line {error.lineno})" if error.filename else ""
        raise ConfigError(f"model factory {spec!r}: {doing} failed: the code does not parse: {error.msg}{where}") from error
    except SystemExit as error:
        raise ConfigError(f"model factory {spec!r}: {doing} called sys.exit({error.code!r}); "
                          "a factory must return the model, not end the program") from error
    except Exception as error:
        raise ConfigError(f"model factory {spec!r}: {doing} raised {type(error).__name__}: {_first_line(error)}") from error


def load_factory(spec: str) -> Callable[..., nn.Module]:
    """The callable named by ``"module:attribute"`` (the attribute may be dotted: ``"mod:Class.build"``)."""
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"model factory {spec!r}: expected 'module:callable' (e.g. my_pkg.my_module:build_model)")
    target: Any = _import_module(module_name, spec)
    for part in attribute.split("."):
        if not hasattr(target, part):
            close = difflib.get_close_matches(part, [n for n in dir(target) if not n.startswith("_")], n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"model factory {spec!r}: {module_name} has no attribute {attribute!r}{hint}")
        target = getattr(target, part)
    if not callable(target):
        raise ZMaskTypeError(f"model factory {spec!r}: {attribute} is a {type(target).__name__}, not a callable returning an nn.Module")
    return target


def build_from_factory(spec: str, pretrained: bool = True, num_classes: int = 0) -> nn.Module:
    """Call the factory of ``spec`` (with ``pretrained`` / ``num_classes`` where it declares them) and
    check that it returned an ``nn.Module``; the model is put in eval mode."""
    factory = load_factory(spec)
    parameters: Mapping[str, inspect.Parameter]
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}
    keywords: dict[str, Any] = {}
    if "pretrained" in parameters:
        keywords["pretrained"] = pretrained
    if "num_classes" in parameters and num_classes:
        keywords["num_classes"] = num_classes
    required = [name for name, parameter in parameters.items() if parameter.default is inspect.Parameter.empty
                and parameter.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) and name not in keywords]
    if required:
        hint = " (give --num-classes)" if required == ["num_classes"] else ""
        raise ConfigError(f"model factory {spec!r} needs the argument(s) {', '.join(map(repr, required))}{hint}: a factory is "
                          "called with no arguments, or only pretrained= and num_classes=, and returns the model (an nn.Module)")
    with _user_code(spec, "calling the factory"):
        model = factory(**keywords)
    if not isinstance(model, nn.Module):
        raise ZMaskTypeError(f"model factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module "
                             "(return the model wrapped so that it takes RGB in [0, 1]; see zmask.contracts.ModelWrapper)")
    return model.eval()


def preset_from_factory(spec: str, task: str, input_size: tuple[int, int], shallow_layers: tuple[str, ...] | list[str] = (),
                        deep_layers: tuple[str, ...] | list[str] = (), num_classes: int = 0, ignore_index: int = 255,
                        class_names: tuple[str, ...] = ()) -> ModelPreset:
    """A :class:`ModelPreset` for the model made by the factory ``spec`` (``"module:callable"``).

    ``task`` names a registered task with a data folder layout (``FOLDER_LAYOUTS``); layers are
    ``named_modules()`` names of the returned module (list them with ``zmask models --layers SPEC``),
    needed to fit (``preset.config()``) but not to load a profile, which records its own; the
    heatmap size is the paper's, scaled to ``input_size``. The factory is imported here; the model
    is built, and the layer names checked against it, when it is used (``ZMask``, ``ZMask.load``).
    """
    task_type = TASKS.get(task)
    if not is_preset_task(task_type):
        raise ConfigError(f"task {task!r} gives no paper configuration (paper_config): a model of it cannot be fitted from the command line")
    layout = FOLDER_LAYOUTS.get(task)
    if bool(shallow_layers) != bool(deep_layers):
        raise ConfigError(f"model factory {spec!r}: give both its shallow and its deep layers (see `zmask models --layers {spec}`)")
    height, width = (int(v) for v in input_size)
    if height < 1 or width < 1:
        raise ConfigError(f"model factory {spec!r}: input size {input_size!r} must be two positive integers")
    if layout.needs_num_classes and num_classes < 1:
        raise ConfigError(f"model factory {spec!r}: the {task} task needs the number of classes the model predicts (num_classes, --num-classes)")
    load_factory(spec)  # fail now on a wrong module or attribute
    # The scaled heatmap depends only on the input size; a placeholder layer stands in when none are given.
    heatmap = task_type.paper_config(tuple(shallow_layers) or ("input",), tuple(deep_layers) or ("input",), (height, width)).heatmap_size

    def datasets(split: str, limit: int | None, root: str | Path | None) -> Dataset:
        if root is None:
            raise ConfigError(f"model {spec}: give a data folder (--data): {layout.description}")
        return layout.dataset(Path(root), split, limit, (height, width))

    logger.debug("preset for model factory %s: task %s, input %dx%d, heatmap %s", spec, task, height, width, heatmap)
    return ModelPreset(
        spec, task, f"user model from {spec}", lambda pretrained: build_from_factory(spec, pretrained, num_classes), (height, width),
        tuple(shallow_layers), tuple(deep_layers), heatmap, num_classes, ignore_index, tuple(class_names),
        pretrained_source=f"factory {spec}", datasets=datasets, make_task=layout.make_task, prepare=layout.prepare,
    )
