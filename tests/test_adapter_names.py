"""`adapter_names=[...]`: one name per sample; repeated only where generate() repeats samples (beams, returned
sequences), refused otherwise, as LoRA does."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, build, randomize_heads
from peft import get_peft_model
from transformers import GenerationConfig

from peft_backattn import BackAttnConfig


@pytest.fixture(scope="module")
def model():
    model = get_peft_model(build("gpt2"), BackAttnConfig(r=4, logit_weighting="raw"), adapter_name="math")
    model.add_adapter("code", BackAttnConfig(r=4, num_heads=2))
    randomize_heads(model)
    return model.eval()


@pytest.fixture
def prompts() -> torch.Tensor:
    return torch.randint(2, VOCAB, (4, 6), generator=torch.Generator().manual_seed(3))


def generate(model, input_ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=input_ids, max_new_tokens=3, min_new_tokens=3, pad_token_id=1, **kwargs)


@pytest.mark.parametrize("names", [["math", "code"], ["math"], ["math", "code", "math", "code", "math"]])
def test_a_plain_forward_needs_one_name_per_sample(model, prompts, names):
    message = rf"^adapter_names has {len(names)} entries but the batch has 4 samples; pass one name per sample\.$"
    with pytest.raises(ValueError, match=message):
        model(input_ids=prompts, adapter_names=names)


def test_generate_without_repeats_needs_one_name_per_prompt(model, prompts):
    with pytest.raises(ValueError, match=r"adapter_names has 2 entries but the batch has 4 samples"):
        generate(model, prompts, adapter_names=["math", "code"], do_sample=False)


@pytest.mark.parametrize(
    "kwargs, repeat",
    [
        (dict(num_beams=3, do_sample=False), 3),
        (dict(num_beams=3, num_return_sequences=2, do_sample=False), 3),
        (dict(do_sample=True, num_return_sequences=2, top_k=1), 2),
        (dict(generation_config=GenerationConfig(num_beams=2, do_sample=False)), 2),
    ],
    ids=["beams", "beams-and-returned", "sampled-returned", "generation-config"],
)
def test_generate_repeats_names_with_its_samples(model, prompts, kwargs, repeat):
    names = ["code", "__base__", "math", "code"]
    mixed = generate(model, prompts, adapter_names=names, **kwargs)
    per_prompt = mixed.shape[0] // len(names)
    assert per_prompt == (2 if "num_return_sequences" in kwargs else 1)
    for i, name in enumerate(names):
        alone = generate(model, prompts[i : i + 1], adapter_names=[name], **kwargs)
        assert torch.equal(mixed[i * per_prompt : (i + 1) * per_prompt], alone), name
    # one name short is refused, naming the repeat
    message = rf"adapter_names has 3 entries, repeated {repeat} times by generate\(\), but the batch has {4 * repeat}"
    with pytest.raises(ValueError, match=message):
        generate(model, prompts, adapter_names=names[:3], **kwargs)


@pytest.mark.parametrize(
    "names, message",
    [
        ("math", r"adapter_names must be a list with one head name per sample, got the string 'math'"),
        (("math", 3, "code", "math"), r"adapter_names\[1\] is 3 \(int\); adapter_names holds head names"),
        (["math", None, "code", "math"], r"adapter_names\[1\] is None \(NoneType\); adapter_names holds head names"),
        ({"math": 1}, r"adapter_names must be a list with one head name per sample, got dict"),
    ],
)
def test_adapter_names_of_the_wrong_type(model, prompts, names, message):
    for call in (
        lambda: model(input_ids=prompts, adapter_names=names),
        lambda: generate(model, prompts, adapter_names=names),
    ):
        with pytest.raises(TypeError, match=message) as error:
            call()
        assert "\n" not in str(error.value)
