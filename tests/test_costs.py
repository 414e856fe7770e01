"""The cost formulas against torch's own FLOP counter and the real parameter count."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import build
from peft import get_peft_model
from torch.utils.flop_counter import FlopCounterMode

from peft_backattn import BackAttnConfig, BackAttnLayer
from peft_backattn.costs import head_backward_flops, head_forward_flops, trainable_parameters

CONFIGS = [
    dict(logit_weighting=w, combine=c, num_heads=h, query_activation=a)
    for w, c, h, a in itertools.product(("raw", "softmax"), ("replace", "residual"), (1, 2), (None, "silu"))
]


def attached(arch: str, **kwargs) -> BackAttnLayer:
    model = get_peft_model(build(arch), BackAttnConfig(r=8, init_weights=False, **kwargs))
    return next(m for m in model.modules() if isinstance(m, BackAttnLayer))


def _in_place_addmm_flops(input_shape, mat1_shape, mat2_shape, *args, out_shape=None, **kwargs) -> int:
    """torch's counter knows addmm but not its in-place form addmm_, which the residual head uses."""
    return 2 * mat1_shape[0] * mat1_shape[1] * mat2_shape[1]


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _in_place_addmm_flops}) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda k: "-".join(str(v) for v in k.values()))
def test_forward_formula_matches_the_counted_flops(kwargs):
    layer = attached("opt", **kwargs)  # d_in = 32 differs from d_e = 16
    tokens = 10
    hidden = torch.randn(1, tokens, layer.in_features)
    vocab, d_e = layer.embedding_weight.shape
    config = layer.backattn_heads["default"].config
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            layer(hidden)  # warm the caches of frozen tensors
            measured = counted_flops(lambda: layer(hidden)) / tokens
        collapsed = config.is_linear and not grad
        formula = head_forward_flops(config, vocab, layer.in_features, d_e, collapsed=collapsed)
        assert measured == formula.total, (grad, measured, formula)


@pytest.mark.parametrize("kwargs", CONFIGS[::3], ids=lambda k: "-".join(str(v) for v in k.values()))
def test_backward_formula_matches_the_counted_flops(kwargs):
    layer = attached("llama", **kwargs)
    tokens = 6
    hidden = torch.randn(1, tokens, layer.in_features)
    vocab, d_e = layer.embedding_weight.shape
    config = layer.backattn_heads["default"].config
    layer(hidden)
    out = layer(hidden)
    measured = counted_flops(lambda: out.sum().backward()) / tokens
    assert measured == head_backward_flops(config, vocab, layer.in_features, d_e)


@pytest.mark.parametrize("kwargs", [dict(num_heads=1), dict(num_heads=3), dict(r=5, num_heads=2)])
def test_parameter_formula_matches_the_model(kwargs):
    kwargs.setdefault("r", 8)
    model = get_peft_model(build("opt"), BackAttnConfig(**kwargs))
    counted, _ = model.get_nb_trainable_parameters()
    assert counted == trainable_parameters(model.peft_config["default"], embedding=16)
