"""Fine-tuning of converted models (distillation from the source model) lands here; nothing yet."""
