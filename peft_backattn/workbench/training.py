"""Training a head with Hugging Face's Trainer: supervised fine-tuning with teacher forcing, head-only saves.

The Trainer does the work (optimiser, schedule, logging, checkpoints, resume, multi-process through `accelerate
launch`); this module only prepares the model and data for it and writes the final head.
"""

from __future__ import annotations

import math
import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from datasets import IterableDataset
from peft import PeftModel, get_peft_model
from safetensors import SafetensorError
from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_callback import PrinterCallback

from ..config import BackAttnConfig
from ..model_card import record_card_details
from ..validation import (
    Check,
    check_fields,
    fraction,
    is_integer,
    non_negative_number,
    option_name,
    path_like,
    positive_int,
    positive_number,
    seed_int,
    true_or_false,
)
from .base_models import fit_length
from .data import PaddingCollator, TruncationReport, tokenize_examples, tokenize_stream
from .distributed import gathered_head
from .features import (
    CachedFeatures,
    FeatureCacheStamp,
    cache_features,
    check_feature_folder,
    checkpoint_features,
    feature_fingerprint,
    fingerprint_digest,
    head_layer,
)
from .problems import MathExample
from .progress import Progress, is_terminal
from .saving import (
    FILE_ERRORS,
    FileReadError,
    FileWriteError,
    check_writable,
    checkpoints_newest_first,
    clean_leftovers,
    first_missing_folder,
    newest_complete_checkpoint,
    remove_empty_folders,
    remove_path,
    save_head,
    unwritten_checkpoint_file,
)
from .scored_positions import KL_TO_BASE_WEIGHT, ScoredPositionsTrainer, check_kl_to_base

MAX_LENGTH = 256  # tokens per example where `max_length` is not given (fewer on a base that takes fewer)


@dataclass
class TrainingOptions:
    """How to train a head: the one list of training options.

    The command line's `train` options are built from these fields (their defaults, help text and checks; `flag`
    names the option where it differs from the field name), and `training_arguments()` maps them onto the Trainer's.
    """

    output_dir: str = field(
        metadata={
            "help": "folder for the head and its checkpoints",
            "flag": "--output",
            "check": path_like.saying("a folder"),
        }
    )
    max_steps: int = field(
        default=-1,
        metadata={
            "help": "optimiser steps; > 0 overrides --epochs",
            "flag": "--steps",
            "check": Check(
                "a positive integer, or -1 to train for --epochs",
                lambda value: is_integer(value) and (value > 0 or value == -1),
            ),
        },
    )
    epochs: float = field(default=1.0, metadata={"help": "passes over the data", "check": non_negative_number})
    batch_size: int = field(default=8, metadata={"help": "examples per step and process", "check": positive_int})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "gradient accumulation steps", "flag": "--grad-accum", "check": positive_int}
    )
    learning_rate: float = field(
        default=1e-3, metadata={"help": "AdamW learning rate", "flag": "--lr", "check": positive_number}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay", "check": non_negative_number})
    warmup_ratio: float = field(
        default=0.0,
        metadata={
            "help": "fraction of the steps with a linear warm-up; the rate is constant after it",
            "check": fraction.saying("a fraction of the steps, at least 0 and below 1"),
        },
    )
    max_grad_norm: float = field(
        default=1.0,
        metadata={
            "help": "clip the gradient norm to this value",
            "check": non_negative_number.saying("a finite number >= 0 (0: no clipping)"),
        },
    )
    kl_to_base: float = field(
        default=0.0,
        metadata={
            "help": "weight of a KL term toward the frozen base: the loss is the cross-entropy + this x KL(base || "
            "head) at the trained positions, which keeps the head's next-token distribution near the base's; use it "
            "when the head must not lose what the base does well on data unlike the training data (a backattn head "
            "only; one more vocabulary product per trained position; 0: off)",
            "check": KL_TO_BASE_WEIGHT,
        },
    )
    max_length: int | None = field(
        default=None,
        metadata={
            "help": f"tokens per example; longer examples are cut (default: {MAX_LENGTH}, or the base's positions "
            "where it takes fewer)",
            "check": positive_int.or_none("a positive integer, or None for the default"),
        },
    )
    seed: int = field(
        default=0,
        metadata={"help": "seed of the data order, the head's initial weights and sampling", "check": seed_int},
    )
    logging_steps: int = field(default=10, metadata={"help": "log the loss every N steps", "check": positive_int})
    save_steps: int = field(default=200, metadata={"help": "checkpoint every N steps", "check": positive_int})
    save_total_limit: int | None = field(
        default=2,
        metadata={
            "help": "keep at most N checkpoints (None: all)",
            "check": positive_int.or_none("a positive integer, or None to keep all"),
        },
    )
    time_budget_seconds: float | None = field(
        default=None,
        metadata={
            "help": "stop after this many seconds of training",
            "flag": "--time-budget",
            "check": positive_number.or_none("a positive number of seconds, or None"),
        },
    )
    feature_cache: str | None = field(
        default=None,
        metadata={
            "help": "folder for cached features: the base runs once over the data (or a cache there for the same "
            "base, data, --max-length and tokenizer is reused) and every epoch trains the head alone on its hidden "
            "states at the trained positions; a step then takes --batch-size examples' worth of positions",
            "check": path_like.or_none("a folder, or None"),
        },
    )
    overwrite: bool = field(
        default=False, metadata={"help": "replace a head already in the output folder", "check": true_or_false}
    )
    resume: bool = field(
        default=False,
        metadata={"help": "continue from the last checkpoint in the output folder", "check": true_or_false},
    )
    progress_bar: bool = field(
        default=True,
        metadata={
            "help": "show progress: the Trainer's bar on a terminal, a line a minute in a log (else one line per "
            "logged step)",
            "flag": "--no-progress",
            "check": true_or_false,
        },
    )
    repeat_stream: bool = field(
        default=False,
        metadata={
            "help": "with --streaming: when the data ends before --steps, start it again from its first row (without "
            "it, training stops at the end of the data and says so)",
            "check": true_or_false,
        },
    )
    save_final: bool = field(
        default=True,
        metadata={
            "help": "write the head to output_dir at the end (checkpoints are written regardless)",
            "flag": None,
            "check": true_or_false,
        },
    )

    def __post_init__(self) -> None:
        """Refuse a value the Trainer would fail on late (a traceback after the model is loaded) or misread silently.

        Each message names the command-line option and the field, e.g. `--grad-accum (gradient_accumulation_steps)
        must be a positive integer, got 0.`
        """
        check_fields(self)
        if self.max_steps == -1 and self.epochs == 0:
            raise ValueError(
                "--epochs (epochs) is 0 and --steps (max_steps) is -1, so nothing would be trained; "
                "pass a positive --epochs or --steps."
            )

    def for_base(self, config: PretrainedConfig, say: bool = True) -> TrainingOptions:
        """These options with `max_length` for the base (`fit_length`): given, it is refused beyond the base's
        positions (and the options come back as they are); None becomes MAX_LENGTH tokens, or the base's positions
        where it takes fewer (`say` says so)."""
        max_length = fit_length(config, self.max_length, MAX_LENGTH, option_name(TrainingOptions, "max_length"), say)
        return self if max_length == self.max_length else replace(self, max_length=max_length)

    def training_arguments(self, batch_size: int | None = None) -> TrainingArguments:
        """The Trainer's arguments for these options (head-only training on a frozen base, no reporting).

        `batch_size` replaces `self.batch_size` as the Trainer's batch: a run on cached features counts positions.
        """
        return TrainingArguments(
            output_dir=self.output_dir,
            max_steps=self.max_steps,
            num_train_epochs=self.epochs,
            per_device_train_batch_size=batch_size or self.batch_size,
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
            # The Trainer's tqdm bar only on a terminal, as the package's own bars: in a log it writes carriage
            # returns, and train_head prints a plain line a minute there instead (_ProgressLines).
            disable_tqdm=not (self.progress_bar and is_terminal()),
            remove_unused_columns=False,
            dataloader_num_workers=0,
            logging_nan_inf_filter=False,  # a NaN loss is logged as such (and stops training), not averaged away
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
    feature_seconds: float | None = None  # computing (or checking) the feature cache; None: no cache
    positions_per_step: int | None = None  # cached runs: positions in one batch (a contextual head's: on average)


class _LossPrinter(TrainerCallback):
    """One short line per logged step, in place of the progress bar (for logs and the demo)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            print(f"    step {state.global_step}: loss {float(logs['loss']):.4f}", flush=True)


class _ProgressLines(TrainerCallback):
    """The Trainer's progress where stderr is not a terminal (a log, a pipe): the plain lines of
    `workbench.progress`, at most one a minute with the time left and the last logged loss, in place of its bar."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.loss: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # a resumed run counts the steps it has left
            self.progress = Progress(state.max_steps - state.global_step, "training", unit="step")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(1, **({"loss": self.loss} if self.loss is not None else {}))

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.close()


class _StreamEnd(TrainerCallback):
    """A streamed data set that ends before `max_steps` is never gone over again in silence.

    The Trainer starts a stream that runs out again from its first row, until `max_steps`. Without `repeat`, training
    stops at the end of the data instead, with a line that says so; with it, the run ends with a line that says how
    many times the data ended and how many passes the steps made. A pass that makes no optimiser step (fewer rows than
    one step takes) is an error either way: repeating it would never reach `max_steps`.
    """

    def __init__(self, truncation: TruncationReport, repeat: bool, main_process: bool) -> None:
        self.truncation, self.repeat, self.main_process = truncation, repeat, main_process
        self.ends = 0  # times the data ran out before max_steps
        self.rows_per_pass = 0
        self.first_step = self.step_at_first_end = self.step_at_last_end = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step = self.step_at_last_end = state.global_step

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_training_stop or state.global_step >= state.max_steps:
            return  # the steps, the time budget or an error ended the run, not the data
        stalled = state.global_step == self.step_at_last_end
        if not self.ends:
            self.step_at_first_end = state.global_step
        self.ends += 1
        self.rows_per_pass = self.rows_per_pass or self.truncation.total
        self.step_at_last_end = state.global_step
        rows = f"{self.rows_per_pass} example{'' if self.rows_per_pass == 1 else 's'}"
        if stalled:
            one_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
            raise ValueError(
                f"The streamed data ended after its {rows} without an optimiser step (one takes --batch-size x "
                f"--grad-accum = {one_step} examples per process); no head was saved."
            )
        if not self.repeat:
            control.should_training_stop = True
            self._say(
                f"the stream ended after its {rows}, at step {state.global_step} of --steps "
                f"{state.max_steps}; training stops there (--repeat-stream starts it again from its first row until "
                "--steps)."
            )
        return control

    def on_train_end(self, args, state, control, **kwargs):
        passes = self.passes(state.global_step)
        if self.repeat and passes is not None and passes > self.ends:
            times = f"{self.ends} time{'s' if self.ends > 1 else ''}"
            self._say(
                f"the stream of {self.rows_per_pass} examples ended {times} before --steps {state.max_steps} and "
                f"was started again each time (--repeat-stream): {state.global_step} steps made {passes:.1f} passes "
                "over it."
            )

    def passes(self, step: int) -> float | None:
        """Passes over the data up to optimiser step `step` (one pass counts the steps up to the first end); None
        while the data has not ended."""
        steps_per_pass = self.step_at_first_end - self.first_step if self.ends else 0
        if steps_per_pass <= 0:
            return float(self.ends) if self.ends else None
        return self.ends + (step - self.step_at_last_end) / steps_per_pass

    def _say(self, text: str) -> None:
        if self.main_process:
            print(f"Training data: {text}", flush=True)


class _TimeBudget(TrainerCallback):
    """Stops training once the wall-clock budget is spent (the demo trains for minutes, not for steps).

    The clock starts when training begins, or at `start` when given (a cached run counts its feature pass).
    """

    def __init__(self, seconds: float, start: float | None = None) -> None:
        self.seconds = seconds
        self.fixed_start = start is not None
        self.start = start if start is not None else time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.fixed_start:
            self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.start >= self.seconds:
            control.should_training_stop = True
        return control


class _StopOnDivergence(TrainerCallback):
    """Stops training with a one-line error as soon as the head's weights or the logged loss are not finite.

    The weights are checked after every optimiser step, before the Trainer may checkpoint them (only the head
    trains, so this is a few small tensors); the loss is checked whenever it is logged.
    """

    def __init__(self, model: PeftModel, learning_rate: float) -> None:
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.learning_rate = learning_rate

    def on_step_end(self, args, state, control, **kwargs):
        if self.parameters and not torch.stack([torch.isfinite(p).all() for p in self.parameters]).all():
            raise self.diverged(state.global_step, "the head's weights hold NaN or infinite values")

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise self.diverged(state.global_step, f"the loss is {loss}")

    def diverged(self, step: int, what: str) -> RuntimeError:
        return RuntimeError(
            f"Training diverged at step {step}: {what}; lower the learning rate (--lr, now {self.learning_rate:g}); "
            "no head was saved."
        )


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
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainingReport:
    """Fine-tune the active head of `model` on `examples`; writes the head to `options.output_dir`.

    `examples` is a list of MathExamples, or a streamed `datasets.IterableDataset` of rows with their fields
    (`problem`, `solution`, `answer`; `data.stream_examples` makes one from a file or a hub dataset), which is
    tokenised as it is read and needs `max_steps > 0`; its truncation is counted as it streams and printed at the end.

    Checkpoints (head weights, optimiser and scheduler state) go to `output_dir/checkpoint-<step>`; the final head
    is written last, next to them, as `adapter_config.json` + `adapter_model.safetensors` + its model card
    `README.md` (the run recorded with `record_card_details`), in one atomic step (`save_head`). `options.resume`
    continues from the newest complete checkpoint. A NaN or infinite loss or head weight stops training with a
    RuntimeError; a run that fails before it wrote anything removes the output folder
    it created.

    With `options.feature_cache`, the base's hidden states at the trained positions are computed once into that
    folder (or reused, see `workbench.features`) and every epoch trains the head alone on them, `batch_size`
    examples' worth of positions per step; the feature pass counts toward `time_budget_seconds`.

    With `options.kl_to_base` > 0 the loss adds that weight times KL(base || head) at the trained positions
    (`ScoredPositionsTrainer`); a model whose output layer holds no backattn head is refused before anything is done.

    `callbacks` are HF `TrainerCallback`s, run after the run's own (divergence check, time budget), as
    `Trainer(callbacks=...)` takes them: to watch or snapshot the run, or to stop it early.
    """
    start = time.monotonic()
    output = Path(options.output_dir)
    if (output / "adapter_config.json").exists() and not (options.overwrite or options.resume):
        raise ValueError(f"{output} already holds a head; pass --overwrite, --resume or another --output.")
    check_writable(output, option_name(TrainingOptions, "output_dir"))
    streamed = isinstance(examples, IterableDataset)
    check_streaming(options, streamed)
    check_kl_to_base(model, options.kl_to_base)
    arguments = options.training_arguments()
    main_process = arguments.process_index == 0
    if options.max_length is None:  # not chosen: the default, or the base's positions where it takes fewer
        options = options.for_base(model.config, say=main_process)
    if options.feature_cache is not None:
        check_feature_folder(options.feature_cache, output)
        check_writable(options.feature_cache, option_name(TrainingOptions, "feature_cache"))
    checkpoint, skipped = _resume_checkpoint(output) if options.resume else (None, [])
    trained_on = checkpoint_features(checkpoint) if checkpoint else None
    if checkpoint:
        _check_same_kind_of_run(checkpoint, trained_on, options.feature_cache)
    if streamed:  # tokenised a batch at a time as the Trainer reads it; counted as it streams
        dataset, truncation = tokenize_stream(examples, tokenizer, options.max_length, options.batch_size)
    else:
        dataset, truncation = tokenize_examples(examples, tokenizer, options.max_length)
    fingerprint = None
    if trained_on is not None:  # the checkpoint's features must be these: checked before anything is written
        fingerprint = feature_fingerprint(model, tokenizer, dataset, options.max_length)
        if fingerprint_digest(fingerprint) != trained_on:
            raise ValueError(
                f"--resume: {checkpoint.name} was trained on features of another base, data, --max-length or "
                "tokenizer; resume with the same model and data as the run that wrote it."
            )
    if main_process:  # nothing on disk changes before this point
        clean_leftovers(output)
        if checkpoint:
            for folder, _ in skipped:  # the resumed run writes its own checkpoint in their place
                remove_path(folder)
            removed = f" ({_reasons(skipped)}; removed)" if skipped else ""
            print(f"Resuming from {checkpoint.name}{removed}", flush=True)

    user_callbacks, callbacks = list(callbacks), [_StopOnDivergence(model, options.learning_rate)]
    if options.time_budget_seconds:
        callbacks.append(_TimeBudget(options.time_budget_seconds, start if options.feature_cache else None))
    if not options.progress_bar:
        callbacks.append(_LossPrinter())
    elif not is_terminal():
        callbacks.append(_ProgressLines())
    stream_end = _StreamEnd(truncation, options.repeat_stream, main_process) if streamed else None
    if stream_end is not None:
        callbacks.append(stream_end)
    callbacks += user_callbacks
    created = first_missing_folder(output)  # the folder (or its first missing parent) this run creates, if any
    features = None
    try:
        if main_process:
            print(f"Training data: {'streamed, counted as it is read' if streamed else truncation}", flush=True)
        trainer_arguments, train_dataset, collator = arguments, dataset, PaddingCollator.from_tokenizer(tokenizer)
        if options.feature_cache is not None:  # the same Trainer and loss, on the trained positions' cached features
            _place_like_the_trainer(model, arguments)  # the pass runs before the Trainer would move the model
            # Several processes: the main one computes the cache, then the others reuse it (one folder, one pass).
            with arguments.main_process_first(local=False, desc="the feature pass"):
                features = cache_features(
                    model, tokenizer, dataset, options.feature_cache, max_length=options.max_length,
                    batch_size=options.batch_size, progress=options.progress_bar, fingerprint=fingerprint,
                )  # fmt: skip
            layer, name = head_layer(model)
            config = layer.backattn_heads[name].config
            trainer_arguments = options.training_arguments(batch_size=features.rows_per_step(options.batch_size))
            train_dataset, collator = features.rows, features.collator(config)
            callbacks.append(FeatureCacheStamp(features.digest))
            if main_process:
                print(_cached_run_line(features, config, options.batch_size), flush=True)
        trainer = ScoredPositionsTrainer(
            model=model,
            args=trainer_arguments,
            train_dataset=train_dataset,
            data_collator=collator,
            callbacks=callbacks,
            kl_to_base=options.kl_to_base,
        )
        if not options.progress_bar:
            trainer.remove_callback(PrinterCallback)  # _LossPrinter prints instead of the raw log dictionaries
        train_start = time.monotonic()
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except FILE_ERRORS as error:
            named = _checkpoint_file_error(error, output, trainer.state.global_step, checkpoint)
            if named is None:
                raise
            raise named from error
    except BaseException:
        if created is not None and main_process:
            remove_empty_folders(output, created)  # a run that failed before writing anything leaves no folder behind
        raise
    seconds = time.monotonic() - train_start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if streamed and main_process:
        print(f"Training data: {truncation}", flush=True)
    passes = stream_end.passes(trainer.state.global_step) if stream_end is not None else None
    record_card_details(model, training=card_training_details(options, trainer, seconds, losses, truncation, passes))
    with gathered_head(model):  # DeepSpeed ZeRO-3: every process helps gather the head's weights for the save
        if options.save_final and main_process:
            save_head(model, options.output_dir)  # the model card (README.md) is written in the same version
    return TrainingReport(
        steps=trainer.state.global_step,
        seconds=seconds,
        final_loss=losses[-1] if losses else None,
        first_loss=losses[0] if losses else None,
        truncation=truncation,
        head_dir=options.output_dir,
        processes=trainer.args.world_size,
        losses=losses,
        feature_seconds=features.seconds if features is not None else None,
        positions_per_step=features.positions_per_step(options.batch_size) if features is not None else None,
    )


def check_streaming(options: TrainingOptions, streamed: bool = True) -> None:
    """Refuse options that cannot train on a streamed data set (it has no length to count epochs with), and the
    stream's own option, `repeat_stream`, without one."""
    if not streamed:
        if options.repeat_stream:
            raise ValueError(
                "--repeat-stream (repeat_stream) starts a streamed data set again; without --streaming, give --epochs "
                "for more passes over the data."
            )
        return
    if options.max_steps <= 0:
        raise ValueError("A streamed data set has no length to make epochs of; give --steps (max_steps > 0).")
    if options.feature_cache is not None:
        raise ValueError("--feature-cache computes features for the whole data set once; it cannot stream it.")


def card_training_details(
    options: TrainingOptions,
    trainer: Trainer,
    seconds: float,
    losses: list[float],
    truncation: TruncationReport,
    stream_passes: float | None = None,
) -> dict[str, object]:
    """The training run as the head's model card shows it (see `peft_backattn.model_card`); `stream_passes`, the
    passes over a streamed data set that ended during the run."""
    details: dict[str, object] = {
        "trainer": f"transformers Trainer ({type(trainer).__name__}, in peft_backattn.workbench.training.train_head)",
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
    if options.kl_to_base:
        details["KL-to-base weight"] = options.kl_to_base
    if stream_passes is not None:
        repeated = " (--repeat-stream)" if options.repeat_stream else ""
        details["passes over the streamed data"] = f"{stream_passes:.1f}{repeated}"
    if losses:
        details["training loss, first and last logged"] = f"{losses[0]:.4f} -> {losses[-1]:.4f}"
    return details


def _place_like_the_trainer(model: PeftModel, arguments: TrainingArguments) -> None:
    """Move the model to the training device as the Trainer would (not one spread over devices or quantised)."""
    spread = getattr(model, "hf_device_map", None) is not None
    quantised = getattr(model, "hf_quantizer", None) is not None or getattr(model, "quantization_method", None)
    if not (spread or quantised):
        model.to(arguments.device)


def _check_same_kind_of_run(checkpoint: Path, trained_on: str | None, feature_cache: str | None) -> None:
    """A run resumes as the kind it was: on sequences, or on cached positions (its steps count different batches)."""
    if trained_on is not None and feature_cache is None:
        raise ValueError(
            f"--resume: {checkpoint.name} was trained on cached features; resume with --feature-cache and the "
            "folder of that run."
        )
    if trained_on is None and feature_cache is not None:
        raise ValueError(
            f"--resume: {checkpoint.name} was trained without --feature-cache; resume without it (a run cannot "
            "switch from sequences to cached positions)."
        )


def _cached_run_line(features: CachedFeatures, config: BackAttnConfig, batch_size: int) -> str:
    """What a cached run trains on, and whether a softmax head computes its weights or reads them."""
    if features.context is None:
        line = (
            f"Training the head alone on {features.positions:,} cached positions, "
            f"{features.positions_per_step(batch_size):,} per step ({batch_size} examples' worth)"
        )
    else:  # a contextual head reads whole examples
        line = (
            f"Training the head alone on {features.positions:,} cached positions of {features.examples:,} examples, "
            f"{batch_size} examples per step, with their tapped layers {features.context['layers']}"
        )
    if config.logit_weighting == "softmax" and not features.weighted_for(config):
        line += "; the cache holds no softmax weights for this head's rms_norm_eps, so each step computes them"
    return line


def _checkpoint_file_error(
    error: BaseException, output: Path, step: int, resumed_from: Path | None
) -> OSError | ValueError | None:
    """The Trainer's failure as an error naming the file it was about: a checkpoint file it was writing (a full disk),
    or the checkpoint it resumed from when that could not be read. None when the failure was about no file."""
    saving = output / f"checkpoint-{step}"
    if saving.is_dir() and saving != resumed_from:
        unwritten = unwritten_checkpoint_file(saving)
        if unwritten is not None:
            return FileWriteError(unwritten, error)
    if resumed_from is not None and isinstance(error, (EOFError, pickle.UnpicklingError, SafetensorError)):
        hint = f"; delete {resumed_from} to resume from the checkpoint before it, or train without --resume"
        return FileReadError(resumed_from, error, hint)
    return None


def _resume_checkpoint(output: Path) -> tuple[Path, list[tuple[Path, str]]]:
    """The newest complete checkpoint in `output`, and the newer ones skipped as incomplete (a kill or a full disk
    during a save), each with what is wrong with it."""
    if not checkpoints_newest_first(output):
        raise ValueError(f"--resume: no checkpoint-* folder in {output}; train without --resume first.")
    checkpoint, skipped = newest_complete_checkpoint(output)
    if checkpoint is None:
        raise ValueError(
            f"--resume: no complete checkpoint in {output} ({_reasons(skipped)}); train without --resume to start "
            "over."
        )
    return checkpoint, skipped


def _reasons(skipped: list[tuple[Path, str]]) -> str:
    return "; ".join(f"{folder.name} is incomplete: {problem}" for folder, problem in skipped)
