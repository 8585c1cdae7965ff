"""`afconvert export`: a converted checkpoint to ONNX, written atomically, checked in onnxruntime against PyTorch
(<= 1e-4 of the largest logit) over three families (the ONNX test of tests/test_runtimes.py's runtimes); a bad
output path refused before any work, in one line."""
import pytest

import afconvert
from afconvert.cli import main
from afconvert.sources.models import create_source_model

SIZE = (32, 40)


@pytest.mark.parametrize("family", ["test_resnet", "test_efficientnet", "test_convnext"])
def test_cli_exports_a_checkpoint_atomically(family, tmp_path, capsys, one_thread, onnx_tools):
    ckpt, out = tmp_path / "m.pt", tmp_path / "m.onnx"
    source, _ = create_source_model(family, pretrained=False, num_classes=10)
    afconvert.save(afconvert.convert(source, input_size=SIZE, check_numerics=False), ckpt)
    assert main(["export", str(ckpt), "--onnx", str(out), "--input-size", *map(str, SIZE), "--batch-size", "3"]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and f"(3, 3, {SIZE[0]}, {SIZE[1]})" in text
    assert float(text.split("onnxruntime matches PyTorch to ")[1].split()[0]) <= 1e-4, text
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    # bad output path: refused before any work, one line
    assert main(["export", str(ckpt), "--onnx", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a directory" in err
