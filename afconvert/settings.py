"""Every process-wide setting of afconvert, in one place: getters, setters and context managers.

=================  ==============================  ============================================================
setting            values                          what it chooses
=================  ==============================  ============================================================
``resample``       ``auto`` (default), ``fft``,    how ideal resampling and low-pass filters compute when a call
                   ``matmul``                      names no ``method``: per call by size, the FFT form, or the
                                                   dense real form A_0 X A_1^T (no complex numbers: ONNX export)
``products``       ``auto`` (default), ``onednn``, the CPU backend of the dense form's float32 products: 1 x 1
                   ``matmul``                      convolutions (oneDNN) where PyTorch has oneDNN, or
                                                   ``torch.matmul`` (MKL / OpenBLAS) throughout
=================  ==============================  ============================================================

Each setting's environment variable (``AFCONVERT_RESAMPLE``, ``AFCONVERT_PRODUCTS``) is read the first time
the setting is used, not at import; a bad value, from the environment or a setter, is refused in one line that
names the values allowed. ``set_*`` changes a setting for the process; ``using(...)`` for a block only.
Nothing here imports torch.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

__all__ = ["SettingError", "CHOICES", "ENVIRONMENT", "get", "set", "using", "resample_method", "set_resample_method",
           "products", "set_products"]

CHOICES = {"resample": ("auto", "fft", "matmul"), "products": ("auto", "onednn", "matmul")}
ENVIRONMENT = {"resample": "AFCONVERT_RESAMPLE", "products": "AFCONVERT_PRODUCTS"}
_VALUES: dict[str, str] = {}        # the settings used or set so far; the others come from the environment


class SettingError(ValueError):
    """A setting's value (from the environment or a call) that is not one of its choices."""


def _checked(name: str, value: str, origin: str) -> str:
    if name not in CHOICES:
        raise KeyError(f"unknown afconvert setting '{name}'; fix: one of {', '.join(CHOICES)}")
    value = str(value).strip().lower()
    if value not in CHOICES[name]:
        raise SettingError(f"{origin}: unknown value '{value}' for afconvert's '{name}' setting; "
                         f"fix: one of {', '.join(CHOICES[name])}")
    return value


def get(name: str) -> str:
    """The setting's value: set here, else the environment's (read now, once), else ``auto``."""
    value = _VALUES.get(name)
    if value is None:
        env = ENVIRONMENT.get(name)
        raw = os.environ.get(env, "auto") if env else "auto"
        value = _VALUES[name] = _checked(name, raw, f"{env}={raw!r}" if env else name)
    return value


def set(name: str, value: str) -> None:       # noqa: A001 (the module's verb, as in timm.layers.config)
    """Set a setting for the whole process."""
    _VALUES[name] = _checked(name, value, f"afconvert.settings.set('{name}', {value!r})")


@contextlib.contextmanager
def using(**values: str) -> Iterator[None]:
    """Within the block, the given settings (``using(resample="matmul")``); the old values after it."""
    checked = {k: _checked(k, v, f"afconvert.settings.using({k}={v!r})") for k, v in values.items()}
    old = {k: get(k) for k in checked}
    _VALUES.update(checked)
    try:
        yield
    finally:
        _VALUES.update(old)


def resample_method() -> str:
    """``resample``: "auto", "fft" or "matmul"."""
    return get("resample")


def set_resample_method(value: str) -> None:
    set("resample", value)


def products() -> str:
    """``products``: "auto", "onednn" or "matmul"."""
    return get("products")


def set_products(value: str) -> None:
    set("products", value)
