"""The trainer's hand-off of a round's weights to the engines (workers.weight_sync): one
object per decoder layer, in state-dict order, each tensor sent as the numpy array Ray
stores without pickling, and rebuilt bit for bit."""

from __future__ import annotations

import torch

from workers.weight_sync import from_wire, layer_groups, layer_of, nbytes, to_wire


def test_a_parameter_belongs_to_its_decoder_layer_or_stands_alone():
    assert layer_of("model.layers.3.mlp.up_proj.weight") == "model.layers.3"
    assert layer_of("model.layers.12.self_attn.q_proj.bias") == "model.layers.12"
    assert layer_of("model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert layer_of("lm_head.weight") == "lm_head.weight"


def test_groups_keep_the_order_and_give_detached_contiguous_cpu_tensors():
    weights = {"model.embed_tokens.weight": torch.nn.Parameter(torch.ones(2, 3)),
               "model.layers.0.a.weight": torch.zeros(4), "model.layers.0.b.weight": torch.zeros(1),
               "model.layers.1.a.weight": torch.full((2,), 2.0),
               "model.norm.weight": torch.ones(5), "lm_head.weight": torch.ones(2, 2).t()}
    groups = list(layer_groups(weights))
    assert [[n for n, _ in g] for g in groups] == [
        ["model.embed_tokens.weight"], ["model.layers.0.a.weight", "model.layers.0.b.weight"],
        ["model.layers.1.a.weight"], ["model.norm.weight"], ["lm_head.weight"]]
    flat = [pair for g in groups for pair in g]
    assert all(torch.equal(t, weights[n]) and t.is_contiguous() and not t.requires_grad
               and t.device.type == "cpu" for n, t in flat)
    assert nbytes(flat) == 4 * (6 + 4 + 1 + 2 + 5 + 4)


def test_every_dtype_comes_back_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = (torch.randn(3, 5, generator=g) * 1e3).to(dtype)
        x[0, 0] = float("nan")
        name, array = to_wire(x)
        stored = array.copy()  # the object store's copy, read-only as Ray hands it back
        stored.setflags(write=False)
        back = from_wire(name, stored)
        assert back.dtype == dtype and back.shape == x.shape
        assert torch.equal(back.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           x.view(torch.int16 if dtype != torch.float32 else torch.int32))
