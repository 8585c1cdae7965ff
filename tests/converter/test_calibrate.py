"""BatchNorm statistics: ``match_batchnorm_statistics`` keeps the eval-mode function and makes training mode
(batch statistics) compute it too; a model whose statistics are not its inputs' fails the same check."""
import copy

import pytest
import torch
import torch.nn as nn

import afconvert
from afconvert.converter.calibrate import match_batchnorm_statistics


def _stale_net(dtype):
    """conv -> BN -> ReLU -> conv -> BN (affine) -> BN (no affine), with running statistics far from the data's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 3, padding=1),
                        nn.BatchNorm2d(5), nn.BatchNorm2d(5, affine=False)).to(dtype)
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-3, 3)
        bn.running_var.uniform_(0.1, 10)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    net[5].running_mean.zero_()
    net[5].running_var.fill_(1.0)
    return net.eval()


def _modes(net, x):
    """(eval-mode output, output with the affine BNs in training mode), on a copy: training mode moves the
    running statistics."""
    with torch.no_grad():
        ev = net.eval()(x)
        trained = copy.deepcopy(net)
        trained[1].train(), trained[4].train()    # the BN without weights keeps its running statistics
        return ev, trained(x)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_same_eval_function_and_training_mode_agrees(dtype, tol):
    net = _stale_net(dtype)
    x = torch.randn(6, 3, 7, 9, dtype=dtype) * 2 + 1
    before, train_before = _modes(net, x)
    assert (train_before - before).abs().max() > 0.5            # the check can fail: stale statistics
    state = {k: v.clone() for k, v in net[5].state_dict().items()}
    assert match_batchnorm_statistics(net, torch.split(x, 2)) == 2
    after, train_after = _modes(net, x)
    assert (after - before).abs().max() <= tol * before.abs().max()
    assert (train_after - after).abs().max() <= tol * after.abs().max()
    assert all(torch.equal(v, net[5].state_dict()[k]) for k, v in state.items())
    assert not net.training


def test_converted_model_stays_certified_with_the_same_outputs():
    model = afconvert.build("test_efficientnet", pretrained=False, input_size=(32, 32)).converted.eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    assert match_batchnorm_statistics(model, [x[:4], x[4:]]) > 0
    with torch.no_grad():
        after = model(x)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))
    assert afconvert.audit(model, input_size=(32, 32)).certified
