"""Training a head with Hugging Face's Trainer: supervised fine-tuning with teacher forcing, head-only saves.

The Trainer does the work (optimiser, schedule, logging, checkpoints, resume, multi-process through `accelerate
launch`); this module only prepares the model and data for it and writes the final head.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import IterableDataset
from peft import PeftModel, get_peft_model
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import get_last_checkpoint

from ..config import BackAttnConfig
from ..model_card import record_card_details
from .data import PaddingCollator, TruncationReport, tokenize_examples, tokenize_stream
from .distributed import gathered_head
from .problems import MathExample


@dataclass
class TrainingOptions:
    """How to train a head: the one list of training options.

    The command line's `train` options are built from these fields (their defaults and help text; `flag` names
    the option where it differs from the field name), and `training_arguments()` maps them onto the Trainer's.
    """

    output_dir: str = field(metadata={"help": "folder for the head and its checkpoints", "flag": "--output"})
    max_steps: int = field(default=-1, metadata={"help": "optimiser steps; > 0 overrides --epochs", "flag": "--steps"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data"})
    batch_size: int = field(default=8, metadata={"help": "examples per step and process"})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "gradient accumulation steps", "flag": "--grad-accum"}
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate", "flag": "--lr"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(
        default=0.0, metadata={"help": "fraction of the steps with a linear warm-up; the rate is constant after it"}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm to this value"})
    max_length: int = field(default=256, metadata={"help": "tokens per example; longer examples are cut"})
    seed: int = field(default=0, metadata={"help": "seed of the data order, the head's initial weights and sampling"})
    logging_steps: int = field(default=10, metadata={"help": "log the loss every N steps"})
    save_steps: int = field(default=200, metadata={"help": "checkpoint every N steps"})
    save_total_limit: int | None = field(default=2, metadata={"help": "keep at most N checkpoints (None: all)"})
    time_budget_seconds: float | None = field(
        default=None, metadata={"help": "stop after this many seconds of training", "flag": "--time-budget"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace a head already in the output folder"})
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in the output folder"})
    progress_bar: bool = field(
        default=True, metadata={"help": "show a progress bar (else one line per logged step)", "flag": "--no-progress"}
    )
    save_final: bool = field(
        default=True,
        metadata={
            "help": "write the head to output_dir at the end (checkpoints are written regardless)",
            "flag": None,
        },
    )

    def training_arguments(self) -> TrainingArguments:
        """The Trainer's arguments for these options (head-only training on a frozen base, no reporting)."""
        return TrainingArguments(
            output_dir=self.output_dir,
            max_steps=self.max_steps,
            num_train_epochs=self.epochs,
            per_device_train_batch_size=self.batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            warmup_steps=self.warmup_ratio,  # a float below 1 is a fraction of the steps
            max_grad_norm=self.max_grad_norm,
            lr_scheduler_type="constant_with_warmup" if self.warmup_ratio else "constant",
            logging_steps=self.logging_steps,
            save_strategy="steps",
            save_steps=self.save_steps,
            save_total_limit=self.save_total_limit,
            seed=self.seed,
            data_seed=self.seed,
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=not self.progress_bar,
            remove_unused_columns=False,
            dataloader_num_workers=0,
        )


@dataclass
class TrainingReport:
    """What a training run did, for printing and for the demo's summary."""

    steps: int
    seconds: float
    final_loss: float | None
    first_loss: float | None
    truncation: TruncationReport
    head_dir: str
    processes: int = 1  # data-parallel processes (accelerate launch)
    losses: list[float] = field(default_factory=list)


class _LossPrinter(TrainerCallback):
    """One short line per logged step, in place of the progress bar (for logs and the demo)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            print(f"    step {state.global_step}: loss {float(logs['loss']):.4f}", flush=True)


class _TimeBudget(TrainerCallback):
    """Stops training once the wall-clock budget is spent (the demo trains for minutes, not for steps)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.start >= self.seconds:
            control.should_training_stop = True
        return control


def attach_head(
    base: PreTrainedModel, config: BackAttnConfig | None = None, adapter_name: str = "default"
) -> PeftModel:
    """The frozen base with a new, trainable backattn head (PEFT's `get_peft_model`)."""
    return get_peft_model(base, config or BackAttnConfig(), adapter_name=adapter_name)


def train_head(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[MathExample] | IterableDataset,
    options: TrainingOptions,
) -> TrainingReport:
    """Fine-tune the active head of `model` on `examples`; writes the head to `options.output_dir`.

    `examples` is a list of MathExamples, or a streamed `datasets.IterableDataset` of rows with their fields
    (`problem`, `solution`, `answer`; `data.stream_examples` makes one from a file or a hub dataset), which is
    tokenised as it is read and needs `max_steps > 0`; its truncation is counted as it streams and printed at the end.

    Checkpoints (head weights, optimiser and scheduler state) go to `output_dir/checkpoint-<step>`; the final head
    is written last, next to them, as `adapter_config.json` + `adapter_model.safetensors`.
    """
    output = Path(options.output_dir)
    if (output / "adapter_config.json").exists() and not (options.overwrite or options.resume):
        raise ValueError(f"{output} already holds a head; pass --overwrite, --resume or another --output.")
    if options.resume and not (Path(options.output_dir).is_dir() and get_last_checkpoint(options.output_dir)):
        raise ValueError(f"--resume: no checkpoint-* folder in {options.output_dir}; train without --resume first.")
    streamed = isinstance(examples, IterableDataset)
    if streamed and options.max_steps <= 0:
        raise ValueError("A streamed data set has no length to make epochs of; give --steps (max_steps > 0).")
    if streamed:  # tokenised a batch at a time as the Trainer reads it
        dataset, truncation = tokenize_stream(examples, tokenizer, options.max_length, options.batch_size)
    else:
        dataset, truncation = tokenize_examples(examples, tokenizer, options.max_length)
    print(f"Training data: {'streamed, counted as it is read' if streamed else truncation}", flush=True)

    arguments = options.training_arguments()
    callbacks = [_TimeBudget(options.time_budget_seconds)] if options.time_budget_seconds else []
    if not options.progress_bar:
        callbacks.append(_LossPrinter())
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=dataset,
        data_collator=PaddingCollator.from_tokenizer(tokenizer),
        callbacks=callbacks,
    )
    if not options.progress_bar:
        trainer.remove_callback(PrinterCallback)  # _LossPrinter prints instead of the raw log dictionaries
    start = time.monotonic()
    trainer.train(resume_from_checkpoint=True if options.resume else None)
    seconds = time.monotonic() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if streamed:
        print(f"Training data: {truncation}", flush=True)
    record_card_details(model, training=card_training_details(options, trainer, seconds, losses, truncation))
    with gathered_head(model):  # DeepSpeed ZeRO-3: every process helps gather the head's weights for the save
        if options.save_final and trainer.is_world_process_zero():
            save_head(model, options.output_dir)
    return TrainingReport(
        steps=trainer.state.global_step,
        seconds=seconds,
        final_loss=losses[-1] if losses else None,
        first_loss=losses[0] if losses else None,
        truncation=truncation,
        head_dir=options.output_dir,
        processes=trainer.args.world_size,
        losses=losses,
    )


def card_training_details(
    options: TrainingOptions, trainer: Trainer, seconds: float, losses: list[float], truncation: TruncationReport
) -> dict[str, object]:
    """The training run as the head's model card shows it (see `peft_backattn.model_card`)."""
    details: dict[str, object] = {
        "trainer": "transformers Trainer (peft_backattn.workbench.training.train_head)",
        "optimiser steps": trainer.state.global_step,
        "processes": trainer.args.world_size,
        "examples per step and process": options.batch_size,
        "gradient accumulation steps": options.gradient_accumulation_steps,
        "learning rate (AdamW)": options.learning_rate,
        "warm-up ratio": options.warmup_ratio,
        "weight decay": options.weight_decay,
        "max length (tokens)": options.max_length,
        "seed": options.seed,
        "training time (s)": round(seconds, 1),
        "examples read": truncation.total,
        "examples truncated / dropped": f"{truncation.truncated} / {truncation.dropped}",
    }
    if losses:
        details["training loss, first and last logged"] = f"{losses[0]:.4f} -> {losses[-1]:.4f}"
    return details


def save_head(model: PeftModel, directory: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Write one head (the active one by default) as `directory/adapter_{config.json,model.safetensors}`.

    PEFT puts heads not named 'default' into a sub-folder; this writes any head at the folder's top level, through
    a temporary folder and renames, so that a failed save leaves no half-written head.
    """
    name = adapter_name or model.active_adapter
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".saving-") as staging:
        model.save_pretrained(staging, selected_adapters=[name])
        written = Path(staging) if name == "default" else Path(staging) / name
        card = [] if name == "default" else [Path(staging) / "README.md"]  # PEFT writes the card at the top
        for item in [*written.iterdir(), *card]:
            if item.is_file():
                os.replace(item, directory / item.name)
