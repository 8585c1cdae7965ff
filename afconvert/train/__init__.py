"""Fine-tuning converted models: distillation from the source model (``distill``) in a training loop
that follows timm's conventions and runs on one CPU up to many GPUs with ``torchrun`` (``finetune``)."""
