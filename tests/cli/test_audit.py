"""`afconvert audit`: the report as JSON, of a model by name and of a converted checkpoint; `afconvert recipes`
(checked with the first) lists the shipped recipes."""
import json

from afconvert.cli import main


def test_audit_json_and_recipes(tmp_path, capsys):
    assert main(["audit", "convnext_atto", "--no-pretrained", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "not alias-free" and report["checks"][0]["models"]["model"]
    assert main(["recipes"]) == 0
    assert "afc-paper" in capsys.readouterr().out


def test_torchvision_model_and_audit_of_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "tv.pt"
    assert main(["torchvision:resnet18", "--no-pretrained", "--num-classes", "4", "--input-size", "64", "64", "--out",
                 str(out), "--no-check"]) == 0
    assert "verdict: certified" in capsys.readouterr().out
    assert main(["audit", str(out), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "exact" and max(report["checks"][0]["models"]["model"].values()) < 1e-4  # float32
