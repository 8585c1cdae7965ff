"""The evaluation runner (afconvert.evaluation.runner) on its own: class folders mapped to the model's indices,
the expanded view, non-finite logits and unreadable images counted as wrong and reported, subsets spread over the
data."""
import json

import pytest
import timm
import torch
from conftest import Constant, image_folder

from afconvert import data as D
from afconvert.evaluation import report as R
from afconvert.evaluation import runner as E
from afconvert.evaluation.shift_grids import parse_grid_spec

pytestmark = pytest.mark.usefixtures("one_thread")

K = 5
SIZE = 64


def test_class_folders_map_to_model_indices(tmp_path):
    data = image_folder(tmp_path / "d", {"coffee": 3})
    folders, images = D.list_images(data)
    mapping, how = D.class_indices(folders, num_classes=K)
    assert mapping == {"3": 3} and "folder name" in how           # sorted-folder order would say 0
    samples = [(p, mapping[f]) for p, f in images]
    r = E.evaluate_model(E.Candidate("c3", Constant(3), "test"), samples, {"accuracy"}, parse_grid_spec(),
                         input_size=32, progress=False)
    assert r["accuracy"] == 100.0
    cmap = tmp_path / "classes.txt"
    cmap.write_text("zero\none\ntwo\n3\nfour\n")
    assert D.class_indices(["3", "one"], cmap, K)[0] == {"3": 3, "one": 1}
    assert D.class_indices(["b", "a"], None, 2)[0] == {"a": 0, "b": 1}
    assert D.class_indices(["n01443537", "n01440764"], None, 1000)[0] == {"n01440764": 0, "n01443537": 1}
    for folders, cm, n, match in [(["cat"], None, K, "--class-map"), (["7"], None, K, "5 classes"),
                                  (["cat"], cmap, K, "not in --class-map")]:
        with pytest.raises(D.DataError, match=match):
            D.class_indices(folders, cm, n)


def test_expanded_view_extends_the_standard_view(tmp_path):
    data = image_folder(tmp_path / "d", {"chelsea": 0})
    _, images = D.list_images(data)
    cfg = D.data_config(timm.create_model("convnext_atto", num_classes=K), SIZE)
    std, exp, _ = E.EvalImages([(images[0][0], 0)], cfg, crop=4)[0]
    assert std.shape == (3, SIZE, SIZE) and exp.shape == (3, SIZE + 4, SIZE + 4)
    assert torch.equal(exp[:, :SIZE, :SIZE], std)
    plain, _, _ = E.EvalImages([(images[0][0], 0)], cfg)[0]
    assert torch.equal(plain, std)
    with pytest.raises(E.EvalError, match="crop:"):
        E.EvalImages([(images[0][0], 0)], cfg, crop=40)[0]


def test_nonfinite_logits_count_as_wrong(tmp_path):
    class Overflow(Constant):
        def forward(self, x):
            return super().forward(x) * float("inf")
    data = image_folder(tmp_path / "d", {"coffee": 1, "chelsea": 2})
    folders, images = D.list_images(data)
    mapping, _ = D.class_indices(folders, num_classes=K)
    r = E.evaluate_model(E.Candidate("overflow", Overflow(1), "test"), [(p, mapping[f]) for p, f in images],
                         E.parse_metrics("all"), parse_grid_spec("integer:0..1 half:0..0 fractional:2 crop:2 curve:2"),
                         input_size=32, progress=False)
    assert r["accuracy"] == r["certified_integer"] == r["consistency"] == r["crop_shift"]["certified"] == 0.0
    assert r["nonfinite"] == 100.0 and r["nonfinite_images"] == 2
    table = R.format_table([r])
    assert "100%" in table.splitlines()[2]
    assert json.loads(R.to_json([r]))[0]["logit_change"]["band_limited"] == [None, None, None]


def test_unreadable_images_are_skipped_counted_and_reported(tmp_path):
    data = image_folder(tmp_path / "d", {"coffee": 1, "chelsea": 2})
    (data / "1" / "broken.png").write_bytes(b"not an image")
    folders, images = D.list_images(data)
    mapping, _ = D.class_indices(folders, num_classes=K)
    r = E.evaluate_model(E.Candidate("c1", Constant(1), "test"), [(p, mapping[f]) for p, f in images],
                         {"accuracy"}, parse_grid_spec(), input_size=32, progress=False, batch_size=2)
    assert r["images"] == 2 and r["unreadable"] == 1 and r["accuracy"] == 50.0
    assert "1 unreadable image(s) skipped" in R.format_table([r])


def test_limit_spreads_over_the_data():
    assert E.spread_indices(10, 3) == [0, 3, 6] and E.spread_indices(4, 10) == [0, 1, 2, 3]
