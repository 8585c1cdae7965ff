"""One image loader for calibration, evaluation and training: listing, class maps, unreadable files."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from afconvert import data as D
from conftest import idx_folder, write_idx


def _image(path, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)


def test_extensions_are_torchvision_s():
    from torchvision.datasets.folder import IMG_EXTENSIONS
    assert D.IMAGE_EXTENSIONS == IMG_EXTENSIONS


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    (tmp_path / "a").mkdir()
    _image(tmp_path / "a" / "good.png")
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "a" / "notes.txt").write_text("ignored: not an image extension")
    folders, samples = D.list_images(tmp_path)
    assert folders == ["a"] and [p.name for p, _ in samples] == ["broken.jpg", "good.png"]
    assert D.open_image(tmp_path / "a" / "broken.jpg") is None
    model = timm.create_model("convnext_atto", num_classes=3)
    x, skipped = D.load_images(tmp_path, model, (32, 32))
    assert x.shape == (1, 3, 32, 32) and skipped == 1 and torch.isfinite(x).all()


def test_folders_without_images_say_what_to_do(tmp_path):
    with pytest.raises(D.DataError, match="no such directory.*fix"):
        D.list_images(tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(D.DataError, match="no images in class folders; fix"):
        D.list_images(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    with pytest.raises(D.DataError, match="none of the images.*can be read"):
        D.load_images(tmp_path / "bad", timm.create_model("convnext_atto"), (32, 32))


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reads_back_exactly(tmp_path, gz):
    written = idx_folder(tmp_path, gz=gz)
    for split, name in (("train", "train"), ("test", "t10k"), ("t10k", "t10k")):
        images, labels, prefix = D.idx_split(tmp_path, split)
        assert prefix == name and images.dtype == np.uint8
        assert np.array_equal(images, written[name][0]) and np.array_equal(labels, written[name][1])
    floats = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4)
    write_idx(tmp_path / "f.idx", floats, type_code=0x0D)
    assert np.array_equal(D.read_idx(tmp_path / "f.idx"), floats)


def test_bad_idx_files_give_one_line_errors(tmp_path):
    idx_folder(tmp_path, gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-5])
    with pytest.raises(D.DataError, match=r"truncated \(.* needs .*\); fix") as err:
        D.idx_split(tmp_path, "train")
    assert "\n" not in str(err.value)
    (tmp_path / "junk-images-idx3-ubyte").write_bytes(b"PK\x03\x04 a zip")
    with pytest.raises(D.DataError, match="not an IDX file.*fix"):
        D.read_idx(tmp_path / "junk-images-idx3-ubyte")
    other = tmp_path / "other"
    idx_folder(other, n=12, splits=("t10k",))
    write_idx(other / "t10k-labels-idx1-ubyte.gz", np.zeros(11, np.uint8), gz=True)
    with pytest.raises(D.DataError, match="12 images .* but 11 labels.*fix"):
        D.idx_split(other, "test")
    with pytest.raises(D.DataError, match="no IDX images \\+ labels pair for split 'train'.*fix: --split t10k"):
        D.idx_split(other, "train")


def test_idx_folders_read_wherever_image_folders_are(tmp_path):
    """Training, evaluation and calibration read an IDX folder, grayscale for one-channel models, and nothing
    reaches the network."""
    written = idx_folder(tmp_path, n=12)
    samples, classes = D.training_samples(tmp_path)
    assert classes == [str(c) for c in range(10)] and [c for _, c in samples] == list(written["train"][1])
    folders, images = D.list_images(tmp_path)                 # evaluation: the test split by default
    assert folders == classes and [c for _, c in images] == [str(c) for c in written["t10k"][1]]
    gray = timm.create_model("resnet18", in_chans=1, num_classes=10)
    cfg = D.data_config(gray, 32)
    assert cfg["input_size"] == (1, 32, 32) and len(cfg["mean"]) == len(cfg["std"]) == 1
    img = D.open_image(samples[3][0], D.image_mode(cfg))
    assert img.mode == "L" and np.array_equal(np.asarray(img), written["train"][0][3])
    x, skipped = D.load_images(tmp_path, gray, (32, 32), limit=5)
    assert x.shape == (5, 1, 32, 32) and skipped == 0
    rgb, _ = D.load_images(tmp_path, timm.create_model("resnet18", num_classes=10), (32, 32), limit=2)
    assert rgb.shape == (2, 3, 32, 32)
    pixels = np.asarray(D.open_image(samples[3][0]))          # RGB by default: the gray value three times
    assert pixels.shape == (28, 28, 3) and all(np.array_equal(pixels[..., c], written["train"][0][3]) for c in range(3))
