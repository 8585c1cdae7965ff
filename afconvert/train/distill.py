"""Knowledge distillation from the source model (Hinton et al., 2015).

loss = T^2 KL(softmax(t / T) || softmax(s / T)), averaged over the batch, for student logits s and
teacher logits t, (B, K) each. Rows where either is non-finite are left out of the loss: one inf would
make the whole step NaN (0 x inf); their count is returned so the caller can report it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd_loss", "agreement"]


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor | None, int]:
    """(loss over the finite rows, or None when there are none; number of rows left out)."""
    ok = torch.isfinite(student).all(1) & torch.isfinite(teacher).all(1)
    dropped = int((~ok).sum())
    if not ok.any():
        return None, dropped
    t = temperature
    log_p = F.log_softmax(student[ok].float() / t, dim=1)
    log_q = F.log_softmax(teacher[ok].float() / t, dim=1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * t * t, dropped


def agreement(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per row: the student's top-1 equals the teacher's (False where the student is non-finite)."""
    return (student.argmax(1) == teacher.argmax(1)) & torch.isfinite(student).all(1)
