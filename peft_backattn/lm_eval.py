"""Score heads with lm-evaluation-harness: lm-eval's own command line, in a process that knows the method.

    peft-backattn lm-eval --model hf --model_args pretrained=BASE,peft=HEAD --tasks gsm8k_local ...
    python -m peft_backattn.lm_eval --model hf --model_args pretrained=BASE,peft=HEAD ...

Both take exactly lm-eval's arguments (`lm_eval --help`) and hand them to lm-eval's `cli_evaluate` unchanged, after
`import peft_backattn` has registered `backattn` with PEFT: lm-eval's `hf` model loads `peft=HEAD` with
`PeftModel.from_pretrained`, which needs the method registered in that process (a task module given with
`--include_path` is imported only after the model is built, too late). One argument is added: when none is given,
`--include_path` names the local-file tasks shipped with this package (`gsm8k_local`, see
`peft_backattn/lm_eval_tasks/`). lm-eval is the optional extra `peft-backattn[lm-eval]`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from . import _registration
from .lm_eval_tasks import TASKS_DIR

try:
    from lm_eval.__main__ import cli_evaluate
except ImportError:  # the optional extra is not installed
    cli_evaluate = None

MISSING = 'lm-eval is not installed; install it with: pip install "peft-backattn[lm-eval]" (lm-eval 0.4.13 is tested)'
COMMANDS = ("run", "ls", "validate")  # lm-eval's own subcommands; without one, lm-eval runs `run`


def lm_eval_arguments(argv: Sequence[str]) -> list[str]:
    """lm-eval's arguments as given, plus `--include_path` of the shipped tasks when none is given."""
    args = list(argv)
    given = any(arg == "--include_path" or arg.startswith("--include_path=") for arg in args)
    if given or not args or args[0] in ("-h", "--help") or args[0] in COMMANDS[1:]:
        return args
    return args + ["--include_path", str(TASKS_DIR)]


def main(argv: Sequence[str] | None = None) -> int:
    """Run lm-eval's command line with `argv` (default: this process's arguments) and the method registered."""
    if cli_evaluate is None:
        print(f"peft-backattn: error: {MISSING}", file=sys.stderr)
        return 2
    _registration.register()  # what `import peft_backattn` did already; explicit, since it is the point here
    args = lm_eval_arguments(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = ["lm-eval", *args]  # lm-eval's parser reads sys.argv itself
    try:
        cli_evaluate()
    except SystemExit as done:  # argparse's --help and errors
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
