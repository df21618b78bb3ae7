"""Readers, mask thresholds, splits, transforms, datasets and loaders of dataset.py."""
from __future__ import annotations

import sys
import types
from collections import Counter
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image

import dataset as D
import raabin
from conftest import cell_grey_mask, cell_image, save_image


# --------------------------------------------------------------------------- masks and images
def test_mask_thresholds_at_the_boundaries():
    grey = np.array([[0, 49, 50, 128, 200, 201, 255]], np.uint8)
    expected = np.array([[0, 0, 1, 1, 1, 2, 2]], np.uint8)
    labels = raabin.mask_to_labels(grey)
    assert labels.dtype == np.uint8 and labels.shape == grey.shape
    np.testing.assert_array_equal(labels, expected)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(raabin.mask_to_labels(rgb), expected)
    rgba = np.concatenate([rgb, np.full_like(grey, 7)[:, :, None]], axis=2)
    np.testing.assert_array_equal(raabin.mask_to_labels(rgba), expected)


def test_a_mask_of_class_indices_is_refused_not_read_as_background(tmp_path):
    from utils import DataError

    labels = np.zeros((20, 20), np.uint8)
    labels[5:15, 5:15], labels[8:12, 8:12] = 1, 2
    save_image(tmp_path / "indices.png", labels, mode="L")
    with pytest.raises(DataError, match="holds class indices 0/1/2"):
        raabin.load_mask(tmp_path / "indices.png")
    save_image(tmp_path / "grey.png", (labels * 127.5).astype(np.uint8), mode="L")
    np.testing.assert_array_equal(raabin.load_mask(tmp_path / "grey.png"), labels)
    save_image(tmp_path / "empty.png", np.zeros((20, 20), np.uint8), mode="L")
    assert raabin.load_mask(tmp_path / "empty.png").max() == 0  # an all-background mask stays legal


def test_jpeg_compressed_masks_keep_their_labels(tmp_path):
    grey = cell_grey_mask(32, 32)  # round edges: the JPEG rings around them
    expected = raabin.mask_to_labels(grey)
    for mode in ("L", "RGB"):
        path = save_image(tmp_path / f"mask_{mode}.jpg", np.repeat(grey[:, :, None], 3, 2), mode, quality=60)
        decoded = np.asarray(Image.open(path))
        assert not np.isin(decoded, (0, 128, 255)).all(), "the JPEG should add noise"
        assert (raabin.load_mask(path) == expected).mean() > 0.98


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "I;16"])
def test_load_rgb_converts_every_mode_to_rgb_uint8(tmp_path, mode):
    rgb = np.zeros((12, 20, 3), np.uint8)
    rgb[:, 10:] = (200, 100, 50)
    image = raabin.load_rgb(save_image(tmp_path / "x.png", rgb, mode))
    assert image.shape == (12, 20, 3) and image.dtype == np.uint8
    assert image[:, :10].max() <= 5 and image[:, 10:].mean() > 60  # dark left, bright right


# --------------------------------------------------------------------------- finding samples
def test_class_ids_are_fixed_when_a_folder_is_missing(classification_root):
    samples = raabin.find_classification_samples(classification_root)
    counts = Counter(label for _, label in samples)
    # Monocyte (3) is missing and lymphocyte/ is lower case: ids still follow CLASS_NAMES.
    assert counts == {0: 3, 1: 4, 2: 6, 4: 10}
    assert D.CLASS_NAMES[3] == "Monocyte"
    assert all(path.parent.name.lower() == D.CLASS_NAMES[label].lower() for path, label in samples)
    assert [p.as_posix() for p, _ in samples] == sorted(p.as_posix() for p, _ in samples)
    assert {p.suffix for p, _ in samples} == {".jpg", ".JPG", ".png", ".bmp"}


def test_classification_ignores_other_files_and_folders(classification_root):
    (classification_root / "Basophil" / "notes.txt").write_text("not an image")
    (classification_root / "Basophil" / "._basophil_00.jpg").write_bytes(b"macOS resource fork")
    (classification_root / "Unknown").mkdir()
    save_image(classification_root / "Unknown" / "x.jpg", np.zeros((8, 8, 3), np.uint8))
    assert len(raabin.find_classification_samples(classification_root)) == 23


def test_classification_falls_back_to_grth_original(segmentation_root):
    from_root = raabin.find_classification_samples(segmentation_root)
    from_grth = raabin.find_classification_samples(segmentation_root / "GrTh")
    assert from_root == from_grth
    assert len(from_root) == 20 and all(p.parent.parent.name == "Original" for p, _ in from_root)


def test_segmentation_pairs_by_class_and_stem(segmentation_root):
    samples = raabin.find_segmentation_samples(segmentation_root)
    assert len(samples) == 20
    assert Counter(label for *_, label in samples) == {0: 2, 1: 3, 2: 4, 3: 3, 4: 8}
    for image, mask, label in samples:
        assert image.stem == mask.stem
        assert image.parent.name == mask.parent.name == D.CLASS_NAMES[label]
        assert mask.parent.parent.name == "Ground Truth"
    assert any(image.suffix != mask.suffix for image, mask, _ in samples)
    assert raabin.find_segmentation_samples(segmentation_root / "GrTh") == samples


def test_segmentation_prefers_a_lossless_mask(segmentation_root):
    truth = segmentation_root / "GrTh" / "Ground Truth" / "Basophil"
    save_image(truth / "000.jpg", np.zeros((24, 24, 3), np.uint8))  # 000.png exists too
    samples = raabin.find_segmentation_samples(segmentation_root)
    assert samples[0][1] == truth / "000.png"


# --------------------------------------------------------------------------- splits
def _labels(counts):
    return [label for label, n in enumerate(counts) for _ in range(n)]


def test_split_is_deterministic_and_depends_on_the_seed():
    labels = _labels([30, 40, 50, 20, 60])
    assert D.stratified_split(labels, seed=3) == D.stratified_split(labels, seed=3)
    assert D.stratified_split(labels, seed=3) != D.stratified_split(labels, seed=4)


def test_split_has_no_overlap_and_covers_everything():
    labels = _labels([30, 40, 1, 2, 60])
    train, val, test = D.stratified_split(labels, seed=1)
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert sorted(train + val + test) == list(range(len(labels)))
    assert train == sorted(train) and val == sorted(val) and test == sorted(test)


def test_split_is_stratified():
    counts = [20, 40, 100, 60, 200]
    labels = _labels(counts)
    splits = D.stratified_split(labels, (0.7, 0.15, 0.15), seed=0)
    for split, fraction in zip(splits, (0.7, 0.15, 0.15)):
        per_class = Counter(labels[i] for i in split)
        for label, n in enumerate(counts):
            assert abs(per_class[label] - fraction * n) <= 1


@pytest.mark.parametrize("n, sizes", [(1, (1, 0, 0)), (2, (1, 0, 1)), (3, (1, 1, 1)), (10, (7, 1, 2)), (176, (123, 26, 27))])
def test_split_sizes_of_small_classes(n, sizes):
    train, val, test = D.stratified_split([0] * n, seed=0)
    assert (len(train), len(val), len(test)) == sizes


def test_split_with_a_zero_fraction():
    train, val, test = D.stratified_split(_labels([10, 3, 1]), (0.8, 0.0, 0.2), seed=0)
    assert val == [] and len(train) + len(test) == 14


# --------------------------------------------------------------------------- transforms
def _square_scene(size=32):
    image = np.full((size, size, 3), 30, np.uint8)
    mask = np.zeros((size, size), np.uint8)
    image[4:14, 6:20] = 250  # off centre, so flips and rotations move it
    mask[4:14, 6:20] = 2
    return image, mask


def test_train_transform_moves_image_and_mask_together():
    transform = D.build_transform("segmentation", 32, train=True)
    image, mask = _square_scene()
    positions = set()
    for seed in range(40):
        D.reseed_transform(transform, seed)
        out = transform(image=image, mask=mask)
        bright = out["image"].mean(0) > 0.5
        nucleus = out["mask"] == 2
        iou = (bright & nucleus).sum() / (bright | nucleus).sum()
        assert iou > 0.8, f"seed {seed}: image and mask disagree (IoU {iou:.2f})"
        positions.add(tuple(np.argwhere(nucleus.numpy()).mean(0).round()))
    assert len(positions) > 4, "the augmentation should move the square"


def test_flips_are_not_locked_together_after_reseed():
    transform = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    image = np.arange(16, dtype=np.uint8).reshape(4, 4)
    outcomes = set()
    for seed in range(30):
        D.reseed_transform(transform, seed)
        out = transform(image=image)["image"]
        outcomes.add((bool(out[0, 0] in (3, 15)), bool(out[0, 0] in (12, 15))))
    assert len(outcomes) == 4


@pytest.mark.parametrize("train", [True, False])
def test_dataset_outputs(segmentation_root, classification_root, train):
    seg = D.SegmentationDataset(raabin.find_segmentation_samples(segmentation_root),
                                D.build_transform("segmentation", 16, train))
    for i in range(len(seg)):  # includes the non-square images
        image, mask = seg[i]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert mask.shape == (16, 16) and mask.dtype == torch.int64
        assert set(mask.unique().tolist()) <= {0, 1, 2}
    cls = D.ClassificationDataset(raabin.find_classification_samples(classification_root),
                                  D.build_transform("classification", 16, train))
    image, label = cls[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == 0
    assert cls.labels == [label for _, label in cls.samples] and seg.labels[0] == 0


def test_eval_transform_is_resize_only():
    transform = D.build_transform("segmentation", 32, train=False)
    image, mask = _square_scene()
    out = transform(image=image, mask=mask)
    np.testing.assert_allclose(out["image"].numpy(), image.transpose(2, 0, 1) / 255.0, atol=1e-6)
    np.testing.assert_array_equal(out["mask"].numpy(), mask)


@pytest.mark.parametrize("size, out", [(120, 128), (120, 96), (37, 16)])
def test_resizing_keeps_the_mask_on_its_image(size, out):
    """After a resize the mask's square covers exactly the pixels whose linearly resized image is
    over half bright, i.e. whose centres lie in the square (a plain nearest-neighbour resize put
    the mask about half a pixel off: 71 of 1296 pixels wrong at 120 -> 128)."""
    image = np.zeros((size, size, 3), np.uint8)
    mask = np.zeros((size, size), np.uint8)
    lo, hi = size // 4, size // 2 + 3
    image[lo:hi, lo:hi], mask[lo:hi, lo:hi] = 255, 2
    result = D.build_transform("segmentation", out, train=False)(image=image, mask=mask)
    np.testing.assert_array_equal((result["mask"] == 2).numpy(), (result["image"][0] > 0.5).numpy())


def test_reseed_makes_augmentation_a_function_of_the_seed(segmentation_root):
    ds = D.SegmentationDataset(raabin.find_segmentation_samples(segmentation_root),
                               D.build_transform("segmentation", 24, train=True))

    def epoch(seed):
        ds.reseed(seed)
        return [ds[i] for i in range(6)]

    first, again, other = epoch(5), epoch(5), epoch(6)
    for (a_img, a_mask), (b_img, b_mask) in zip(first, again):
        assert torch.equal(a_img, b_img) and torch.equal(a_mask, b_mask)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, other))


# --------------------------------------------------------------------------- splits of a root, loaders
def test_build_splits_partitions_the_root(classification_root):
    datasets = D.build_splits("classification", classification_root, image_size=16, seed=0)
    assert set(datasets) == {"train", "val", "test"}
    paths = [{p for p, _ in ds.samples} for ds in datasets.values()]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    assert set().union(*paths) == {p for p, _ in raabin.find_classification_samples(classification_root)}
    assert len(datasets["train"].transform.transforms) > len(datasets["val"].transform.transforms)
    again = D.build_splits("classification", classification_root, image_size=16, seed=0)
    assert all(again[k].samples == datasets[k].samples for k in datasets)


def test_main_reads_the_train_split_without_augmentation(segmentation_root):
    """main.py --splits train: each row must attack the same images, so no random transform."""
    import argparse

    from main import load_splits

    args = argparse.Namespace(task="segmentation", data=str(segmentation_root), val_data=None, test_data=None,
                              limit=None, splits=["train"])
    train = load_splits(args, {"image_size": 24, "args": {"seed": 0}})["train"]
    augmenting = D.build_splits("segmentation", segmentation_root, image_size=24)["train"]
    assert len(train.transform.transforms) == len(D.build_transform("segmentation", 24, train=False).transforms)
    for i in range(len(train)):
        assert all(torch.equal(a, b) for a, b in zip(train[i], train[i]))
    assert any(not torch.equal(augmenting[i][0], augmenting[i][0]) for i in range(len(augmenting)))


def test_a_data_folder_changed_since_training_is_refused(classification_root):
    """One image more in a class reshuffles that class over the splits: main.py must not attack
    a "test" split that now holds training images."""
    import argparse

    from main import load_splits
    from utils import DataError

    trained = D.build_splits("classification", classification_root, image_size=16, seed=0)
    ckpt = {"image_size": 16, "args": {"seed": 0},
            "split_digests": {name: split.split_digest for name, split in trained.items()}}
    args = argparse.Namespace(task="classification", data=str(classification_root), val_data=None, test_data=None,
                              limit=2, splits=["val", "test"],
                              checkpoint="ckpt.pt")
    assert len(load_splits(args, ckpt)["test"]) <= 2  # the digest is of the whole split, whatever --limit
    save_image(classification_root / "Neutrophil" / "added_99.png", cell_image(cell_grey_mask(24, 24)))
    changed = D.build_splits("classification", classification_root, image_size=16, seed=0)
    assert changed["train"].split_digest != trained["train"].split_digest
    test_image = Path(trained["test"].samples[0][0])
    test_image.rename(test_image.with_name("renamed" + test_image.suffix))
    with pytest.raises(DataError, match="split of the data is not the one ckpt.pt was trained with"):
        load_splits(args, ckpt)
    args.splits = ["test"]
    with pytest.raises(DataError, match="the test split of the data is not the one ckpt.pt was trained with"):
        load_splits(args, ckpt)
    load_splits(args, {"image_size": 16, "args": {"seed": 0}})  # an older checkpoint has no digests to check


def test_main_splits_with_the_split_seed_and_old_checkpoints_with_their_seed(classification_root):
    """Training seeds share a split (--split-seed); a checkpoint from before --split-seed split by --seed."""
    import argparse

    from main import load_splits

    args = argparse.Namespace(task="classification", data=str(classification_root), val_data=None, test_data=None,
                              limit=None, splits=["test"])
    tests = {seed: [p for p, _ in D.build_splits("classification", classification_root, image_size=16,
                                                  seed=seed)["test"].samples] for seed in (0, 1)}
    assert tests[0] != tests[1]

    def test_files(train_args: dict) -> list:
        return [p for p, _ in load_splits(args, {"image_size": 16, "args": train_args})["test"].samples]

    assert test_files({"seed": 1, "split_seed": 0}) == tests[0]
    assert test_files({"seed": 0, "split_seed": 1}) == tests[1]
    assert test_files({"seed": 1}) == tests[1]


@pytest.mark.parametrize("flag", ["val", "test"])
def test_a_missing_own_split_folder_names_its_flag(classification_root, tmp_path, flag):
    from utils import DataError

    with pytest.raises(DataError, match=f"--{flag}-data folder .* does not exist; check the path given to --{flag}-data"):
        D.build_splits("classification", classification_root, image_size=16, **{f"{flag}_data": tmp_path / "nope"})


def test_splits_given_overlapping_folders_are_refused(classification_root):
    from utils import DataError

    with pytest.raises(DataError, match="in both the train and the val split"):
        D.build_splits("classification", classification_root, val_data=classification_root, image_size=16)


def test_build_splits_with_own_val_and_test_folders(make_classification_data):
    train_root = make_classification_data(name="Train")
    val_root = make_classification_data({"Basophil": 2, "Neutrophil": 3}, name="Val")
    test_root = make_classification_data({"Eosinophil": 4}, name="Test")
    both = D.build_splits("classification", train_root, val_root, test_root, image_size=16)
    assert len(both["train"]) == 23 and len(both["val"]) == 5 and len(both["test"]) == 4
    only_val = D.build_splits("classification", train_root, val_data=val_root, image_size=16)
    assert len(only_val["val"]) == 5 and len(only_val["train"]) + len(only_val["test"]) == 23
    assert len(only_val["test"]) >= 4  # about 0.15/0.85 of each class, at least one per class


def _distinct_images(root: Path, per_class: int, first_seed: int) -> Path:
    """Class folders of PNG images that all differ (each has its own noise seed)."""
    for c, name in enumerate(("Lymphocyte", "Neutrophil")):
        for i in range(per_class):
            seed = first_seed + 100 * c + i
            save_image(root / name / f"{seed}.png", cell_image(cell_grey_mask(16, 16, i), seed=seed))
    return root


def test_test_images_copied_from_training_images_are_found(tmp_path):
    train_root = _distinct_images(tmp_path / "Train", 6, first_seed=0)
    test_root = _distinct_images(tmp_path / "Test", 2, first_seed=1000)
    copied = test_root / "Lymphocyte" / "copy.png"
    copied.write_bytes((train_root / "Lymphocyte" / "3.png").read_bytes())
    altered = bytearray((train_root / "Neutrophil" / "101.png").read_bytes())
    altered[len(altered) // 2] ^= 1  # same size, other content: not a copy
    (test_root / "Neutrophil" / "altered.png").write_bytes(bytes(altered))
    val_root = _distinct_images(tmp_path / "Val", 2, first_seed=3000)
    splits = D.build_splits("classification", train_root, val_root, test_root, image_size=16)
    assert splits["test"].training_copies == [(copied, train_root / "Lymphocyte" / "3.png")]
    assert splits["train"].training_copies == [] and splits["val"].training_copies == []
    assert len(D.training_copies_notes(splits)) == 1
    note = D.training_copies_notes(splits)[0]
    assert note.startswith("1 test images are byte-identical to training images") and str(copied) in note
    distinct = D.build_splits("classification", train_root, val_root, _distinct_images(tmp_path / "T2", 2, 2000),
                              image_size=16)
    assert distinct["test"].training_copies == [] and distinct["val"].training_copies == []


def test_an_image_held_twice_in_data_is_found_when_the_split_parts_the_pair(tmp_path):
    root = _distinct_images(tmp_path / "Data", 10, first_seed=0)
    for i in range(10):  # a copy of every Lymphocyte: some pairs land in different splits
        (root / "Lymphocyte" / f"dup{i}.png").write_bytes((root / "Lymphocyte" / f"{i}.png").read_bytes())
    splits = D.build_splits("classification", root, image_size=16)
    train = {Path(sample[0]) for sample in splits["train"].samples}

    def partner(path: Path) -> Path:
        return path.with_name(path.name.removeprefix("dup") if path.name.startswith("dup") else "dup" + path.name)

    for name in ("val", "test"):
        evaluated = [Path(sample[0]) for sample in splits[name].samples]
        assert splits[name].training_copies == [(p, partner(p)) for p in evaluated if partner(p) in train]
    assert sum(len(splits[n].training_copies) for n in ("val", "test")) > 0


def test_build_splits_limit_and_segmentation(segmentation_root):
    datasets = D.build_splits("segmentation", segmentation_root, image_size=16, limit=3)
    assert all(1 <= len(ds) <= 3 for ds in datasets.values())
    assert isinstance(datasets["train"], D.SegmentationDataset)
    assert D.stratified_subset(range(10), [0] * 8 + [1] * 2, 5, seed=0) == \
        D.stratified_subset(range(10), [0] * 8 + [1] * 2, 5, seed=0)
    assert Counter(([0] * 8 + [1] * 2)[i] for i in D.stratified_subset(range(10), [0] * 8 + [1] * 2, 5)) == {0: 4, 1: 1}


def test_format_split_counts(classification_root):
    table = D.format_split_counts(D.build_splits("classification", classification_root, image_size=16),
                                  D.CLASS_NAMES)
    lines = table.splitlines()
    assert lines[0].split() == ["class", "train", "val", "test"]
    assert [line.split()[0] for line in lines[1:]] == [*D.CLASS_NAMES, "total"]
    assert lines[4].split()[1:] == ["0", "0", "0"]  # Monocyte
    assert sum(int(x) for x in lines[-1].split()[1:]) == 23


def test_resolve_data_root(monkeypatch, tmp_path):
    assert D.resolve_data_root(str(tmp_path), "classification") == tmp_path
    fake = types.ModuleType("synthetic")
    fake.ensure_synthetic = lambda root=None, **kwargs: tmp_path / "synth"
    monkeypatch.setitem(sys.modules, "synthetic", fake)
    assert D.resolve_data_root(None, "classification") == tmp_path / "synth" / "Train"
    assert D.resolve_data_root(None, "segmentation") == tmp_path / "synth"


def test_loader_batches(segmentation_root):
    ds = D.build_splits("segmentation", segmentation_root, image_size=16)["train"]
    loader = D.make_loader(ds, batch_size=4, train=True, seed=0)
    batches = list(loader)
    assert len(batches) == len(ds) // 4 and loader.drop_last
    images, masks = batches[0]
    assert images.shape == (4, 3, 16, 16) and masks.shape == (4, 16, 16) and masks.dtype == torch.int64
    eval_loader = D.make_loader(ds, batch_size=4, train=False)
    assert not eval_loader.drop_last and sum(len(b[0]) for b in eval_loader) == len(ds)
    assert not D.make_loader(ds, batch_size=len(ds), train=True).drop_last


@pytest.mark.parametrize("n_items, batches", [(20, [16, 4]), (17, [16]), (16, [16])])
def test_a_sharded_training_loader_drops_only_a_last_batch_of_one(n_items, batches):
    """Each rank would otherwise drop its own partial batch, and epochs shrink with the world size."""
    ds = torch.utils.data.TensorDataset(torch.arange(40.0))
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=40 // n_items, rank=0, shuffle=False) \
        if 40 % n_items == 0 else list(range(n_items))
    loader = D.make_loader(ds, batch_size=16, train=True, sampler=sampler)
    assert [len(b[0]) for b in loader] == batches
    assert [len(b[0]) for b in D.make_loader(torch.utils.data.Subset(ds, range(n_items)), 16, train=True)] == [16]


def test_loader_with_workers_is_reproducible(classification_root):
    ds = D.build_splits("classification", classification_root, image_size=16)["train"]

    def run():
        loader = D.make_loader(ds, batch_size=4, train=True, workers=1, seed=7)
        return [(x.clone(), y.clone()) for x, y in loader]

    first, second = run(), run()
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))


# --------------------------------------------------------------------------- real data
def test_real_segmentation_data(real_seg_root):
    samples = raabin.find_segmentation_samples(real_seg_root)
    assert len(samples) == 300
    assert Counter(D.CLASS_NAMES[label] for *_, label in samples) == {
        "Neutrophil": 176, "Lymphocyte": 53, "Monocyte": 48, "Eosinophil": 22, "Basophil": 1}
    ds = D.SegmentationDataset(samples, D.build_transform("segmentation", 32, train=False))
    present = np.zeros(3, bool)
    sizes = set()
    for image_path, mask_path, _ in samples:
        labels = raabin.load_mask(mask_path)
        present[np.unique(labels)] = True
        sizes.add(labels.shape)
    assert present.all(), "background, cytoplasm and nucleus should all occur"
    assert any(h != w for h, w in sizes), "the real data has non-square images"
    image, mask = ds[0]
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32)
