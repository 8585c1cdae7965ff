"""ONNX export (afconvert.export, `afconvert export`): the file runs in onnxruntime and gives the PyTorch
logits, at any batch size, for converted models of each family; the FFT form itself cannot be exported."""
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import afconvert  # noqa: E402
from afconvert.cli import main  # noqa: E402
from afconvert.export import export_onnx, onnx_max_rel_error  # noqa: E402
from afconvert.sources.models import create_source_model  # noqa: E402

SIZE = (32, 40)


@pytest.mark.parametrize("name", ["test_convnext", "test_resnet", "test_efficientnet"])
def test_onnx_round_trip_matches_pytorch(name, tmp_path, one_thread):
    source, _ = create_source_model(name, pretrained=False, num_classes=10)
    model = afconvert.convert(source, input_size=SIZE, check_numerics=False).eval()
    res = export_onnx(model, tmp_path / "m.onnx", SIZE)
    assert res.path.is_file() and res.max_rel_error < 1e-4, res
    # the batch dim is free: 3 images through a file traced with 2
    g = torch.Generator().manual_seed(1)
    assert onnx_max_rel_error(model, res.path, torch.randn(3, 3, *SIZE, generator=g)) < 1e-4
    # ... the size is not: the resampling matrices are the traced size's
    with pytest.raises(Exception):
        onnx_max_rel_error(model, res.path, torch.randn(2, 3, 48, 48, generator=g))


def test_cli_exports_a_checkpoint_atomically(tmp_path, capsys, one_thread):
    ckpt, out = tmp_path / "m.pt", tmp_path / "m.onnx"
    assert main(["test_resnet", "--no-pretrained", "--input-size", *map(str, SIZE), "--out", str(ckpt),
                 "--no-check"]) == 0
    capsys.readouterr()
    assert main(["export", str(ckpt), "--onnx", str(out), "--input-size", *map(str, SIZE)]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "onnxruntime matches PyTorch to" in text
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    # bad output path: refused before any work, one line
    assert main(["export", str(ckpt), "--onnx", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a directory" in err
