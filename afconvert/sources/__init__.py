"""Where models and weights come from: timm/torchvision names and weight files (``models``),
adapters for the official AFC checkpoints (``official_afc``) and the EfficientNet-Lite0 package
(``efficientnet_lite0``), name + weights -> converted model (``pipeline``), and afconvert's own
self-describing checkpoints (``checkpoint``)."""
