"""One image loader for calibration, evaluation and training: listing, class maps, unreadable files."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from afconvert import data as D


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
