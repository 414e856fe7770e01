"""The method's names in PEFT: its `PeftType` value, its name for `register_peft_method`, its parameter prefix.

This module imports nothing: the config, the model and the workbench all name the method. The `PeftType` member
itself is added by `_peft_patches` (PEFT's enum is closed; that is a patch).
"""

PEFT_TYPE_NAME = "BACKATTN"
METHOD_NAME = "backattn"
PREFIX = "backattn_"
