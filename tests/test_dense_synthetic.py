"""The offline dense-prediction sets (beit3.finetune.dense.synthetic): COCO instances of Tux Paint stamps
pasted on scikit-image photos, the same composites in the ADE20K layout, and easy-VQA's shapes.

The masks are checked against the stamp files themselves (each annotation names its stamp and where it was
pasted), the boxes and the ADE labels against the decoded masks, the shapes' labels against geometry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from beit3.finetune.data.sources import TUXPAINT_DIR, DataSourceError
from beit3.finetune.dense.synthetic import DenseDataConfig, DenseDataError, find_stamps, main, write_sets

pytest.importorskip("pycocotools")
pytest.importorskip("skimage")
pytestmark = [
    pytest.mark.skipif(not TUXPAINT_DIR.is_dir(), reason="needs Debian tuxpaint-stamps-default"),
    # pycocotools 2.0.11's mask.decode passes copy=False to numpy 2's __array__ (its own code, not ours)
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning"),
]

CFG = DenseDataConfig(size=64, train=5, val=3, seed=3, categories=("food", "vehicles", "plants"),
                      sets=("coco", "ade"))  # fmt: skip


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dense")
    write_sets(root, CFG, quiet=True)
    return root


def coco(out: Path, split: str):
    from pycocotools.coco import COCO

    return COCO(str(out / "coco" / "annotations" / f"instances_{split}.json"))


def decoded(ann: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode(ann["segmentation"]).astype(bool)


def stamp_mask(ann: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The stamp file's alpha > 0.5, cropped to its opaque box, resized to the paste box and placed there on
    a (size, size) canvas; and its alpha == 1 (pixels that show the stamp alone)."""
    x, y, w, h = ann["paste_box"]
    rgba = Image.open(TUXPAINT_DIR / ann["stamp"]).convert("RGBA")
    rgba = rgba.crop(rgba.getchannel("A").point(lambda a: 255 if a >= 128 else 0).getbbox())
    alpha = np.asarray(rgba.resize((w, h), Image.Resampling.BILINEAR))[:, :, 3]
    full, opaque = np.zeros((size, size), bool), np.zeros((size, size), bool)
    full[y : y + h, x : x + w], opaque[y : y + h, x : x + w] = alpha >= 128, alpha == 255
    return full, opaque


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_set_loads_in_pycocotools_with_its_images(out, split):
    c = coco(out, split)
    count = CFG.train if split == "train" else CFG.val
    assert sorted(c.getImgIds()) == list(range(1, count + 1))
    assert len(c.getAnnIds()) >= count  # at least one stamp per image
    for image in c.loadImgs(c.getImgIds()):
        with Image.open(out / "coco" / split / image["file_name"]) as f:
            assert f.format == "JPEG" and f.size == (image["width"], image["height"]) == (CFG.size, CFG.size)


@pytest.mark.parametrize("split", ["train", "val"])
def test_masks_are_the_visible_alpha_of_the_pasted_stamps(out, split):
    """Each mask is its stamp's alpha > 0.5 where no later stamp of the image covers it (IoU with the mask
    rebuilt from the stamp file; the set resizes in two steps, the reference in one), inside its paste box,
    disjoint from the others; and the JPEG shows the stamp's pixels where it is opaque."""
    c = coco(out, split)
    for image_id in c.getImgIds():
        anns = sorted(c.loadAnns(c.getAnnIds(imgIds=image_id)), key=lambda a: a["id"])
        masks = [decoded(a) for a in anns]
        assert sum(m.astype(int) for m in masks).max() == 1  # disjoint
        covered = np.zeros((CFG.size, CFG.size), bool)
        for ann, mask in reversed(list(zip(anns, masks))):  # the last pasted is on top
            full, opaque = stamp_mask(ann, CFG.size)
            reference = full & ~covered
            iou = (mask & reference).sum() / (mask | reference).sum()
            assert iou > 0.95, (ann["stamp"], iou)
            x, y, w, h = ann["paste_box"]
            inside = np.zeros_like(mask)
            inside[y : y + h, x : x + w] = True
            assert not (mask & ~inside).any()
            assert mask.sum() * 2 >= full.sum() * 0.9  # placements keep every stamp at least half visible
            covered |= full
        opaque_top = np.zeros((CFG.size, CFG.size), bool)
        for ann, mask in zip(anns, masks):
            opaque_top |= stamp_mask(ann, CFG.size)[1] & mask
        assert opaque_top.any()


def test_composite_pixels_are_the_stamp_where_it_is_opaque(out):
    """Away from the edges of an opaque, visible stamp region the JPEG's pixels are the stamp's own."""
    c = coco(out, "train")
    errors = []
    for ann in c.loadAnns(c.getAnnIds()):
        x, y, w, h = ann["paste_box"]
        rgba = Image.open(TUXPAINT_DIR / ann["stamp"]).convert("RGBA")
        rgba = rgba.crop(rgba.getchannel("A").point(lambda a: 255 if a >= 128 else 0).getbbox())
        stamp = np.asarray(rgba.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
        image = np.asarray(Image.open(out / "coco" / "train" / f"{ann['image_id']:012d}.jpg"), np.float32)
        mask = decoded(ann)[y : y + h, x : x + w] & (stamp[:, :, 3] == 255)
        if mask.sum() >= 20:
            errors.append(np.abs(image[y : y + h, x : x + w][mask] - stamp[:, :, :3][mask]).mean())
    assert errors and np.median(errors) < 20, errors


def test_boxes_and_areas_are_the_visible_masks(out):
    for split in ("train", "val"):
        c = coco(out, split)
        for ann in c.loadAnns(c.getAnnIds()):
            ys, xs = np.nonzero(decoded(ann))
            x0, y0 = xs.min(), ys.min()
            assert ann["bbox"] == [x0, y0, xs.max() - x0 + 1, ys.max() - y0 + 1]
            assert ann["area"] == len(xs) and ann["iscrowd"] == 0


def test_categories_are_the_stamp_folders_and_val_stamps_are_held_out(out):
    classes = json.loads((out / "coco" / "classes.json").read_text())
    assert classes == list(CFG.categories)
    stamps = {}
    for split in ("train", "val"):
        c = coco(out, split)
        assert [cat["name"] for cat in c.loadCats(c.getCatIds())] == classes
        for ann in c.loadAnns(c.getAnnIds()):
            assert ann["stamp"].split("/")[0] == classes[ann["category_id"] - 1]
        stamps[split] = {ann["stamp"] for ann in c.loadAnns(c.getAnnIds())}
    assert stamps["val"] and not stamps["train"] & stamps["val"]


def test_ade_labels_are_the_coco_masks_categories(out):
    """The ADE20K-layout set holds the same JPEGs; its PNG is each visible mask's category id, 0 elsewhere."""
    ade = out / "ade" / "ADEChallengeData2016"
    for split, folder in (("train", "training"), ("val", "validation")):
        c = coco(out, split)
        for image_id in c.getImgIds():
            expected = np.zeros((CFG.size, CFG.size), np.uint8)
            for ann in c.loadAnns(c.getAnnIds(imgIds=image_id)):
                expected[decoded(ann)] = ann["category_id"]
            stem = f"ADE_{split}_{image_id:08d}"
            labels = Image.open(ade / "annotations" / folder / f"{stem}.png")
            assert labels.mode == "L"
            np.testing.assert_array_equal(np.asarray(labels), expected)
            jpg = (ade / "images" / folder / f"{stem}.jpg").read_bytes()
            assert jpg == (out / "coco" / split / f"{image_id:012d}.jpg").read_bytes()


def test_shapes_labels_have_the_shape_geometry(tmp_path):
    """easy-VQA's shapes: one label per image (1 circle, 2 rectangle, 3 triangle) on background 0, and the
    labelled region fills its box as the shape does (a disc pi/4, a rectangle all, a triangle half)."""
    pytest.importorskip("easy_vqa")
    out = tmp_path
    write_sets(
        out, DenseDataConfig(**{**CFG.__dict__, "train": 6, "val": 4, "sets": ("shapes",)}), quiet=True
    )
    fill = {1: np.pi / 4, 2: 1.0, 3: 0.5}
    root = out / "shapes" / "ADEChallengeData2016" / "annotations"
    pngs = sorted(root.glob("*/*.png"))
    assert len(pngs) == 6 + 4
    seen = set()
    for png in pngs:
        labels = np.asarray(Image.open(png))
        values = set(np.unique(labels)) - {0}
        assert len(values) == 1 and labels[0, 0] == 0
        shape = values.pop()
        ys, xs = np.nonzero(labels)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert abs(len(ys) / box - fill[shape]) < 0.12, (png.name, shape, len(ys) / box)
        seen.add(shape)
    assert len(seen) >= 2
    assert json.loads((out / "shapes" / "classes.json").read_text()) == ["circle", "rectangle", "triangle"]


def test_same_seed_writes_the_same_bytes(out, tmp_path):
    again = DenseDataConfig(**{**CFG.__dict__, "sets": ("coco",), "val": 1})
    write_sets(tmp_path, again, quiet=True)
    names = ["train/000000000001.jpg", "train/000000000005.jpg", "annotations/instances_train.json"]
    for name in names:
        assert (tmp_path / "coco" / name).read_bytes() == (out / "coco" / name).read_bytes(), name
    other = DenseDataConfig(**{**again.__dict__, "seed": 4})
    write_sets(tmp_path / "other", other, quiet=True)
    assert (tmp_path / "other/coco" / names[0]).read_bytes() != (out / "coco" / names[0]).read_bytes()


def test_bad_settings_and_missing_data_are_named(tmp_path, capsys):
    with pytest.raises(DenseDataError, match="label 'x'"):
        write_sets(tmp_path, DenseDataConfig(label="x"))
    with pytest.raises(DataSourceError, match=r"\['dinosaurs'\] not in"):
        find_stamps(DenseDataConfig(categories=("dinosaurs",)))
    with pytest.raises(DataSourceError, match="apt-get install -y --no-install-recommends tuxpaint"):
        find_stamps(CFG, root=tmp_path / "nowhere")
    assert main([str(tmp_path), "--categories", "dinosaurs", "--quiet"]) == 2
    assert "beit3-dense-data: error: stamp categories ['dinosaurs']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--max-stamps", "0"])
    assert e.value.code == 2 and "max_stamps 0" in capsys.readouterr().err
