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

With `kl_to_base` = λ > 0 (a backattn head only), the loss adds λ KL(p_base || p_model) at the same positions,
where p_base is the frozen base layer's distribution of the same rows the head scores: one extra vocabulary product
per trained position and no second base forward (`_KLSides`). It keeps the head's distribution near the base's
where the training data gives it no reason to leave, for a head that must not lose what the base does elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from ..layer import BackAttnLayer
from ..validation import non_negative_number
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


# The weight of the KL term: `TrainingOptions.kl_to_base` checks it with this, and so does the trainer.
KL_TO_BASE_WEIGHT = non_negative_number.saying("a finite number >= 0 (0: off)")
_KL_TO_BASE_OPTION = "--kl-to-base (kl_to_base)"


def check_kl_to_base(model: nn.Module, kl_to_base: float) -> BackAttnLayer | None:
    """The backattn layer whose head the KL term keeps near its base (None when `kl_to_base` is 0); a one-line
    ValueError for a weight that is no finite number >= 0, or for a model whose output layer holds no backattn head."""
    KL_TO_BASE_WEIGHT(kl_to_base, _KL_TO_BASE_OPTION)
    if not kl_to_base:
        return None
    output_layer = model.get_output_embeddings()
    if not isinstance(output_layer, BackAttnLayer):
        raise ValueError(
            f"{_KL_TO_BASE_OPTION} keeps a backattn head near its base, but this model's output layer is a "
            f"{type(output_layer).__name__}, not a backattn head; leave it at 0 for other methods (LoRA, ...)."
        )
    return output_layer


def kl_to_base_sum(logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """Sum over the rows of KL(softmax(base_logits) || softmax(logits)), both (n, V), in float as the cross-entropy."""
    return F.kl_div(
        F.log_softmax(logits.float(), dim=-1),
        F.log_softmax(base_logits.float(), dim=-1),
        reduction="sum",
        log_target=True,
    )


class _KLSides:
    """The two sides of the KL term for one training batch, caught as the model's forward makes them.

    `head`: the output layer's logits of the rows it was given (its active head's, with gradient); `base`: its
    frozen base layer's logits of the same rows, without gradient. Token batches: a forward hook on the output layer
    sees the rows `only_trained_positions` kept, and the layer's output. Cached features: the rows are
    `cached_hidden`, and the model's logits of them are the output layer's already (`head` stays None: the scored
    logits). The output layer's own logits, not the model's: a base that rescales its logits after the output layer
    (soft-capping) would rescale the head's side and not the base's.
    """

    def __init__(self, layer: BackAttnLayer) -> None:
        self.layer = layer
        self.head: torch.Tensor | None = None  # (n, V)
        self.base: torch.Tensor | None = None  # (n, V)
        self.catching = False

    def base_logits(self, rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.layer.get_base_layer()(rows)  # (n, V)

    @contextmanager
    def caught(self, cached_hidden: torch.Tensor | None = None) -> Iterator[None]:
        """While inside, the forward's two sides are caught for `take`; they are forgotten on the way out."""

        def catch(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.head, self.base = output, self.base_logits(args[0])

        handle = None
        if cached_hidden is None:
            handle = self.layer.register_forward_hook(catch)
        else:
            self.base = self.base_logits(cached_hidden)
        self.catching = True
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()
            self.head = self.base = None
            self.catching = False

    def take(self) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """(head, base) of the forward just run, and forgotten here (freed after the loss); None outside `caught`."""
        if not self.catching:
            return None
        if self.base is None:
            raise RuntimeError(
                "The KL term's base logits were not caught: the output layer did not run in this forward."
            )
        sides = self.head, self.base
        self.head = self.base = None
        return sides


class ScoredPositionsTrainer(Trainer):
    """The HF Trainer, with the output layer run in training only on the positions whose label is trained.

    Batches of token sequences (`input_ids`, `attention_mask`, `labels`) run the model with the output layer on
    the trained positions only; batches of cached features (`cached_hidden`, `labels`, [`cached_weighted`], from
    `features.FeatureCollator`; a contextual head's also `cached_taps`, `cached_attention_mask`, `cached_kept`, from
    `features.ExampleCollator`) run the output layer alone, through the same forward (`BackAttnModel.forward`).
    Both are scored by `scored_positions_loss`, plus `kl_to_base` times the KL term (`kl_to_base_sum`) in training
    when it is positive: summed over the same positions and divided by the same count. Everything else is the
    Trainer's own: the model's forward (through DDP or DeepSpeed when launched so), counting the targets and scaling
    the loss across accumulated batches and processes, checkpoints. Evaluation runs the full forward and scores the
    cross-entropy alone.
    """

    def __init__(self, *args: Any, kl_to_base: float = 0.0, **kwargs: Any) -> None:
        model = kwargs.get("model", args[0] if args else None)
        layer = check_kl_to_base(model, kl_to_base)
        self.kl_to_base = kl_to_base
        self.kl_sides = _KLSides(layer) if layer is not None else None
        loss = self.scored_loss_with_kl if self.kl_sides is not None else scored_positions_loss
        super().__init__(*args, compute_loss_func=loss, **kwargs)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        if not model.training or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with ExitStack() as stack:
            cached = "cached_hidden" in inputs  # the output layer alone, no base forward
            if not cached:
                output_layer = self.accelerator.unwrap_model(model).get_output_embeddings()
                stack.enter_context(only_trained_positions(output_layer, inputs["labels"]))
            if self.kl_sides is not None:
                stack.enter_context(self.kl_sides.caught(inputs["cached_hidden"] if cached else None))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def scored_loss_with_kl(
        self, outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """`scored_positions_loss` + kl_to_base * KL(p_base || p_model) / the same count (training batches only)."""
        loss = scored_positions_loss(outputs, labels, num_items_in_batch)
        sides = self.kl_sides.take()
        if sides is None:  # evaluation: the cross-entropy alone
            return loss
        head, base = sides
        if head is None:  # cached rows: the scored logits are the output layer's
            head = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        count = num_items_in_batch if num_items_in_batch is not None else trained_targets(labels).numel()
        return loss + self.kl_to_base * kl_to_base_sum(head, base.to(head.device)) / count
