"""The converter: trace a model (``tracing``), find which dims are spatial (``layout``), match graph
nodes to rules (``rule``; the rules live in ``afconvert.rules``) as a recipe says (``recipe``), swap
modules (``engine``), re-estimate statistics (``calibrate``), and certify the result (``report``,
``certify``: the per-node verdicts, the numerics and the empirical shift checks)."""
