"""The heads a vLLM engine serves, as functions of the base's next-token logits: `HeadBank`, and what it reads.

vLLM hands a logits processor the base's logits for the whole batch, `(rows, V)`, and nothing else of the model. The
head needs exactly that and the input-embedding matrix (docs/design.md): `w` is `softmax(z)` (or `z / |V|`), and
the head's scores are `q̃ N^T`. So the bank holds `N` (one per `rms_norm_eps` in use) and every loaded head, and
computes the heads' logits for the rows that name one. Its steps are the head's own (`BackAttnHead.weighted_embedding`,
`query`, `query_in_embedding_space`, `single_head_logits`, `mixture_logits`), run as `BackAttnLayer._shared_forward`
runs them: the vocabulary-sized products (`w N`, then `q̃ N^T` into the logits) once for all rows of the batch, the
small per-head products on the rows gathered for each head.

Nothing here imports vLLM: the processor (processor.py) and the checks before serving (`engine_kwargs`) share it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftConfig
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .._files import WEIGHTS_NAME
from .._loading import CONFIG_FIELDS
from .._peft_type import PEFT_TYPE_NAME
from ..caches import ROWS_PER_VOCAB_CHUNK
from ..config import COMBINE_MODES, CONFIG_NAME, LOGIT_WEIGHTINGS, QUERY_ACTIVATIONS, BackAttnConfig
from ..head import BackAttnHead, FrozenTensors
from ..model import check_base_compatibility, input_embeddings_of

HEAD_KEY = "backattn_head"  # SamplingParams.extra_args[HEAD_KEY] (vllm_xargs over HTTP): the head's name
HEADS_ENV = "PEFT_BACKATTN_VLLM_HEADS"  # {name: folder} as JSON: the heads served, in every process of the engine

# The head's config fields that decide its math (`_loading.CONFIG_FIELDS`), each with the values the bank computes
# from the logits alone. A field added there (a contextual head, say) is unknown here, and such a head is refused.
LOGITS_ONLY_VALUES: dict[str, tuple | None] = {
    "base_embedding_dim": None,  # None: any value (a shape, checked against the base)
    "base_hidden_size": None,
    "base_vocab_size": None,
    "combine": COMBINE_MODES,
    "context": (False,),  # a contextual head reads the base's layers, which a logits processor never sees
    "context_attention": None,  # the other context fields: any value, unused without context
    "context_dim": None,
    "context_heads": None,
    "context_layers": None,
    "context_window": None,
    "base_context_width": None,
    "base_num_layers": None,
    "head_module": None,
    "logit_weighting": LOGIT_WEIGHTINGS,
    "num_heads": None,
    "query_activation": (None, *QUERY_ACTIVATIONS),
    "r": None,
    "rms_norm_eps": None,
    "scaling": None,
}

# Config attributes of bases whose logits vLLM rescales before its logits processors run, where transformers
# rescales after the output layer (and so after the head): the head would see other logits than it was trained on.
LOGIT_RESCALING = ("final_logit_softcapping", "logit_scale", "logits_scaling")

# SamplingParams settings that vLLM applies to the logits before its custom logits processors (so the head would
# read changed logits), or that it computes from the base's logits (so they would not be the head's).
SETTINGS_BEFORE_THE_HEAD = {
    "logprobs": "vLLM computes logprobs from the base's logits, before logits processors run",
    "prompt_logprobs": "vLLM computes prompt logprobs from the base's logits, before logits processors run",
    "logit_bias": "vLLM adds logit_bias before logits processors run, so the head would read biased logits",
    "allowed_token_ids": "vLLM masks the logits before logits processors run, so the head would read masked logits",
    "bad_words": "vLLM masks the logits before logits processors run, so the head would read masked logits",
    "min_tokens": "vLLM masks the stop tokens before logits processors run, so the head would read masked logits",
    "structured_outputs": "vLLM masks the logits by the grammar before sampling, so the head would read masked logits",
}


def served_heads() -> dict[str, str]:
    """The heads this process serves, {name: folder}, from `HEADS_ENV` (which vLLM's engine processes inherit)."""
    text = os.environ.get(HEADS_ENV, "")
    if not text:
        return {}
    heads = json.loads(text)
    if not isinstance(heads, dict) or not all(isinstance(v, str) for v in heads.values()):
        raise ValueError(f"{HEADS_ENV} must hold a JSON object {{name: head folder}}, got {text!r}.")
    return heads


def set_served_heads(heads: Mapping[str, str | os.PathLike]) -> None:
    os.environ[HEADS_ENV] = json.dumps({name: str(folder) for name, folder in heads.items()})


def check_request(params: object) -> str | None:
    """The head a request names (`extra_args[HEAD_KEY]`), or None; a one-line ValueError for a request that names
    an unknown head, or sets what vLLM would apply before the head (`SETTINGS_BEFORE_THE_HEAD`)."""
    name = (getattr(params, "extra_args", None) or {}).get(HEAD_KEY)
    if name is None:
        return None
    if not isinstance(name, str):
        raise ValueError(f"extra_args[{HEAD_KEY!r}] names a head, a string; got {name!r}.")
    heads = served_heads()
    if name not in heads:
        raise ValueError(f"No backattn head {name!r} is loaded; loaded heads: {sorted(heads)}.")
    for setting, why in SETTINGS_BEFORE_THE_HEAD.items():
        if getattr(params, setting, None):
            raise ValueError(f"{setting} cannot be used with backattn head {name!r}: {why}; leave it unset.")
    return name


def engine_kwargs(model: str | os.PathLike, heads: Mapping[str, str | os.PathLike]) -> dict:
    """Check every head folder against the base `model` (a local folder), export the heads to the processes vLLM
    starts, and return the `vllm.LLM(...)` arguments that install the processor and its worker methods.

    A bad head folder raises the one-line ValueError that `PeftModel.load_adapter` raises for it, before any engine
    starts. `VLLM_USE_V2_MODEL_RUNNER` is set to 0 unless set already: the processor implements the V1 model
    runner's interface (the only one on CPU).
    """
    base_config = AutoConfig.from_pretrained(model)
    skeleton = meta_model(base_config)
    for name, folder in heads.items():
        check_head_name(name)
        read_head(folder, base_config, skeleton)
    set_served_heads(heads)
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    return {
        "model": str(model),
        "logits_processors": ["peft_backattn.vllm.processor:BackAttnLogitsProcessor"],
        "worker_extension_cls": "peft_backattn.vllm.processor.BackAttnWorkerExtension",
    }


def check_head_name(name: object) -> None:
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ValueError(f"A head needs a non-empty name without surrounding spaces, got {name!r}.")


# -- reading heads and the embeddings ----------------------------------------------------------------------------


def meta_model(base_config: PretrainedConfig) -> nn.Module:
    """The base's module tree without weights (on the meta device): what its config says, for the checks."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(base_config)


def read_head(folder: str | os.PathLike, base_config: PretrainedConfig, skeleton: nn.Module) -> BackAttnHead:
    """A saved head, checked as `PeftModel.load_adapter` checks it (its peft_type, config, weights file and the
    base's shapes, by the same functions), and refused in one line where it is not a function of the logits."""
    folder = str(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"No head folder at {folder}; pass a folder written by save_pretrained.")
    if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        raise ValueError(f"No head at {folder} (no {CONFIG_NAME}); pass a folder written by save_pretrained.")
    peft_type = PeftConfig._get_peft_type(folder)  # as load_adapter reads it; one line for an unknown type
    if peft_type != PEFT_TYPE_NAME:
        raise ValueError(f"{folder} holds a {peft_type} adapter, not a backattn head; vLLM serves backattn heads.")
    config = BackAttnConfig.from_pretrained(folder)  # the config's own checks, then the weights file's
    check_base_compatibility(config, skeleton)
    check_logits_only(config, folder)
    check_no_logit_rescaling(base_config)
    head = BackAttnHead(config, embedding_dim=config.base_embedding_dim)
    stem = f"base_model.model.{config.head_module}.backattn_heads."
    tensors = load_file(os.path.join(folder, WEIGHTS_NAME))
    head.load_state_dict({key.removeprefix(stem): tensor for key, tensor in tensors.items()})
    return head.requires_grad_(False).eval()


def check_logits_only(config: BackAttnConfig, folder: str) -> None:
    """Refuse a head that reads more than the logits (a config field or value the bank does not compute)."""
    unknown = sorted(set(CONFIG_FIELDS) - set(LOGITS_ONLY_VALUES))
    if unknown:
        raise ValueError(
            f"The head at {folder} has {unknown[0]}={getattr(config, unknown[0], None)!r}, which the vLLM processor "
            "does not implement: it computes heads from the base's next-token logits alone."
        )
    for name, allowed in LOGITS_ONLY_VALUES.items():
        if allowed is not None and getattr(config, name) not in allowed:
            raise ValueError(
                f"The head at {folder} has {name}={getattr(config, name)!r}, which the vLLM processor does not "
                "implement: it computes heads from the base's next-token logits alone."
            )


def check_no_logit_rescaling(base_config: PretrainedConfig) -> None:
    for name in LOGIT_RESCALING:
        value = getattr(base_config, name, None)
        if value not in (None, 0, 1, 1.0):
            raise ValueError(
                f"The base has {name}={value!r}: vLLM applies it to the logits before logits processors, but "
                "transformers applies it after the output layer the head replaces; heads on this base cannot be "
                "served through vLLM."
            )


def read_input_embeddings(model_folder: str | os.PathLike, skeleton: nn.Module) -> torch.Tensor:
    """The base's input-embedding matrix E, (V, d_e), read alone from the folder's safetensors files."""
    embeddings = input_embeddings_of(skeleton)
    name = next(n for n, module in skeleton.named_modules() if module is embeddings)
    prefix = getattr(skeleton, "base_model_prefix", "")
    candidates = [f"{name}.weight", f"{name.removeprefix(prefix + '.')}.weight"]
    folder = Path(model_folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"No *.safetensors file in {folder}; the processor reads the input embeddings from one.")
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                key = next((k for k in candidates if k in handle.keys()), None)  # noqa: SIM118
                if key is not None:
                    return handle.get_tensor(key)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path} could not be read ({error}).") from None
    raise ValueError(f"None of the safetensors files in {folder} holds {candidates[0]} (the input embeddings).")


def normalized_embeddings(embedding: torch.Tensor, eps: float) -> torch.Tensor:
    """N = diag(1 / rms(E_v)) E, in E's dtype, built exactly as `CheckedCaches` builds it (a test holds them equal)."""
    return torch.cat(
        [
            (rows.float() * torch.rsqrt(rows.float().pow(2).mean(dim=-1, keepdim=True) + eps)).to(embedding.dtype)
            for rows in embedding.split(ROWS_PER_VOCAB_CHUNK)
        ]
    )


# -- the bank -------------------------------------------------------------------------------------------------


@dataclass
class GroupPlan:
    """The rows of one step whose heads share one N (one rms_norm_eps); positions index `rows`."""

    frozen: FrozenTensors
    rows: torch.Tensor  # the batch rows of the group
    weightings: list[tuple[BackAttnHead, torch.Tensor]]  # per logit_weighting: a head with it, its positions
    heads: list[tuple[BackAttnHead, torch.Tensor]]  # each head, and the positions of its rows
    singles: list[tuple[BackAttnHead, torch.Tensor]]  # per combine mode of single heads: a head with it, positions


@dataclass
class Plan:
    """How one step's rows are computed: built when the batch changes, reused until it changes again."""

    batch_size: int
    groups: list[GroupPlan] = field(default_factory=list)
    unknown_rows: list[int] = field(default_factory=list)  # rows naming a head that is not loaded


class HeadBank:
    """Heads by name on one base, applied to rows of its logits; `N` once per rms_norm_eps in use."""

    def __init__(self, base_folder: str | os.PathLike, base_config: PretrainedConfig, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:  # fmt: skip
        check_no_logit_rescaling(base_config)
        self.base_config = base_config
        self.skeleton = meta_model(base_config)
        self.device = torch.device(device)
        # E in the model's dtype, as transformers loads it for a base in that dtype.
        self.embedding = read_input_embeddings(base_folder, self.skeleton).to(device=self.device, dtype=dtype)
        self.vocab_size = self.embedding.shape[0]
        self.heads: dict[str, BackAttnHead] = {}
        self._frozen: dict[float, FrozenTensors] = {}  # rms_norm_eps -> N

    def load(self, name: str, folder: str | os.PathLike) -> None:
        """Check and load a head (a one-line ValueError for a bad folder or a taken name; nothing changes)."""
        check_head_name(name)
        if name in self.heads:
            raise ValueError(f"The head {name!r} has already been loaded; unload it first to replace it.")
        head = read_head(folder, self.base_config, self.skeleton)
        self.frozen(head.config.rms_norm_eps)
        self.heads[name] = head.to(self.device)

    def unload(self, name: str) -> None:
        self.heads.pop(name, None)
        in_use = {head.config.rms_norm_eps for head in self.heads.values()}
        for eps in [eps for eps in self._frozen if eps not in in_use]:
            del self._frozen[eps]

    def frozen(self, eps: float) -> FrozenTensors:
        if eps not in self._frozen:
            self._frozen[eps] = FrozenTensors(normalized_embeddings(self.embedding, eps), None, None, build=0)
        return self._frozen[eps]

    def plan(self, row_heads: Mapping[int, str], batch_size: int) -> Plan:
        """Group the rows that name a head by N, then by head; rows at or past `batch_size` are ignored."""
        plan = Plan(batch_size)
        by_eps: dict[float, dict[str, list[int]]] = {}  # eps -> head name -> batch rows
        for row in sorted(row_heads):
            if row >= batch_size:
                continue
            head = self.heads.get(row_heads[row])
            if head is None:
                plan.unknown_rows.append(row)
                continue
            by_eps.setdefault(head.config.rms_norm_eps, {}).setdefault(row_heads[row], []).append(row)

        def positions(members: list[int]) -> torch.Tensor:
            return torch.tensor(members, device=self.device)

        for eps, names in by_eps.items():
            rows = [row for members in names.values() for row in members]
            heads, weightings, singles = [], {}, {}
            start = 0
            for name, members in names.items():
                head, own = self.heads[name], list(range(start, start + len(members)))
                start += len(members)
                heads.append((head, positions(own)))
                weightings.setdefault(head.config.logit_weighting, (head, []))[1].extend(own)
                if head.gate is None:
                    singles.setdefault(head.config.combine, (head, []))[1].extend(own)
            plan.groups.append(
                GroupPlan(
                    frozen=self.frozen(eps),
                    rows=positions(rows),
                    weightings=[(head, positions(own)) for head, own in weightings.values()],
                    heads=heads,
                    singles=[(head, positions(own)) for head, own in singles.values()],
                )
            )
        return plan

    @torch.no_grad()
    def apply(self, logits: torch.Tensor, plan: Plan) -> torch.Tensor:
        """Write the heads' logits into `logits` (rows, V, the base's) in place, for the rows the plan names."""
        for group in plan.groups:
            frozen = group.frozen
            z = logits.index_select(0, group.rows)  # (n, V): the base logits of the group's rows
            mixed = z.new_empty((z.shape[0], frozen.normalized.shape[1]))  # w N, (n, d_e)
            for head, positions in group.weightings:  # the first vocabulary product, once per weighting
                part = z.index_select(0, positions)
                if head.config.logit_weighting == "softmax":
                    weighted = head.weighted_embedding(part, part, frozen)  # softmax(z) N, as the head computes it
                else:  # raw: z N / |V| (transformers forms the same from h, as h (W_out^T N) / |V|)
                    weighted = (part.to(frozen.normalized.dtype) @ frozen.normalized).float() / self.vocab_size
                mixed.index_copy_(0, positions, weighted.to(mixed.dtype))
            q_single = torch.empty_like(mixed)  # q̃ of the single heads' rows, (n, d_e)
            for head, positions in group.heads:  # the small products, head by head on its rows
                q = head.query(mixed.index_select(0, positions).to(head.norm_scale.dtype))  # (k, H, r)
                q_emb = head.query_in_embedding_space(q)  # (k, H, d_e)
                if head.gate is None:
                    q_single.index_copy_(0, positions, q_emb[:, 0].to(q_single.dtype))
                    continue
                base = z.index_select(0, positions) if head.config.combine == "residual" else None
                out = head.mixture_logits(None, q_emb, q, base, frozen, None)  # H score products per row
                logits.index_copy_(0, group.rows.index_select(0, positions), out.to(logits.dtype))
            for head, positions in group.singles:  # the second vocabulary product, once per combine mode
                base = z.index_select(0, positions) if head.config.combine == "residual" else None
                out = head.single_head_logits(q_single.index_select(0, positions), base, frozen)  # z + q̃ N^T
                logits.index_copy_(0, group.rows.index_select(0, positions), out.to(logits.dtype))
        return logits
