"""Imports PEFT with one known notice of bitsandbytes held back, so that `import peft_backattn` is silent.

PEFT imports bitsandbytes when it is installed. On CPUs with AVX512-BF16, bitsandbytes then logs "Failed to load
CPU gemm_4bit_forward from kernels-community ..." (an optional accelerated kernel; nothing fails), which reaches
the user's stderr through logging's last-resort handler. Only that record is filtered, and only while this import
runs; everything else bitsandbytes logs, and anything it logs later, passes as before.
"""

from __future__ import annotations

import logging

_NOISY_LOGGER = "bitsandbytes.backends.cpu.ops"
_NOISY_PREFIX = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_the_kernel_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_NOISY_PREFIX)


_logger = logging.getLogger(_NOISY_LOGGER)
_logger.addFilter(_not_the_kernel_notice)
try:
    import peft  # noqa: E402, F401  (the import this module exists for)
finally:
    _logger.removeFilter(_not_the_kernel_notice)
