"""Every deployment runtime takes a converted model, over three families (timm's tiny test ResNet, EfficientNet
and ConvNeXt): ``torch.jit.trace`` + save / load (TorchScript: Triton's PyTorch backend, TorchServe),
``torch.export`` and torchvision's ``create_feature_extractor``; ``torch.jit.script`` is refused in one line that
names the runtimes that work. ONNX, over the same three families: tests/cli/test_export.py (through
``afconvert export``)."""
import pytest
import torch

import afconvert
from afconvert.converter.certify import relative_change
from afconvert.layers.spectral import fractional_shift

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")   # a trace is of one input size
SIZE = (32, 32)
FAMILIES = ["test_resnet", "test_efficientnet", "test_convnext"]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    import timm
    torch.manual_seed(0)
    source = timm.create_model(request.param, num_classes=10).eval()
    converted = afconvert.convert(source, input_size=SIZE, check_numerics=False).eval()
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    return source, converted, x


def _shift_error(model, x) -> float:
    """How far the logits move under a half- and third-pixel circular shift of the input (relative)."""
    with torch.no_grad():
        return relative_change(model(fractional_shift(x, 0.5, 1 / 3)), model(x))


def test_jit_trace_saved_and_loaded_matches_eager_and_stays_invariant(pair, tmp_path, one_thread):
    """The traced file equals eager (<= 1e-5) at the traced batch and another, and is shift-invariant to float32
    rounding, where the traced original moves by more than 1e-3."""
    source, converted, x = pair
    path = tmp_path / "model.ts"
    torch.jit.save(torch.jit.trace(converted, x), str(path))
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        for batch in (x, torch.cat([x, x.flip(0), x])):
            assert relative_change(loaded(batch), converted(batch)) <= 1e-5
    assert _shift_error(loaded, x) < 1e-5
    assert _shift_error(torch.jit.trace(source, x), x) > 1e-3


def test_jit_script_is_refused_in_one_line_naming_what_works(pair):
    with pytest.raises(RuntimeError) as err:
        torch.jit.script(pair[1])
    message = str(err.value)
    assert "\n" not in message.strip() and "torch.jit.trace" in message and "torch.export" in message, message


def test_torch_export_matches_eager_and_stays_invariant(pair, one_thread):
    _, converted, x = pair
    program = torch.export.export(converted, (x,)).module()
    with torch.no_grad():
        assert relative_change(program(x), converted(x)) <= 1e-5
    assert _shift_error(program, x) < 1e-5


def test_feature_extractor_gives_the_layers_outputs(pair, one_thread):
    """torchvision's create_feature_extractor traces a converted model (each alias-free layer one node): the
    logits and an inner alias-free layer's output, as eager computes them."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    _, converted, x = pair
    layers = [name for name, m in converted.named_modules() if type(m).__module__.startswith("afconvert.")]
    inner, nodes = layers[len(layers) // 2], get_graph_node_names(converted)[1]
    assert inner in nodes
    seen = {}
    hook = converted.get_submodule(inner).register_forward_hook(lambda m, i, o: seen.setdefault("inner", o))
    with torch.no_grad():
        ref = converted(x)
        hook.remove()
        out = create_feature_extractor(converted, {inner: "inner", nodes[-1]: "logits"})(x)
    assert torch.equal(out["logits"], ref) and torch.equal(out["inner"], seen["inner"])

