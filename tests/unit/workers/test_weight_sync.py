"""The trainer's hand-off of a round's weights to the engines (workers.weight_sync): one
object per decoder layer, in state-dict order, each a CPU copy cut off from training."""

from __future__ import annotations

import torch

from workers.weight_sync import layer_groups, layer_of, nbytes


def test_a_parameter_belongs_to_its_decoder_layer_or_stands_alone():
    assert layer_of("model.layers.3.mlp.up_proj.weight") == "model.layers.3"
    assert layer_of("model.layers.12.self_attn.q_proj.bias") == "model.layers.12"
    assert layer_of("model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert layer_of("lm_head.weight") == "lm_head.weight"


def test_groups_keep_the_order_and_copy_every_tensor():
    live = torch.nn.Parameter(torch.ones(2, 3))
    weights = {"model.embed_tokens.weight": live,
               "model.layers.0.a.weight": torch.zeros(4), "model.layers.0.b.weight": torch.zeros(1),
               "model.layers.1.a.weight": torch.full((2,), 2.0),
               "model.norm.weight": torch.ones(5), "lm_head.weight": torch.ones(2, 2).t()}
    groups = list(layer_groups(weights))
    assert [[n for n, _ in g] for g in groups] == [
        ["model.embed_tokens.weight"], ["model.layers.0.a.weight", "model.layers.0.b.weight"],
        ["model.layers.1.a.weight"], ["model.norm.weight"], ["lm_head.weight"]]
    flat = [pair for g in groups for pair in g]
    assert all(torch.equal(t, weights[n]) and t.is_contiguous() and not t.requires_grad
               for n, t in flat)
    with torch.no_grad():
        live.add_(1.0)  # training goes on: the handed-off copy does not move
    assert torch.equal(flat[0][1], torch.ones(2, 3))
    assert nbytes(flat) == 4 * (6 + 4 + 1 + 2 + 5 + 4)
