"""Model names read from the installed packages' sources agree with the packages' own lists."""
import pytest

from afconvert.sources.names import ModelSourceError, check_name, registered_names


@pytest.mark.parametrize("library", ["timm", "torchvision"])
def test_scanned_names_are_the_registered_models(library):
    if library == "timm":
        import timm
        listed = set(timm.list_models())
    else:
        import torchvision
        listed = set(torchvision.models.list_models())
    scanned = registered_names(library)
    assert listed <= scanned and len(scanned - listed) < 300  # plus timm's deprecated aliases only


def test_check_name():
    assert check_name("resnet50") == ("timm", "resnet50")
    assert check_name("timm:convnext_tiny.fb_in1k") == ("timm", "convnext_tiny.fb_in1k")
    assert check_name("torchvision:resnet18") == ("torchvision", "resnet18")
    with pytest.raises(ModelSourceError, match="unknown timm model 'resnet5o': did you mean resnet50"):
        check_name("resnet5o")
    with pytest.raises(ModelSourceError, match="unknown model library 'keras'"):
        check_name("keras:resnet50")
