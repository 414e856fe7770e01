"""Training only where the loss is: the output layer (with its head) runs on the positions whose label is trained.

A causal LM applies its output layer to every position, prompt and padding included, and masks the loss only
afterwards. Under a head on a frozen base, the output layer is where the trainable work is (vocabulary-sized
products per position, forward and backward), so computing it for positions that are never scored wastes most of
a step on prompt-heavy data. Here a forward pre-hook on the output layer keeps only the hidden states of trained
positions, (B, T, d) -> (n, d), so the model returns logits (n, V) for exactly the n targets, and the loss is the
same mean cross-entropy the model would have computed (tested against it, values and gradients).

Anything a model does to its logits after the output layer is element-wise (scaling, soft-capping), so it applies
to the kept rows unchanged. The same works for any PEFT method (LoRA too), which is how the benchmarks compare
methods on equal terms.

`ScoredPositionsTrainer` takes its batches from either of two sources and computes one loss on both: token
sequences (the base runs, the output layer on the trained positions only), or cached features (`workbench.features`:
the hidden states of trained positions, computed once; the output layer runs on them alone). Both go through the
model's forward, so a wrapper such as DDP sees every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from ..layer import BackAttnLayer
from .data import IGNORE_INDEX


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) mask of the positions whose next-token prediction is scored: position t predicts labels[:, t + 1]."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def trained_targets(labels: torch.Tensor) -> torch.Tensor:
    """The n target tokens, in the order `trained_positions` keeps the hidden states (row by row)."""
    shifted = labels[:, 1:]
    return shifted[shifted != IGNORE_INDEX]


@contextmanager
def only_trained_positions(
    output_layer: nn.Module, labels: torch.Tensor, collect: Callable[[torch.Tensor], Any] | None = None
) -> Iterator[None]:
    """While inside, `output_layer` sees only the hidden states of the positions `labels` trains: (n, d).

    With `collect`, the rows go to `collect` instead and the output layer gets none, (0, d): a pass that only
    gathers them (the feature cache) spends no vocabulary product.
    """
    mask = trained_positions(labels)

    def keep_trained_rows(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0]  # (B, T, d)
        if hidden.shape[:2] != mask.shape:
            raise ValueError(
                f"The output layer got hidden states of shape {tuple(hidden.shape)}, but the labels are "
                f"{tuple(mask.shape)}; training only the scored positions needs the logits of every position."
            )
        rows = hidden[mask.to(hidden.device)]  # (n, d)
        if collect is not None:
            collect(rows)
            rows = rows[:0]  # (0, d)
        if isinstance(module, BackAttnLayer):  # a contextual head picks its context vectors by the same mask
            kwargs = kwargs | {"kept_positions": mask if collect is None else mask & False}
        return (rows, *args[1:]), kwargs

    handle = output_layer.register_forward_pre_hook(keep_trained_rows, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def scored_positions_loss(
    outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
) -> torch.Tensor:
    """Cross-entropy of the kept logits (n, V) against the n targets: the model's own causal-LM loss.

    Summed and divided by `num_items_in_batch` when the Trainer counts targets across accumulated batches (as the
    models' loss does), else the mean. Full logits (B, T, V), as in evaluation, are shifted and masked first. The
    logits of cached features are (n, V) too, their labels laid out as one sequence (`FeatureCollator`).
    """
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    if logits.dim() == 3:  # every position: shift so that position t predicts token t + 1, then keep the scored
        logits = logits[:, :-1][labels[:, 1:] != IGNORE_INDEX]
    targets = trained_targets(labels).to(logits.device)
    total = F.cross_entropy(logits.float(), targets, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    return total / count


class ScoredPositionsTrainer(Trainer):
    """The HF Trainer, with the output layer run in training only on the positions whose label is trained.

    Batches of token sequences (`input_ids`, `attention_mask`, `labels`) run the model with the output layer on
    the trained positions only; batches of cached features (`cached_hidden`, `labels`, [`cached_weighted`], from
    `features.FeatureCollator`; a contextual head's also `cached_taps`, `cached_attention_mask`, `cached_kept`, from
    `features.ExampleCollator`) run the output layer alone, through the same forward (`BackAttnModel.forward`).
    Both are scored by `scored_positions_loss`. Everything else is the Trainer's own: the model's forward (through
    DDP or DeepSpeed when launched so), counting the targets and scaling the loss across accumulated batches and
    processes, checkpoints. Evaluation runs the full forward.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, compute_loss_func=scored_positions_loss, **kwargs)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        if not model.training or "labels" not in inputs or "cached_hidden" in inputs:  # the last: no base forward
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        output_layer = self.accelerator.unwrap_model(model).get_output_embeddings()
        with only_trained_positions(output_layer, inputs["labels"]):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
