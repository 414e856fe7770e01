"""Backward-attention output heads for frozen causal language models, as a PEFT method.

`import peft_backattn` registers the method `backattn` with PEFT, after which `get_peft_model(model,
BackAttnConfig())`, `PeftModel.from_pretrained` and `load_adapter` know it. It loads the method only: the math-head
workbench (`peft_backattn.workbench`) and the command line (`peft_backattn.cli`) are imported on demand.
"""

from . import _quiet_imports  # noqa: F401  (first: imports PEFT without bitsandbytes' import-time notice)
from ._registration import register as _register
from .config import BackAttnConfig
from .head import BackAttnHead
from .layer import BackAttnLayer
from .model import BackAttnModel
from .reference import reference_logits

__all__ = ["BackAttnConfig", "BackAttnHead", "BackAttnLayer", "BackAttnModel", "reference_logits"]
__version__ = "0.1.0"

_register()
