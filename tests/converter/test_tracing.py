"""The tracer's parameter and buffer lookup (a map, once per trace) builds the very graph fx's own
linear search builds: same nodes, same get_attr targets, shared and functional uses included."""
import pytest
import timm
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from afconvert.converter.tracing import AFTracer


class _FxLookup(AFTracer):
    """The same leaves, fx's own getattr and create_arg."""
    getattr = fx.Tracer.getattr
    create_arg = fx.Tracer.create_arg


class Shared(nn.Module):
    """A parameter used by two modules, one used functionally, a buffer passed as an argument."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.b.weight = self.a.weight
        self.scale = nn.Parameter(torch.ones(1, 4, 1, 1))
        self.register_buffer("shift", torch.zeros(1, 4, 1, 1))

    def forward(self, x):
        y = F.conv2d(x, self.a.weight, self.b.bias, padding=1) + self.b(x)
        return torch.add(y * self.scale, self.shift)


def _graph(tracer: AFTracer, model: nn.Module) -> list[tuple]:
    return [(n.op, str(n.target), str(n.args), str(n.kwargs)) for n in tracer.trace(model).nodes]


@pytest.mark.parametrize("model", [Shared(), timm.create_model("test_convnext"),
                                   timm.create_model("densenet121", num_classes=3)],
                         ids=["shared", "convnext", "densenet"])
def test_lookup_builds_fx_graph(model):
    ours = _graph(AFTracer(), model)
    assert ours == _graph(_FxLookup(), model)
    assert sum(op == "get_attr" for op, *_ in ours) >= 2


def test_lookup_is_rebuilt_per_trace():
    tracer = AFTracer()
    first, second = Shared(), Shared()
    tracer.trace(first)
    gm = fx.GraphModule(second, tracer.trace(second))
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(gm(x), second(x))
