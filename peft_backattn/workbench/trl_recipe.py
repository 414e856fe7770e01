"""Training a head with TRL's `SFTTrainer`: the versions that work, the settings they need, one-line refusals.

TRL computes the loss in two ways. Its default `loss_type="chunked_nll"` (TRL 1.10 and later) skips the output
layer's forward and multiplies the hidden states with `lm_head.weight` itself; a backattn head, which wraps that
layer, would be skipped. TRL 1.10 to 1.14 see the wrapped layer and refuse `chunked_nll`; `loss_type="nll"` runs the
model's own forward, head included, and trains it. TRL 1.15 and later refuse every PEFT adapter on `lm_head` in
`SFTTrainer.__init__`, whatever the loss, by design. So:

- `check_trl()` raises one line when the installed TRL is outside the working range (`TRL_RANGE`), naming it;
- `sft_config(...)` is TRL's `SFTConfig` with `loss_type="nll"` and completion-only loss (prompt-completion data);
- `sft_trainer(...)` checks both and builds the `SFTTrainer` with a `BackAttnConfig` as its `peft_config`.

TRL is the optional extra `peft-backattn[trl]`. Checkpoints and the saved head hold only the head's tensors.
"""

from __future__ import annotations

from typing import Any

from packaging.version import Version

from ..config import BackAttnConfig

try:
    import trl
    from trl import SFTConfig, SFTTrainer
except ImportError:  # the optional extra is not installed
    trl = SFTConfig = SFTTrainer = None

TRL_RANGE = ">=1.10,<1.15"
FIRST_WORKING, FIRST_REFUSING = Version("1.10"), Version("1.15")
INSTALL = f'pip install "peft-backattn[trl]" (TRL {TRL_RANGE})'


def installed_trl_version() -> str | None:
    """The installed TRL's version, or None when it is not installed."""
    return None if trl is None else trl.__version__


def check_trl(version: str | None = None) -> None:
    """Raise one line unless TRL `version` (default: the installed one) can train a backattn head."""
    version = version or installed_trl_version()
    if version is None:
        raise ImportError(f"TRL is not installed; {INSTALL}.")
    parsed = Version(version)
    if parsed >= FIRST_REFUSING:
        raise RuntimeError(
            f"TRL {version} refuses PEFT adapters on lm_head (it computes log-probabilities from lm_head.weight "
            f"directly, which would skip the head); backattn heads train with TRL {TRL_RANGE}: {INSTALL}."
        )
    if parsed < FIRST_WORKING:
        raise RuntimeError(f"TRL {version} is older than the tested range {TRL_RANGE}; {INSTALL}.")


def check_loss_type(loss_type: str | None) -> None:
    """Only `loss_type="nll"` runs the output layer's forward, and so the head."""
    if loss_type != "nll":
        raise ValueError(
            f"SFTConfig(loss_type={loss_type!r}) multiplies the hidden states with lm_head.weight itself and skips a "
            "backattn head; use loss_type='nll' (sft_config() sets it)."
        )


def sft_config(output_dir: str, **settings: Any) -> SFTConfig:
    """TRL's `SFTConfig` for a head: `loss_type="nll"`, loss on completions only, no reporting; `settings` override.

    Prompt-completion data (`{"prompt": ..., "completion": ...}` rows) trains on the completion tokens only
    (`completion_only_loss=True`); conversational data takes `assistant_only_loss=True` instead, with a chat
    template that marks the assistant turns with `{% generation %}`.
    """
    check_trl()
    arguments = {"loss_type": "nll", "completion_only_loss": True, "report_to": []} | settings
    check_loss_type(arguments["loss_type"])
    return SFTConfig(output_dir=output_dir, **arguments)


def sft_trainer(
    model: Any,
    args: SFTConfig,
    train_dataset: Any,
    processing_class: Any = None,
    peft_config: BackAttnConfig | None = None,
    **kwargs: Any,
) -> SFTTrainer:
    """TRL's `SFTTrainer` training a backattn head (a new `BackAttnConfig()` unless one is given) on a frozen base.

    `model` is a transformers model (or a hub name / folder, as TRL takes it), not yet a PeftModel: TRL attaches the
    head from `peft_config` itself.
    """
    check_trl()
    check_loss_type(args.loss_type)
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        processing_class=processing_class,
        peft_config=peft_config or BackAttnConfig(),
        **kwargs,
    )
