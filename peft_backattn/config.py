"""`BackAttnConfig`: the settings of one backward-attention head, saved as `adapter_config.json`."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import PeftType, TaskType

from ._base_names import published_base
from ._files import validate_head_folder
from ._peft_type import PEFT_TYPE_NAME
from .validation import Check, check_fields, is_integer, one_of, positive_int, positive_number, true_or_false

LogitWeighting = Literal["raw", "softmax"]
CombineMode = Literal["replace", "residual"]
LOGIT_WEIGHTINGS: tuple[str, ...] = get_args(LogitWeighting)
COMBINE_MODES: tuple[str, ...] = get_args(CombineMode)
CONFIG_NAME = "adapter_config.json"
# The one list of query non-linearities: the config validates against its names, the head and the reference apply it.
QUERY_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "relu": F.relu,
}


@dataclass
class BackAttnConfig(PeftConfig):
    """Configuration of a backward-attention output head (see docs/design.md for the equations).

    The head wraps the model's output layer (`get_output_embeddings()`), reads the frozen base logits and the
    RMS-normalised input-embedding matrix, and returns refined logits. Every field below is saved with the head.
    """

    r: int = field(
        default=64,
        metadata={
            "help": "Latent size of the keys, values and queries (the r of W_K, W_V: d x r, and W_Q: r x r).",
            "check": positive_int,
        },
    )
    scaling: float | None = field(
        default=None,
        metadata={
            "help": "Factor applied to the attention scores Q K^T. None means 1 / sqrt(r), as in attention.",
            "check": positive_number.or_none(),
        },
    )
    rms_norm_eps: float = field(
        default=1e-6,
        metadata={
            "help": "Epsilon of the row-wise RMSNorm applied to the input-embedding matrix.",
            "check": positive_number,
        },
    )
    logit_weighting: LogitWeighting = field(
        default="softmax",
        metadata={
            "help": (
                "How the base logits weight the value vectors. 'raw': the logits themselves, divided by the "
                "vocabulary size (the original design; the head is then linear in the hidden state). 'softmax': "
                "the base model's next-token probabilities."
            ),
            "check": one_of(LOGIT_WEIGHTINGS),
        },
    )
    combine: CombineMode = field(
        default="residual",
        metadata={
            "help": (
                "'residual': output logits = base logits + head scores, with W_Q zero-initialised so that an "
                "untrained head reproduces the base logits exactly. 'replace': the head's scores are the output "
                "(the original design; starts from a near-uniform distribution)."
            ),
            "check": one_of(COMBINE_MODES),
        },
    )
    num_heads: int = field(
        default=1,
        metadata={
            "help": (
                "Number of backward-attention heads. With more than one, the output distribution is a mixture of "
                "the heads' softmaxes, weighted by a softmax over heads computed from each head's query."
            ),
            "check": positive_int,
        },
    )
    query_activation: str | None = field(
        default=None,
        metadata={
            "help": (
                "Optional non-linearity on the query path, Q = act(dot W_Q). None keeps the head linear, which "
                "enables the collapsed fast path and merge_and_unload() in 'raw' mode."
            ),
            "choices": tuple(QUERY_ACTIVATIONS),
            "check": one_of(tuple(QUERY_ACTIVATIONS)).or_none(),
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "Start W_Q at zero where combine='residual', so that an untrained head reproduces the base (like "
                "LoRA's B = 0). False: every matrix starts random, so that an untrained head changes the output "
                "(useful in tests)."
            ),
            "check": true_or_false,
        },
    )
    init_std: float = field(
        default=0.1,
        metadata={
            "help": (
                "Standard deviation of the random initial W_K and W_V (and of W_Q where it does not start at zero, "
                "and the mixture gate). The scores Q K^T move with the square of it, so a larger start lets a "
                "residual head learn faster at the same learning rate; 0.1 beat 0.02 at both tuned learning rates "
                "(docs/results.md)."
            ),
            "check": positive_number,
        },
    )
    chunk_size: int = field(
        default=512,
        metadata={
            "help": (
                "Number of token positions processed at once where the head has vocabulary-sized intermediates "
                "(softmax weights: chunk_size x vocab; a mixture takes chunk_size / num_heads positions per chunk). "
                "A raw single head has none and ignores it."
            ),
            "check": positive_int,
        },
    )
    context: bool = field(
        default=False,
        metadata={
            "help": (
                "Make the head contextual: it also reads the outputs of some of the base's decoder layers "
                "(context_layers), attends back over the earlier positions of the sequence with a small causal "
                "attention block, and adds the result to its query (docs/design.md, 'The contextual head'). Off: "
                "the head reads the final hidden state of one position only."
            ),
            "check": true_or_false,
        },
    )
    context_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": (
                "With context: indices of the decoder layers whose outputs the head reads (negative counts from the "
                "last). None: the layers a third and two thirds of the way up, and the last. Stored as non-negative "
                "indices when the head is attached."
            ),
            "check": Check(
                "a non-empty list of distinct layer indices, or None",
                lambda value: (
                    value is None
                    or (
                        isinstance(value, (list, tuple))
                        and len(value) > 0
                        and all(is_integer(index) for index in value)
                        and len(set(value)) == len(value)
                    )
                ),
            ),
        },
    )
    context_dim: int = field(
        default=128,
        metadata={
            "help": "With context: width of the context path (the tapped states are projected to it).",
            "check": positive_int,
        },
    )
    context_heads: int = field(
        default=4,
        metadata={
            "help": "With context: attention heads of the context path; context_dim / context_heads must be even.",
            "check": positive_int,
        },
    )
    context_window: int | None = field(
        default=None,
        metadata={
            "help": (
                "With context: each position attends to at most this many positions, itself included. None: to "
                "every earlier position."
            ),
            "check": positive_int.or_none(),
        },
    )
    context_attention: bool = field(
        default=True,
        metadata={
            "help": (
                "With context: attend over the earlier positions. Off: the cheaper 'taps only' variant, where each "
                "position's context is its own tapped states through the small MLP."
            ),
            "check": true_or_false,
        },
    )
    head_module: str | None = field(
        default=None,
        metadata={
            "help": (
                "Name of the output module to wrap, e.g. 'lm_head'. None: the module returned by "
                "model.get_output_embeddings(). Filled in when the head is attached, in the model's copy of the "
                "config (the object passed in is left as it is)."
            ),
            "check": Check(
                "a module name or None", lambda value: value is None or (isinstance(value, str) and value != "")
            ),
        },
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Unused; kept None. The head wraps `head_module`. Present for PEFT's generic code paths.",
            "flag": None,
        },
    )
    base_vocab_size: int | None = field(
        default=None,
        metadata={
            "help": "Vocabulary size of the base the head was built for. Recorded on attach, checked on load.",
            "flag": None,
            "check": positive_int.or_none(),
        },
    )
    base_hidden_size: int | None = field(
        default=None,
        metadata={
            "help": "Input width of the wrapped output layer. Recorded on attach, checked on load.",
            "flag": None,
            "check": positive_int.or_none(),
        },
    )
    base_embedding_dim: int | None = field(
        default=None,
        metadata={
            "help": "Width of the input-embedding matrix. Recorded on attach, checked on load.",
            "flag": None,
            "check": positive_int.or_none(),
        },
    )
    base_context_width: int | None = field(
        default=None,
        metadata={
            "help": "Width of the decoder layer outputs a contextual head reads. Recorded on attach, checked on load.",
            "flag": None,
            "check": positive_int.or_none(),
        },
    )
    base_num_layers: int | None = field(
        default=None,
        metadata={
            "help": "Number of the base's decoder layers, for a contextual head. Recorded on attach, checked on load.",
            "flag": None,
            "check": positive_int.or_none(),
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.peft_type is not None and self.peft_type != PEFT_TYPE_NAME:
            value = getattr(self.peft_type, "value", self.peft_type)
            raise ValueError(f"BackAttnConfig.peft_type must be {PEFT_TYPE_NAME!r}, got {value!r}.")
        self.peft_type = PeftType[PEFT_TYPE_NAME]  # the member `_peft_patches` added when the package was imported
        if self.task_type is None:
            self.task_type = TaskType.CAUSAL_LM
        self._validate()

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs
    ) -> BackAttnConfig:
        """Load the config and, for a local folder, check its weights file first.

        PEFT reads the config before it attaches a new head, so checking the weights here means that a
        truncated, corrupted or mismatched file is refused before the model changes.
        """
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if os.path.isdir(folder):
            validate_head_folder(folder, config)
        return config

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write adapter_config.json with the base named as it may be published (`_base_names.published_base`): a
        hub id, or a local folder's name, never a path of this machine. The config in memory keeps its value (PEFT
        reads the base's config through it while it saves)."""
        recorded = self.base_model_name_or_path
        self.base_model_name_or_path = published_base(recorded).name
        try:
            super().save_pretrained(save_directory, **kwargs)
        finally:
            self.base_model_name_or_path = recorded

    @classmethod
    def check_kwargs(cls, **kwargs) -> dict:
        """Refuse a saved config of another method before PEFT dispatches on its `peft_type` (a bare KeyError)."""
        peft_type = kwargs.get("peft_type")
        if peft_type is not None:
            check_peft_type(peft_type, CONFIG_NAME)
            if peft_type != PEFT_TYPE_NAME:
                raise ValueError(
                    f"{CONFIG_NAME} has peft_type {peft_type!r}, not {PEFT_TYPE_NAME!r}: it is another PEFT method's "
                    "adapter, not a backattn head."
                )
        return super().check_kwargs(**kwargs)

    @property
    def is_linear(self) -> bool:
        """True when the head's scores are an affine function of the hidden state (mergeable, collapsible)."""
        return (
            self.logit_weighting == "raw"
            and self.query_activation is None
            and self.num_heads == 1
            and not self.context
        )

    @property
    def attention_scale(self) -> float:
        """The factor applied to Q K^T."""
        return self.scaling if self.scaling is not None else self.r**-0.5

    def _validate(self) -> None:
        """Each field's check (`validation`), naming it `BackAttnConfig.<field>`; `target_modules` must stay None."""
        check_fields(self, lambda name: f"BackAttnConfig.{name}")
        if self.context_layers is not None and not self.context:
            raise ValueError(
                f"BackAttnConfig.context_layers={self.context_layers} is set, but context=False; pass context=True "
                "to make the head contextual, or leave context_layers=None."
            )
        if self.context and (self.context_dim % self.context_heads or (self.context_dim // self.context_heads) % 2):
            raise ValueError(
                f"BackAttnConfig.context_dim={self.context_dim} must split into context_heads={self.context_heads} "
                "heads of an even width (rotary positions turn pairs of coordinates); e.g. context_dim=128, "
                "context_heads=4."
            )
        if self.context_layers is not None:
            self.context_layers = list(self.context_layers)  # a tuple from Python, a list from JSON: one form
        if self.target_modules is not None:
            raise ValueError(
                "BackAttnConfig.target_modules must stay None: the head wraps one output module; "
                "name it with head_module='lm_head' instead."
            )


class UnknownPeftTypeError(ValueError, KeyError):
    """A `peft_type` that no PEFT method in this process has: a one-line ValueError, and still the KeyError that
    PEFT's own lookup raised, for callers that catch that."""

    __str__ = BaseException.__str__  # KeyError's would quote the message


def check_peft_type(peft_type: object, source: str) -> None:
    """Raise `UnknownPeftTypeError` unless `peft_type` (read from `source`) names a registered PEFT method."""
    if isinstance(peft_type, str) and peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    expected = f"a backattn head has peft_type {PEFT_TYPE_NAME!r}"
    if peft_type is None:
        raise UnknownPeftTypeError(f"{source} has no peft_type; {expected}.")
    raise UnknownPeftTypeError(
        f"{source} has peft_type {getattr(peft_type, 'value', peft_type)!r}, which is not a PEFT method known here; "
        f"{expected} (for another method, import the package that registers it first)."
    )
