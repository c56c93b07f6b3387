"""The denoisers: the seed's CNN and the small U-Net, built from params.yaml's net section."""

from __future__ import annotations

import pytest
import torch
import yaml

from diffusion.network import DenoiserCNN, UNet, make_network
from tests.helpers import REPO

NET = yaml.safe_load((REPO / "params.yaml").read_text())["net"]


def parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_make_network_builds_the_seed_cnn_by_default_and_the_unet_on_request():
    assert NET["kind"] == "cnn"
    cnn = make_network(NET)
    assert isinstance(cnn, DenoiserCNN) and parameters(cnn) == parameters(DenoiserCNN())
    unet = make_network({**NET, "kind": "unet"})
    assert isinstance(unet, UNet)
    assert 1_000_000 <= parameters(unet) <= 2_000_000  # the defaults: [48, 96], 1 block, attention
    assert isinstance(make_network({"hidden": [4], "activation": "gelu"}), DenoiserCNN)  # old files
    with pytest.raises(ValueError, match="unknown network 'resnet'"):
        make_network({**NET, "kind": "resnet"})


@pytest.mark.parametrize("channels, blocks, attention", [((16, 32), 1, True), ((8, 16), 2, False),
                                                         ((8, 16, 24), 1, True), ((8, 8, 16), 2, False)])
def test_unet_maps_a_batch_to_its_shape_and_learns_through_every_block(channels, blocks, attention):
    torch.manual_seed(0)
    net = UNet(channels, blocks, attention, "silu")
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([0.0, 0.5, 1.0])
    out = net(x, t)
    assert out.shape == (3, 1, 28, 28) and torch.equal(out, torch.zeros_like(out))  # zero head
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3):
        loss = ((net(x, t) - x) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters()), \
        [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    after = net(x, t)
    assert not torch.allclose(after[0], after[2])  # the timestep changes the prediction


def test_unet_attention_is_self_attention_over_pixels():
    torch.manual_seed(0)
    with_attention = UNet((8, 16), 1, True, "gelu")
    assert sum(isinstance(m, torch.nn.Conv2d) and m.out_channels == 48 for m in with_attention.modules()) == 1
    assert parameters(with_attention) > parameters(UNet((8, 16), 1, False, "gelu"))


def test_three_widths_add_a_7x7_level_and_attention_sits_at_the_lowest_resolution():
    torch.manual_seed(0)
    net = UNet((8, 16, 24), 1, True, "silu")
    assert len(net.down) == len(net.up) == 3 and len(net.downsample) == len(net.upsample) == 2
    sizes = []
    net.attention.register_forward_hook(lambda module, inputs, output: sizes.append(output.shape))
    net(torch.randn(2, 1, 28, 28), torch.tensor([0.1, 0.9]))
    assert sizes == [(2, 24, 7, 7)]
    with pytest.raises(ValueError, match="two or three widths"):
        UNet((8,), 1, False, "silu")
