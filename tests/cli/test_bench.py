"""`afconvert bench`: the original and the converted model side by side (inference and train step, table and JSON);
bad inputs refused in one line."""
import json

import pytest
import torch

from afconvert.cli import main


@pytest.mark.parametrize("mode", [[], ["--train"]], ids=["inference", "train"])
def test_bench_side_by_side(mode, capsys, one_thread):
    argv = ["bench", "test_convnext", "--input-size", "32", "48", "--batch-size", "2", "--min-time", "0.05", *mode]
    assert main([*argv, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["mode"] == ("train step" if mode else "inference") and res["input_size"] == [32, 48]
    for label in ("original", "converted"):
        r = res[label]
        assert r["ms_per_batch"] > 0 and r["peak_mb"] > 0
        assert r["images_per_s"] == pytest.approx(2 / r["ms_per_batch"] * 1e3)
    assert res["ratio"]["time"] == pytest.approx(res["converted"]["ms_per_batch"] / res["original"]["ms_per_batch"])
    assert res["products"] == "oneDNN"   # a CPU: the resampling products as 1x1 convolutions (the header says so)
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "ratio" in text and "ms/batch" in text and "peak MB" in text and "products: oneDNN" in text


def test_bench_bad_inputs_are_one_line(capsys):
    assert main(["bench", "convnext_tinny"]) == 2
    assert "convnext_tiny" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "test_convnext", "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "fix: --device cpu" in err
