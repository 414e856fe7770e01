"""What training on several processes needs beyond the Trainer: the head's full weights for the final save.

Under DeepSpeed ZeRO-3 every parameter above DeepSpeed's persistence threshold (`stage3_param_persistence_threshold`,
100,000 elements by default) is partitioned across the processes: each holds a slice, and the module's tensor is
empty. The Trainer's own checkpoints gather the whole model (with `zero3_save_16bit_model: true`); the final
`save_head` runs on the main process only and would write empty tensors for a large head. `gathered_head` gathers
the head's parameters, and nothing else, on every process for the duration of the save.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from peft import PeftModel

from .._peft_type import PREFIX


def head_parameters(model: PeftModel) -> list:
    """The parameters of every backattn head of `model` (the `backattn_heads` containers)."""
    return [param for name, param in model.named_parameters() if f".{PREFIX}heads." in name]


@contextmanager
def gathered_head(model: PeftModel) -> Iterator[None]:
    """The heads' full weights on every process inside the block, under ZeRO-3; a no-op otherwise.

    DeepSpeed marks a ZeRO-3 parameter with `ds_id` and gives it `all_gather` / `partition`, which is what
    `deepspeed.zero.GatheredParameters` calls (read-only use: nothing is written back). Every process must enter
    the block, since gathering is collective; save on the main process inside it.
    """
    partitioned = [param for param in head_parameters(model) if hasattr(param, "ds_id")]
    if not partitioned:
        yield
        return
    partitioned[0].all_gather(param_list=partitioned)
    try:
        yield
    finally:
        partitioned[0].partition(param_list=partitioned, has_been_updated=False)
