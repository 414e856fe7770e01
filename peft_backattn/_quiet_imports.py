"""Imports PEFT with two known notices of bitsandbytes' kernel loading held back, so that `import peft_backattn`
is silent.

PEFT imports bitsandbytes when it is installed, and bitsandbytes then looks for an optional accelerated CPU kernel
on the Hugging Face hub (nothing fails without it). Without the `kernels` package it logs "Failed to load CPU
gemm_4bit_forward from kernels-community ..." (on CPUs with AVX512-BF16); with it (transformers 5.25 requires
`kernels`) and no hub access, `kernels` logs "Skipping publisher trust check for 'kernels-community/...' because
Hugging Face Hub is in offline mode." Both reach the user's stderr through logging's last-resort handler. Only
these two records are filtered, and only while this import runs; everything else either logger says, and anything
they log later, passes as before.
"""

from __future__ import annotations

import logging

_NOTICES = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "kernels._internals.hf_hub": "Skipping publisher trust check for 'kernels-community/",
}


def _filter(prefix: str):
    def not_the_notice(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(prefix)

    return not_the_notice


_filters = [(logging.getLogger(name), _filter(prefix)) for name, prefix in _NOTICES.items()]
for _logger, _not_the_notice in _filters:
    _logger.addFilter(_not_the_notice)
try:
    import peft  # noqa: E402, F401  (the import this module exists for)
finally:
    for _logger, _not_the_notice in _filters:
        _logger.removeFilter(_not_the_notice)
