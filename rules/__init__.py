"""afconvert's conversion rules (installed as ``afconvert.rules``).

One module per layer family, each exporting ``RULES`` (see ``afconvert.converter.rule.Rule``), each
rule's docstring stating the maths; and recipes (``*.toml``) choosing the options per family.
"""
FAMILIES = ("conv", "activation", "norm", "pool", "upsample", "structural")
