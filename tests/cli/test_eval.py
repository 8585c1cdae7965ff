"""`afconvert eval` end to end: a converted model's certified accuracies equal its accuracy where its source's
fall below; tables, JSON files and plots; a backbone's per-output equivariance; errors in one line."""
import json
import sys

import pytest
import timm
import torch
from conftest import Constant, image_folder, photo, randomize_

import afconvert
from afconvert import data as D
from afconvert.cli import eval as eval_cli
from afconvert.cli import main as cli_main
from afconvert.evaluation import runner as E

pytestmark = pytest.mark.usefixtures("one_thread")

K = 5
SIZE = 64
PHOTOS = ["chelsea", "coffee", "astronaut", "rocket", "camera", "clock"]
GRID = ["--grid", "integer:0..1 half:0..1 fractional:3"]


def _views(model, paths):
    ds = E.EvalImages([(p, 0) for p in paths], D.data_config(model, SIZE))
    return torch.stack([ds[i][0] for i in range(len(ds))])


def _centre_head(model, x):
    """Classifier bias = -W mean(features): predictions depend on the image, not on the bias."""
    with torch.no_grad():
        f = model.forward_head(model.forward_features(x), pre_logits=True)
        model.head.fc.bias.copy_(-model.head.fc.weight @ f.mean(0))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random ConvNeXt-atto (K classes) and its conversion, both saved; photos labelled by each."""
    tmp = tmp_path_factory.mktemp("eval")
    staging = tmp / "staging"
    staging.mkdir()
    paths = []
    for name in PHOTOS:
        photo(name).save(staging / f"{name}.png")
        paths.append(staging / f"{name}.png")
    src = randomize_(timm.create_model("convnext_atto", num_classes=K)).eval()
    af = afconvert.convert(src).eval()
    x = _views(src, paths)
    _centre_head(src, x)
    _centre_head(af, x)
    torch.save(src.state_dict(), tmp / "src.pt")
    afconvert.save(af, tmp / "af.pt")
    with torch.no_grad():
        src_pred = src(x).argmax(1).tolist()
        af_pred = af(x).argmax(1).tolist()
    # A: labels = the unconverted model's own predictions (its plain accuracy is 100 %)
    data_a = image_folder(tmp / "a", dict(zip(PHOTOS, src_pred)))
    # B: the converted model's predictions for half the photos, a wrong class for the others
    data_b = image_folder(tmp / "b", {n: p if i % 2 == 0 else (p + 1) % K
                                      for i, (n, p) in enumerate(zip(PHOTOS, af_pred))})
    return {"tmp": tmp, "src": ["convnext_atto", "--weights", str(tmp / "src.pt"), "--num-classes", str(K)],
            "af": str(tmp / "af.pt"), "a": str(data_a), "b": str(data_b)}


def _run_json(capsys, argv):
    rc = eval_cli.run(argv + ["--json", "--no-progress", "--input-size", str(SIZE)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


def test_converted_certified_equals_accuracy_unconverted_lower(setup, capsys):
    res = _run_json(capsys, setup["src"] + [setup["af"], "--data", setup["a"]] + GRID)
    assert [r["model"] for r in res] == ["convnext_atto", setup["af"]]
    for r in res:
        for key in ("model", "accuracy", "certified_integer", "certified_half", "certified_fractional",
                    "consistency", "grids", "nonfinite"):
            assert key in r
        assert r["images"] == len(PHOTOS)
        assert r["grids"]["integer"] == {"spec": "integer:0..1", "count": 4,
                                         "definition": "every integer (dy, dx) with 0 <= dy, dx <= 1"}
        assert r["grids"]["fractional"]["count"] == 16 and r["grids"]["half"]["count"] == 16
    src, af = res
    assert src["accuracy"] == 100.0
    for key in ("certified_integer", "certified_half", "certified_fractional"):
        assert src[key] < src["accuracy"], key          # the unconverted model flips under some shift
        assert af[key] == af["accuracy"], key           # the converted one cannot
    assert af["consistency"] == af["consistency_fractional"] == 100.0
    assert af["nonfinite"] == 0 and src["nonfinite"] == 0
    assert "converted with 'afc'" in af["source"]


def test_converted_certified_on_a_half_right_labelling(setup, capsys):
    (af,) = _run_json(capsys, [setup["af"], "--data", setup["b"]] + GRID)
    assert af["accuracy"] == 50.0
    assert af["certified_integer"] == af["certified_half"] == af["certified_fractional"] == 50.0


def test_table_json_file_and_plot(setup, capsys):
    pytest.importorskip("matplotlib")                        # the demo extra
    out, png = setup["tmp"] / "res.json", setup["tmp"] / "curves.png"
    rc = eval_cli.run(setup["src"] + ["--data", setup["a"], "--metrics", "accuracy", "--grid", "crop:3", "curve:2",
                               "--out", str(out), "--plot", str(png), "--no-progress", "--input-size", str(SIZE)])
    text, err = capsys.readouterr()
    assert rc == 0, err
    head = text.splitlines()[0].split()
    assert head[:6] == ["model", "images", "top-1", "top-5", "cert-int", "cert-half"] and "nonfinite" in head
    assert "convnext_atto" in text and f"wrote {png}" in text
    (r,) = json.loads(out.read_text())
    assert r["certified_integer"] is None and r["crop_shift"]["k"] == [0, 1, 2, 3]
    assert r["crop_shift"]["accuracy"][0] == 100.0 and len(r["logit_change"]["t"]) == 3
    assert r["logit_change"]["band_limited"][0] == 0.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in setup["tmp"].iterdir() if p.name.endswith(".tmp")]


def test_all_nonfinite_predictions_exit_non_zero(tmp_path, capsys, monkeypatch):
    """The results are still printed, but a model whose every prediction is non-finite fails the command."""
    class Overflow(Constant):
        def forward(self, x):
            return super().forward(x) * float("nan")
    data = image_folder(tmp_path / "d", {"coffee": 1, "chelsea": 2})
    monkeypatch.setattr(E, "resolve_model", lambda arg, *a, **k: E.Candidate(arg, Overflow(1), "test"))
    argv = [str(data / "m.pt"), "--data", str(data), "--metrics", "accuracy", "--no-progress", "--input-size", "32"]
    assert eval_cli.run(argv) == 3
    out, err = capsys.readouterr()
    assert "100%" in out and err.strip().splitlines()[-1].startswith("afconvert eval: error: every prediction")


@pytest.mark.parametrize("args, message", [
    (["--data", "{tmp}/missing"], "no such directory"),
    (["--data", "{tmp}/empty"], "holds no images"),
    (["--data", "{data}", "--metrics", "accuracy,wobble"], "unknown metric 'wobble'"),
    (["--data", "{data}", "--grid", "integer:4..1"], "empty range"),
    (["--data", "{data}", "--class-map", "{tmp}/nomap.txt"], "--class-map"),
    (["--data", "{data}", "--class-map", "{tmp}/map.txt"], "not in --class-map"),
    (["--data", "{data}", "--plot", "{tmp}/no/such/dir/x.png"], "does not exist"),
])
def test_errors_are_one_line_naming_the_fix(tmp_path, capsys, args, message):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "map.txt").write_text("a\nb\n")
    data = image_folder(tmp_path / "d", {"coffee": 1})
    argv = ["eval", "convnext_atto", "--no-pretrained", "--num-classes", str(K)]
    argv += [a.format(tmp=tmp_path, data=data) for a in args]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and ("fix" in err or "use " in err), err


def test_missing_checkpoint_and_matplotlib(tmp_path, capsys, monkeypatch):
    data = image_folder(tmp_path / "d", {"coffee": 1})
    assert eval_cli.run([str(tmp_path / "nope.pt"), "--data", str(data)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert eval_cli.run(["convnext_atto", "--no-pretrained", "--data", str(data), "--plot", str(tmp_path / "p.png")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_interrupt_leaves_outputs_untouched(tmp_path, capsys, monkeypatch):
    data = image_folder(tmp_path / "d", {"coffee": 1})
    out = tmp_path / "res.json"
    out.write_text("previous run\n")

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(E, "evaluate_model", interrupted)
    rc = eval_cli.run(["convnext_atto", "--no-pretrained", "--num-classes", str(K), "--data", str(data),
                "--out", str(out), "--plot", str(tmp_path / "p.png")])
    assert rc == 130 and "interrupted" in capsys.readouterr().err
    assert out.read_text() == "previous run\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "res.json"]


def test_dense_models_get_the_per_output_equivariance(tmp_path, capsys):
    """A backbone (features_only) is evaluated on its own outputs: the converted one's diff is float rounding,
    the source's is not; the classification metrics are refused in one line."""
    data = image_folder(tmp_path / "data", {"chelsea": 0, "coffee": 1})
    built = afconvert.build("resnet18", pretrained=False, features_only=True, out_indices=(1, 2), input_size=(48, 48))
    afconvert.save(built.converted, tmp_path / "bb.pt")
    torch.save(built.source.state_dict(), tmp_path / "src.pt")
    argv = ["--data", str(data), "--metrics", "equivariance", "--grid", "equivariance:1x1,1/2x1/2,1/3x2/3"]
    rows = _run_json(capsys, [str(tmp_path / "bb.pt"), *argv])
    assert set(rows[0]["equivariance"]) == {"0", "1"} and max(rows[0]["equivariance"].values()) < 1e-4
    assert rows[0]["accuracy"] is None
    with torch.no_grad():
        x = torch.randn(2, 3, SIZE, SIZE)
        from afconvert.evaluation.metrics import output_equivariance
        source = output_equivariance(built.source.eval(), x, [(0.5, 0.5), (1 / 3, 2 / 3)])
    assert min(float(v.mean()) for v in source.values()) > 0.05
    assert eval_cli.run([str(tmp_path / "bb.pt"), "--data", str(data), "--no-progress"]) == 2
    assert "only the per-output equivariance metric applies; fix: --metrics equivariance" in capsys.readouterr().err
