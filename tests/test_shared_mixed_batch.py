"""A mixed batch of many single softmax heads shares its vocabulary-sized work (one pass over the vocabulary for all
rows, the small per-head steps head by head) and still gives each row what its head alone gives."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, build, randomize_heads
from peft import get_peft_model

from peft_backattn import BackAttnConfig
from peft_backattn.layer import BackAttnLayer

HEADS = {
    "a": BackAttnConfig(r=4),
    "b": BackAttnConfig(r=8),
    "c": BackAttnConfig(r=4, combine="replace"),
    "d": BackAttnConfig(r=4, combine="replace"),
    "raw": BackAttnConfig(r=4, logit_weighting="raw"),
    "mix": BackAttnConfig(r=4, num_heads=2),
}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    names = list(HEADS)
    model = get_peft_model(build(request.param), HEADS[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, HEADS[name])
    randomize_heads(model)
    return model.eval()


def alone(model, input_ids, name):
    if name == "__base__":
        with model.disable_adapter():
            return model(input_ids).logits
    model.set_adapter(name)
    return model(input_ids).logits


def test_each_row_equals_its_head_alone_and_the_group_shares_one_pass(model, monkeypatch):
    names = ["a", "b", "__base__", "c", "raw", "a", "mix", "d", "b"]
    input_ids = torch.randint(2, VOCAB, (len(names), 7), generator=torch.Generator().manual_seed(4))
    calls = []
    shared = BackAttnLayer._shared_forward
    monkeypatch.setattr(BackAttnLayer, "_shared_forward", lambda self, *a: calls.append(a[0]) or shared(self, *a))
    with torch.no_grad():
        mixed = model(input_ids, adapter_names=names).logits
        for i, name in enumerate(names):
            torch.testing.assert_close(mixed[i : i + 1], alone(model, input_ids[i : i + 1], name), msg=name)
    # residual a and b share one pass, replace c and d another; raw, the mixture and the base run on their own
    assert sorted(map(sorted, calls)) == [["a", "b"], ["c", "d"]]


def test_greedy_generation_of_many_heads_in_one_batch_equals_each_alone(model):
    names = ["a", "b", "c", "d", "a", "__base__"]
    input_ids = torch.randint(2, VOCAB, (len(names), 5), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=1)
    with torch.no_grad():
        together = model.generate(input_ids=input_ids, adapter_names=names, **kwargs)
        for i, name in enumerate(names):
            one = model.generate(input_ids=input_ids[i : i + 1], adapter_names=[name], **kwargs)
            assert torch.equal(together[i : i + 1], one), name


def test_a_head_that_needs_gradients_does_not_share(model):
    layer = next(m for m in model.modules() if isinstance(m, BackAttnLayer))
    with torch.no_grad():
        assert layer._sharing_key("a") == layer._sharing_key("b") is not None
        assert layer._sharing_key("raw") is None and layer._sharing_key("mix") is None
    head = layer.backattn_heads["a"]
    before = [p.requires_grad for p in head.parameters()]
    head.norm_scale.requires_grad_(True)
    try:
        with torch.enable_grad():
            assert layer._sharing_key("a") is None
    finally:
        for param, flag in zip(head.parameters(), before, strict=True):
            param.requires_grad_(flag)
