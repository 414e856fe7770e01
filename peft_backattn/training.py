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

from .config import BackAttnConfig
from .data import MathExample, PaddingCollator, TruncationReport, tokenize_examples


@dataclass
class TrainingOptions:
    """How to train a head. The command line's `train` options set most of these fields; weight_decay,
    warmup_ratio, max_grad_norm and save_total_limit are for the Python API."""

    output_dir: str
    max_steps: int = -1  # > 0 overrides epochs
    epochs: float = 1.0
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 256
    seed: int = 0
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int | None = 2
    time_budget_seconds: float | None = None  # stop after this much training time (checked after each step)
    resume: bool = False
    progress_bar: bool = True
    save_final: bool = True  # write the head to output_dir at the end (checkpoints are written regardless)


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
    examples: Sequence[MathExample],
    options: TrainingOptions,
) -> TrainingReport:
    """Fine-tune the active head of `model` on `examples`; writes the head to `options.output_dir`.

    Checkpoints (head weights, optimiser and scheduler state) go to `output_dir/checkpoint-<step>`; the final head
    is written last, next to them, as `adapter_config.json` + `adapter_model.safetensors`.
    """
    if options.resume and not (Path(options.output_dir).is_dir() and get_last_checkpoint(options.output_dir)):
        raise ValueError(f"--resume: no checkpoint-* folder in {options.output_dir}; train without --resume first.")
    dataset, truncation = tokenize_examples(examples, tokenizer, options.max_length)
    print(f"Training data: {truncation}", flush=True)

    arguments = TrainingArguments(
        output_dir=options.output_dir,
        max_steps=options.max_steps,
        num_train_epochs=options.epochs,
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        learning_rate=options.learning_rate,
        weight_decay=options.weight_decay,
        warmup_steps=options.warmup_ratio,  # a float below 1 is a fraction of the steps
        max_grad_norm=options.max_grad_norm,
        lr_scheduler_type="constant_with_warmup" if options.warmup_ratio else "constant",
        logging_steps=options.logging_steps,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        seed=options.seed,
        data_seed=options.seed,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not options.progress_bar,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
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
    if options.save_final and trainer.is_world_process_zero():
        save_head(model, options.output_dir)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
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
        for item in written.iterdir():
            if item.is_file():
                os.replace(item, directory / item.name)
