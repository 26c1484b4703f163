"""subboost.data: task registry, CLIP preprocessing, tfds (mocked) and local pipelines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

import tensorflow_datasets as tfds  # noqa: E402
from PIL import Image  # noqa: E402

from subboost import data as sbdata  # noqa: E402
from subboost.data import input_pipeline, preprocessing  # noqa: E402

MOCK_EXAMPLES = 12
SMALL = 8  # preprocessing resolution in most tests; the 224 path runs on two images only


# ----------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------
def _write_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".ppm":
        h, w, _ = array.shape
        path.write_bytes(b"P6\n# a comment\n%d %d\n255\n" % (w, h) + array.astype(np.uint8).tobytes())
    else:
        Image.fromarray(array.squeeze() if array.shape[-1] == 1 else array).save(path)


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory) -> Path:
    """GTSRB / FER2013 / RenderedSST2 in the documented ImageFolder layout, a few tiny images each."""
    root = tmp_path_factory.mktemp("local_data")
    rng = np.random.default_rng(0)

    def image(h=7, w=11, c=3):
        return rng.integers(0, 256, (h, w, c), dtype=np.uint8)

    for split, per_class in (("train", 4), ("test", 2)):
        for label in (0, 1, 42):  # zero-padded integer class directories, as GTSRB ships them
            for i in range(per_class):
                _write_image(root / "gtsrb" / split / f"{label:05d}" / f"{i}.png", image())
        _write_image(root / "gtsrb" / split / "00001" / "p.ppm", image(5, 6))
        for label, name in enumerate(sbdata.get_task("FER2013").class_dirs):
            for i in range(per_class // 2):
                _write_image(root / "fer2013" / split / name / f"{i}.png", image(6, 6, 1))  # grayscale
    for split in ("train", "valid", "test"):
        for name in ("negative", "positive"):
            for i in range(2):
                _write_image(root / "rendered_sst2" / split / name / f"{i}.jpg", image(9, 5))
    return root


# ----------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------
def test_suites_are_the_papers_task_lists():
    assert sbdata.SUITES[8] == ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD")
    assert sbdata.SUITES[14][:8] == sbdata.SUITES[8]
    assert sbdata.SUITES[14][8:] == ("CIFAR100", "STL10", "Flowers102", "OxfordIIITPet", "PCAM", "FER2013")
    assert sbdata.SUITES[20][:14] == sbdata.SUITES[14]
    assert sbdata.SUITES[20][14:] == ("EMNIST", "CIFAR10", "Food101", "FashionMNIST", "RenderedSST2", "KMNIST")
    assert set(sbdata.TASKS) == set(sbdata.SUITES[20])
    assert set(sbdata.LOCAL_TASKS) == {"GTSRB", "FER2013", "RenderedSST2"}
    assert len(sbdata.TFDS_TASKS) == 17
    assert sbdata.get_task("EMNIST").tfds_name == "emnist/digits"


@pytest.mark.parametrize("spelling,name", [("cars196", "Cars"), ("SUN397Val", "SUN397"), ("oxford-iiit-pet", "OxfordIIITPet"),
                                           ("mnist", "MNIST"), ("renderedsst2", "RenderedSST2"), ("pcam", "PCAM")])
def test_get_task_accepts_common_spellings(spelling, name):
    assert sbdata.get_task(spelling).name == name


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown task 'ImageNet'; valid tasks: SUN397, Cars, .*KMNIST"):
        sbdata.get_task("ImageNet")
    with pytest.raises(ValueError, match="unknown task 'Foo'"):
        sbdata.suite_tasks(["MNIST", "Foo"])
    with pytest.raises(ValueError, match="suites have \\[8, 14, 20\\]"):
        sbdata.suite_tasks(9)
    with pytest.raises(ValueError, match="more than once"):
        sbdata.suite_tasks("MNIST,mnist")
    with pytest.raises(ValueError, match="unknown split 'val'.*train, validation, test"):
        sbdata.split_spec("MNIST", "val")


def test_suite_tasks_by_size_and_by_names():
    assert [t.name for t in sbdata.suite_tasks("14")] == list(sbdata.SUITES[14])
    assert [t.name for t in sbdata.suite_tasks("mnist, cars196")] == ["MNIST", "Cars"]


@pytest.mark.parametrize("name", sbdata.TFDS_TASKS)
def test_registry_class_counts_match_tfds_metadata(name):
    task = sbdata.get_task(name)
    with tfds.testing.mock_data(num_examples=1):
        builder = tfds.builder(task.tfds_name, try_gcs=False)
    assert builder.info.features["label"].num_classes == task.num_classes
    if "/" in task.tfds_name:
        assert builder.builder_config.name == task.tfds_name.split("/")[1]


@pytest.mark.parametrize("n", [17, 1000, 31500])
@pytest.mark.parametrize("name", list(sbdata.TASKS))
def test_splits_carved_from_train_are_disjoint_and_cover_it(name, n):
    task = sbdata.get_task(name)
    from_train = [s for s in sbdata.SPLITS if task.splits[s].split("[")[0] == "train"]
    ranges = sorted(input_pipeline.slice_bounds(task.splits[s], n)[1:] for s in from_train)
    if len(from_train) > 1:  # carved: consecutive, non-overlapping, covering 0..n
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(stop > start for start, stop in ranges)
    # Every task has its three splits, and test never overlaps validation.
    assert set(task.splits) == set(sbdata.SPLITS)
    assert task.splits["test"] != task.splits["validation"]


def test_carve_out_sizes():
    assert input_pipeline.slice_bounds("train[90%:]", 1000) == ("train", 900, 1000)
    assert input_pipeline.slice_bounds("train[60%:80%]", 31500) == ("train", 18900, 25200)
    assert input_pipeline.slice_bounds("valid", 5) == ("valid", 0, 5)


# ----------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------
def _pil_clip_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Independent reference: PIL bicubic resize of the shorter side, centered crop (CLIP's transform)."""
    pil = Image.fromarray(image.squeeze() if image.shape[-1] == 1 else image).convert("RGB")
    w, h = pil.size
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    pil = pil.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return np.asarray(pil.crop((left, top, left + size, top + size)))


def _smooth_image(rng, h, w, c):
    coarse = rng.integers(0, 256, (max(h // 4, 2), max(w // 4, 2), c)).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse.squeeze() if c == 1 else coarse).resize((w, h), Image.BILINEAR)).reshape(h, w, c)


@pytest.mark.parametrize("h,w,c,size", [(28, 28, 1, 224), (300, 413, 3, 224), (47, 17, 3, 16), (64, 64, 3, 32),
                                        (33, 50, 3, 12), (96, 96, 3, 8)])
@pytest.mark.slow
def test_resize_and_center_crop_matches_pil(h, w, c, size):
    image = _smooth_image(np.random.default_rng(h * w), h, w, c)
    ours = preprocessing.resize_and_center_crop(image, size).numpy()
    ref = _pil_clip_crop(image, size)
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.5, (diff.max(), diff.mean())


@pytest.mark.parametrize("h,w,size", [(10, 15, 4), (15, 10, 4), (9, 14, 5), (20, 7, 6), (11, 11, 3)])
@pytest.mark.slow
def test_crop_geometry_follows_torchvision(h, w, size):
    # An image whose pixel value encodes its column: the crop shows which columns were kept.
    new_h, new_w = preprocessing.resized_shape(h, w, size)
    assert min(new_h, new_w) == size and max(new_h, new_w) == int(size * max(h, w) / min(h, w))
    ramp = np.tile((np.arange(new_w) * 7 % 256).astype(np.uint8)[None, :, None], (new_h, 1, 3))
    out = preprocessing.resize_and_center_crop(ramp, size).numpy()
    top, left = preprocessing.crop_offsets(new_h, new_w, size)
    np.testing.assert_array_equal(out, ramp[top : top + size, left : left + size])


@pytest.mark.slow
def test_normalisation_of_constant_images_is_exact():
    image = np.full((5, 9, 3), 200, np.uint8)
    crop = preprocessing.resize_and_center_crop(image, 4).numpy()
    np.testing.assert_array_equal(crop, 200)
    expected = (200 / 255 - np.array(sbdata.CLIP_MEAN)) / np.array(sbdata.CLIP_STD)
    np.testing.assert_allclose(np.asarray(sbdata.normalize_images(crop))[0, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(preprocessing.normalize_images_tf(crop).numpy(), sbdata.normalize_images(crop), rtol=1e-6)
    floats = np.zeros((2, 3), np.float32)
    assert sbdata.normalize_images(floats) is not None and np.asarray(sbdata.normalize_images(floats)).dtype == np.float32


# ----------------------------------------------------------------------------
# Pipelines over every task (tfds mocked, local from a temporary directory)
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(sbdata.TASKS))
def test_pipeline_shapes_labels_and_statistics(name, local_dir):
    task = sbdata.get_task(name)
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        images, labels = sbdata.split_arrays(name, "test", data_dir=str(local_dir), image_size=SMALL, batch_size=5)
        (normed, normed_labels), = sbdata.split_dataset(name, "test", data_dir=str(local_dir), image_size=SMALL,
                                                        normalize=True, batch_size=1000).as_numpy_iterator()
    expected = MOCK_EXAMPLES if not task.is_local else {"GTSRB": 3 * 2 + 1, "FER2013": 7, "RenderedSST2": 4}[name]
    assert images.shape == (expected, SMALL, SMALL, 3) and images.dtype == np.uint8
    assert labels.shape == (expected,) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < task.num_classes
    # Normalised output = the documented affine map of the uint8 crop, within CLIP's value range.
    np.testing.assert_array_equal(normed_labels, labels)
    assert normed.dtype == np.float32
    np.testing.assert_allclose(normed, preprocessing.normalize_images_np(images), atol=1e-6)
    low = (0 - np.array(sbdata.CLIP_MEAN)) / np.array(sbdata.CLIP_STD)
    high = (1 - np.array(sbdata.CLIP_MEAN)) / np.array(sbdata.CLIP_STD)
    assert np.all(normed >= low - 1e-6) and np.all(normed <= high + 1e-6)
    # Mock and test pixels are uniform on 0..255: resizing (with antialiasing) keeps their mean.
    assert abs(images.mean() - 127.5) < 12 and images.std() > 1, (images.mean(), images.std())
    if name in ("MNIST", "EMNIST", "FashionMNIST", "KMNIST", "FER2013"):  # grayscale -> three equal channels
        np.testing.assert_array_equal(images[..., 0], images[..., 2])


def test_all_three_splits_and_max_examples(local_dir):
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        for split in sbdata.SPLITS:
            images, _ = sbdata.split_arrays("SUN397", split, image_size=SMALL, max_examples=5)
            assert images.shape == (5, SMALL, SMALL, 3)
    with pytest.raises(ValueError, match="max_examples"):
        sbdata.split_dataset("MNIST", "test", max_examples=0)
    with pytest.raises(ValueError, match="image_size"):
        sbdata.split_dataset("MNIST", "test", image_size=0)


def test_224_path_on_two_images():
    with tfds.testing.mock_data(num_examples=2):
        images, labels = sbdata.split_arrays("Cars", "test")
    assert images.shape == (2, 224, 224, 3) and labels.shape == (2,)


def test_emnist_is_transposed():
    with tfds.testing.mock_data(num_examples=3):
        raw = np.stack([ex["image"] for ex in tfds.load("emnist/digits", split="test", try_gcs=False).as_numpy_iterator()])
        ours, _ = sbdata.split_arrays("EMNIST", "test", image_size=28)  # 28 -> 28: the resize is the identity
    np.testing.assert_array_equal(ours[..., 0], np.transpose(raw[..., 0], (0, 2, 1)))


# ----------------------------------------------------------------------------
# Local datasets
# ----------------------------------------------------------------------------
def test_local_labels_order_and_slicing(local_dir):
    paths, labels = sbdata.local_files("FER2013", "train", data_dir=str(local_dir))
    by_dir = {Path(p).parent.name: int(label) for p, label in zip(paths, labels)}
    assert by_dir == {name: i for i, name in enumerate(sbdata.get_task("FER2013").class_dirs)}
    assert by_dir["neutral"] == 6  # label order is FER2013's, not alphabetical
    paths, labels = sbdata.local_files("GTSRB", "train", data_dir=str(local_dir))
    assert sorted(set(labels.tolist())) == [0, 1, 42]
    again, _ = sbdata.local_files("GTSRB", "train", data_dir=str(local_dir))
    assert again == paths and paths != sorted(paths)  # a fixed permutation, the same on every call
    # Train and validation of a carved local task partition the train directory.
    sizes = []
    for split in ("train", "validation"):
        images, _ = sbdata.split_arrays("GTSRB", split, data_dir=str(local_dir), image_size=SMALL)
        sizes.append(len(images))
    assert sum(sizes) == len(paths) == 13 and sizes[1] == 13 - round(0.9 * 13)


def test_ppm_images_decode_exactly(local_dir, tmp_path):
    array = np.random.default_rng(3).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    _write_image(tmp_path / "x.ppm", array)
    np.testing.assert_array_equal(input_pipeline._decode_ppm((tmp_path / "x.ppm").read_bytes()), array)
    np.testing.assert_array_equal(input_pipeline._decode_file(str(tmp_path / "x.ppm")).numpy(), array)
    with pytest.raises(ValueError, match="truncated PNM image"):
        input_pipeline._decode_ppm(b"P6\n4 4\n255\n" + bytes(5))
    with pytest.raises(ValueError, match="truncated PNM header"):
        input_pipeline._decode_ppm(b"P6\n4 ")


def test_missing_local_data_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        sbdata.split_dataset("GTSRB", "test", data_dir=str(tmp_path))
    message = str(err.value)
    assert str(tmp_path / "gtsrb" / "test") in message
    assert "<split>/<class>/<image>" in message and "0..42" in message


def test_bad_local_class_directory(tmp_path):
    _write_image(tmp_path / "fer2013" / "test" / "bored" / "0.png", np.zeros((4, 4, 1), np.uint8))
    with pytest.raises(ValueError, match=r"unexpected class directory .*bored.*'angry'"):
        sbdata.local_files("FER2013", "test", data_dir=str(tmp_path))
    _write_image(tmp_path / "gtsrb" / "test" / "00043" / "0.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="label 43, outside 0..42"):
        sbdata.local_files("GTSRB", "test", data_dir=str(tmp_path))


def test_missing_tfds_data_names_data_dir_and_never_downloads(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        sbdata.split_dataset("MNIST", "test", data_dir=str(tmp_path))
    message = str(err.value)
    assert str(tmp_path) in message and "tfds build mnist" in message
    assert not any(tmp_path.iterdir())  # nothing was downloaded or prepared
