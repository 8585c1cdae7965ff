"""`afconvert export`: a converted checkpoint to ONNX, written atomically, checked against PyTorch; a bad output
path refused before any work, in one line."""
import afconvert
from afconvert.cli import main
from afconvert.sources.models import create_source_model

SIZE = (32, 40)


def test_cli_exports_a_checkpoint_atomically(tmp_path, capsys, one_thread, onnx_tools):
    ckpt, out = tmp_path / "m.pt", tmp_path / "m.onnx"
    source, _ = create_source_model("test_efficientnet", pretrained=False, num_classes=10)
    afconvert.save(afconvert.convert(source, input_size=SIZE, check_numerics=False), ckpt)
    assert main(["export", str(ckpt), "--onnx", str(out), "--input-size", *map(str, SIZE), "--batch-size", "3"]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "onnxruntime matches PyTorch to" in text and f"(3, 3, {SIZE[0]}, {SIZE[1]})" in text
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    # bad output path: refused before any work, one line
    assert main(["export", str(ckpt), "--onnx", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a directory" in err
