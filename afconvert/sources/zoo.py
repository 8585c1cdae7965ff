"""The model zoo that ``tests/converter/test_models.py`` tests and ``examples/stability.py`` measures:
common timm and torchvision families, by name."""

ZOO = (
    "timm:resnet18", "timm:resnet50", "timm:resnet18d", "timm:resnext50_32x4d", "timm:seresnet50",
    "timm:efficientnet_b0", "timm:efficientnet_lite0", "timm:mobilenetv2_100", "timm:mobilenetv3_large_100",
    "timm:regnety_002", "timm:convnext_tiny", "timm:convnextv2_atto", "timm:densenet121", "timm:ghostnet_100",
    "timm:repvgg_a0", "timm:tf_efficientnet_lite0",
    "torchvision:resnet18", "torchvision:mobilenet_v3_small", "torchvision:efficientnet_b0",
    "torchvision:convnext_tiny", "torchvision:regnet_y_400mf",
)

# ten further timm families, numerically hard for polynomial activations (see docs/models.md): checked for
# finite, bounded converted logits at their default initialisation
MORE = (
    "timm:dpn68", "timm:hrnet_w18_small", "timm:rexnet_100", "timm:semnasnet_100", "timm:tinynet_a",
    "timm:fbnetc_100", "timm:gernet_s", "timm:res2net50_26w_4s", "timm:mixnet_s", "timm:lcnet_050",
)
