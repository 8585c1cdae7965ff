"""Block-wise reconstruction: the units are the blocks in forward order, each fit lowers its block's error
against the source block, the logits move towards the teacher's, and the certificate still holds."""
import pytest
import torch
from conftest import calibrate_norms_, randomize_

import afconvert
from afconvert.train.reconstruct import reconstruct, reconstruction_units


@pytest.fixture(scope="module")
def pair():
    import timm
    source = calibrate_norms_(randomize_(timm.create_model("test_efficientnet", num_classes=5)), (32, 32))
    return afconvert.convert(source, input_size=(32, 32)), source


def test_units_are_the_blocks_in_forward_order(pair):
    student, _ = pair
    units = reconstruction_units(student)
    assert units[:3] == ["conv_stem", "bn1", "blocks.0.0"] and units[-1] == "classifier"
    assert [u for u in units if u.startswith("blocks.")] == \
        [f"blocks.{i}.{j}" for i, stage in enumerate(student.blocks) for j in range(len(stage))]
    import timm
    resnet = reconstruction_units(timm.create_model("test_resnet"))
    assert resnet[-5:] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0", "fc"]
    assert "stages.0.blocks.0" in reconstruction_units(timm.create_model("test_convnext"))


def test_each_fit_lowers_its_error_and_keeps_the_certificate(pair, one_thread):
    import copy
    student, teacher = copy.deepcopy(pair[0]), pair[1]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(4)]
    held = torch.randn(16, 3, 32, 32, generator=g)
    with torch.no_grad():
        gap_before = (student.eval()(held) - teacher(held)).norm() / teacher(held).norm()
    rows = reconstruct(student, teacher, batches, steps=40, lr=1e-3, log=lambda m: None)
    assert [r["unit"] for r in rows] == reconstruction_units(student)
    assert all(r["after"] <= r["before"] for r in rows)
    assert sum(r["after"] for r in rows) < 0.9 * sum(r["before"] for r in rows)
    with torch.no_grad():
        gap_after = (student(held) - teacher(held)).norm() / teacher(held).norm()
    assert gap_after < gap_before                                                      # on images it never saw
    report = afconvert.audit(student, input_size=(32, 32), check=False)
    assert report.verdict.value == "exact"


def test_a_fit_that_would_hurt_keeps_the_weights(pair, one_thread):
    import copy
    student, teacher = copy.deepcopy(pair[0]), pair[1]
    before = {k: v.clone() for k, v in student.state_dict().items()}
    batches = [torch.randn(2, 3, 32, 32)]
    rows = reconstruct(student, teacher, batches, steps=3, lr=1e6, units=["blocks.0.0"], log=lambda m: None)
    assert rows[0]["kept"] and rows[0]["after"] == rows[0]["before"]
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_a_unit_called_twice_is_skipped_and_said():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, padding=1), torch.nn.Conv2d(2, 2, 1))

        def forward(self, x):
            return self.blocks[1](self.blocks[0](self.blocks[0](x)))
    torch.manual_seed(0)
    teacher, student = Twice(), Twice()
    logged = []
    rows = reconstruct(student, teacher, [torch.randn(2, 2, 8, 8)], steps=20, lr=1e-2, log=logged.append)
    assert [r["unit"] for r in rows] == ["blocks.1"] and rows[0]["after"] < rows[0]["before"]
    assert any("blocks.0: skipped" in m and "called 2 times" in m for m in logged)


def test_a_unit_whose_output_size_differs_from_its_source_is_skipped_and_said(one_thread):
    """afc-fullband moves the stem's down-sampling after its activation: the stem conv and norm put out twice
    the source's size. They are skipped with the sizes named; the blocks after them are fitted."""
    import timm
    source = calibrate_norms_(randomize_(timm.create_model("test_resnet", num_classes=5)), (28, 28))
    student = afconvert.convert(source, recipe="afc-fullband", input_size=(28, 28), check_numerics=False)
    logged = []
    rows = reconstruct(student, source, [torch.randn(4, 3, 28, 28)], steps=2, log=logged.append)
    skipped = [m for m in logged if "skipped (output" in m]
    assert skipped and all("its source's" in m for m in skipped)
    assert "fc" in [r["unit"] for r in rows]
