"""afconvert's conversion rules (installed as ``afconvert.rules``).

One module per layer family, each exporting ``RULES`` (see ``afconvert.converter.rule.Rule``), each
rule's docstring stating the maths; and recipes (``*.toml``) choosing the options per family.
"""
from afconvert.rules import activation, conv, norm, pool, structural, upsample

FAMILIES = (conv, activation, norm, pool, upsample, structural)  # in the order the engine tries their rules
