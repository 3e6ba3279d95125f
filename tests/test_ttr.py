"""Test-time registers: the MLP description, neuron finding, the context manager."""

from __future__ import annotations

import torch

import itae


def test_mlp_sites_describe_every_block(tiny):
    backbone = itae.adapt(tiny)
    assert len(backbone.mlp_sites) == backbone.num_blocks
    x = torch.randn(2, 5, backbone.embed_dim)
    for site, parts in zip(backbone.mlp_sites, backbone.parts):
        assert site.mlp is parts.mlp
        seen = []
        handle = site.out_proj.register_forward_pre_hook(lambda _m, args, seen=seen: seen.append(args[0]))
        try:
            out = parts.mlp(x)
        finally:
            handle.remove()
        (hidden,) = seen
        assert hidden.shape == (2, 5, site.hidden_dim)
        # the hidden activation is all the MLP's output depends on: out_proj of it is the output
        torch.testing.assert_close(site.out_proj(hidden), out)
