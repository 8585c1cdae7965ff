"""Key-name maps from third-party checkpoint layouts onto timm models."""
