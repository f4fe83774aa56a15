"""What a search is asked to do: one validated request that the CLI and the HTTP API both build.

Every option of ``turboquant search`` (and of ``turboquant sensitivity``, which measures on the
same model, data and space) is a field here, with its default, bounds and help stated once: the
CLI's flags are generated from these fields (:mod:`app.cli_args`), the API's ``POST /studies``
body is this model, and the driver reads it. Adding an option is adding a field.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evaluators.context import DataConfig
from evaluators.errors import UserError
from evaluators.models import Dtype, resolve_dtype
from search.budget import parse_budget
from search.kv_space import DEFAULT_KV_BITS, DEFAULT_KV_FORMATS, KVSpace, kv_candidates
from search.placement import Device
from search.samplers import SAMPLERS
from search.space import GRANULARITIES, SearchSpace, check_granularity
from search.targets import DEFAULT_TARGET, TARGETS, get_target

__all__ = ["MAX_LIST", "MAX_SEED", "MeasureRequest", "SearchRequest", "SENSITIVITY_METHODS", "STUDY_NAME",
           "check_study_name", "derived_study_name"]

SENSITIVITY_METHODS = ("measured", "proxy")
GGUF_FORMATS = "gguf"  # the --formats shorthand for llama.cpp's block types
# Entries a list option may have: far more than any real space (bits 2..8, a few group sizes, the formats),
# and checked by pydantic before any entry is looked at, so a list of millions is refused in microseconds.
MAX_LIST = 64
MAX_SEED = 2**32  # numpy's generators take seeds below 2**32
# A study name is part of the API's URLs and of file names: a safe alphabet, one line, at most 128 characters
# (\Z, not $: "$" also matches before a trailing newline).
STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_LIST_FIELDS = ("bits", "groups", "formats", "kv_formats", "kv_bits")


# The error-feedback variant of each block type in the 'gguf' space: act_order as in the default gptq
# recipe (SmolLM2 layer 7, 64 windows of 256 tokens: output error 0.42-0.49x the plain encoding's with it,
# 0.49-0.56x without, on q4_0, iq4_nl, q2_k, q3_k; tests/test_gguf_gptq.py).
GGUF_GPTQ = "act_order+gptq"


def gguf_formats() -> list[str]:
    """What ``--formats gguf`` means: every llama.cpp block type, then each with ``+act_order+gptq``."""
    from quant.gguf import BLOCK_TYPES

    return list(BLOCK_TYPES) + [f"{name}+{GGUF_GPTQ}" for name in BLOCK_TYPES]


def _refuse(check: Any, value: Any) -> Any:
    """Runs a check that raises :class:`UserError` as a pydantic validation (its message kept)."""
    try:
        check(value)
    except UserError as exc:
        raise ValueError(str(exc)) from None
    return value


def _one_of(value: str, known: tuple[str, ...], what: str) -> str:
    """``value`` if it is one of ``known``, else the validation error naming the choices."""
    if value not in known:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(known)}")
    return value


def _unique(values: list[Any]) -> list[Any]:
    """The list without repeats, in its first order: ``--bits 4,4`` is ``--bits 4``."""
    return list(dict.fromkeys(values))


def check_study_name(name: str) -> str:
    """``name`` if it is a valid study name, else :class:`UserError` saying the rule."""
    if not isinstance(name, str) or not STUDY_NAME.match(name):
        shown = repr(name) if len(str(name)) <= 40 else repr(str(name)[:40]) + f"... ({len(str(name))} characters)"
        raise UserError(f"study name {shown}: use letters, digits, '.', '_' and '-', at most 128 characters, "
                        f"starting with a letter or digit")
    return name


def derived_study_name(model: str, budget: str) -> str:
    """``MODEL-BUDGET`` made a valid study name: other characters (a path's slashes, spaces) become ``_``,
    leading symbols are dropped, and it is cut to 128 characters."""
    name = _NOT_IN_NAME.sub("_", f"{model.replace('/', '_')}-{budget}").lstrip("._-")[:128]
    return name or "study"


class MeasureRequest(BaseModel):
    """The model, the data and the settings allowed per unit: what a sensitivity table is measured on."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(DEFAULT_TARGET, description="the runtime the result is for; it sets the formats, bits and "
                        "groups (each still overridable within what it runs) and the export: "
                        + "; ".join(f"{t.name}: {t.runtime}, exported as {t.export}" for t in TARGETS.values()))
    model: str = Field("smollm2-135m", description="alias, local folder or Hugging Face id")
    dataset: str = Field("shakespeare", description="'shakespeare' (embedded), a text file, or hf:NAME[:CONFIG]")
    seq_len: int = Field(256, ge=2, le=1 << 20, description="tokens per window")
    eval_seqs: int = Field(8, ge=1, le=1 << 20, description="evaluation windows of seq-len tokens")
    calib_seqs: int = Field(8, ge=0, le=1 << 20, description="calibration windows (disjoint from evaluation)")
    seed: int = Field(0, ge=0, lt=MAX_SEED, description="picks the windows")
    trust_remote_code: bool = Field(False, description="allow models that run their own code")
    dtype: Dtype = Field("auto", description="what the float model is loaded in: auto = as saved on a GPU, float32 "
                                             "on the CPU (half precision is emulated on most CPUs); the reference's "
                                             "log-probs are float32 either way")
    # The defaults are the recipe the README's "Why the defaults" measures; every one can be overridden.
    bits: list[int] = Field([2, 3, 4, 8], min_length=1, max_length=MAX_LIST, description="allowed bit-widths")
    groups: list[int | None] = Field([64, 128], min_length=1, max_length=MAX_LIST,
                                     description="allowed group sizes; 'ch' (API: null) = per output channel")
    formats: list[str] = Field(["rtn", "gptq+act_order+clip"], min_length=1, max_length=MAX_LIST,
                               description="allowed quantizers: rtn, gptq, turbo, lloyd, vq, ternary; boolean "
                                           "options with '+' (gptq+clip); or llama.cpp's block types (q4_k, "
                                           "q8_0, ...; 'gguf' for all of them, each also with +act_order+gptq)")
    granularity: str = Field("block", description=f"what shares one setting: {', '.join(GRANULARITIES)} "
                                                   "(block: each layer's attention and MLP)")
    sensitivity_seqs: int | None = Field(None, ge=1, le=1 << 20, description="measure sensitivity on the first N "
                                         "evaluation windows only (default: all)")
    sensitivity_method: str = Field("proxy", description="proxy: predicted from one backward pass per "
                                    "calibration window (diagonal Fisher, gptq's corrected by its inputs' "
                                    "correlations) and quantizing every setting once; measured: one forward per "
                                    "unit and setting, on the workers; both stored, reused by later studies")

    @model_validator(mode="before")
    @classmethod
    def _target_defaults(cls, data: Any) -> Any:
        # The target's formats / bits / groups where the user gave none (an unknown target is refused by
        # the field's own check, below).
        target = data.get("target", DEFAULT_TARGET) if isinstance(data, dict) else None
        if isinstance(target, str) and target in TARGETS:  # anything else: the field check refuses it
            defaults = get_target(target).defaults()
            data = {**{k: v for k, v in defaults.items() if k in cls.model_fields}, **data}
        return data

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        return _one_of(v, tuple(TARGETS), "target")

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        from evaluators.models import check_model_name

        return _refuse(check_model_name, v)

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: list[str]) -> list[str]:
        # "gguf": every llama.cpp block type, plainly and with GPTQ's error feedback onto its grid (each
        # unit then climbs the ones its rows fit).
        return _unique([name for f in v for name in (gguf_formats() if f == GGUF_FORMATS else (f,))])

    @field_validator("bits", "groups")
    @classmethod
    def _no_repeats(cls, v: list[Any]) -> list[Any]:
        return _unique(v)

    @field_validator("granularity")
    @classmethod
    def _granularity(cls, v: str) -> str:
        return _refuse(check_granularity, v)

    @field_validator("sensitivity_method")
    @classmethod
    def _method(cls, v: str) -> str:
        return _one_of(v, SENSITIVITY_METHODS, "sensitivity method")

    @model_validator(mode="after")
    def _settings(self) -> "MeasureRequest":
        # Unsupported formats / bits / group sizes are refused now, not after minutes of loading.
        _refuse(lambda r: SearchSpace({}, tuple(r.bits), tuple(r.groups), tuple(r.formats)), self)
        refused = get_target(self.target).refusals(self.formats, self.bits, self.groups, self.granularity,
                                                   getattr(self, "kv_formats", []))
        if refused:
            raise ValueError(f"--target {self.target} cannot run: {'; '.join(refused)}")
        return self

    def data_config(self, device: str = "cpu") -> DataConfig:
        """The model and data part, as studies record it in their provenance, for models run on ``device``
        (``cpu`` or ``cuda``: what ``--dtype auto`` loads depends on it)."""
        dtype = resolve_dtype(self.dtype, device, self.model, trust_remote_code=self.trust_remote_code)
        return DataConfig(model=self.model, dataset=self.dataset, seq_len=self.seq_len, n_eval=self.eval_seqs,
                          n_calib=self.calib_seqs, seed=self.seed, trust_remote_code=self.trust_remote_code,
                          dtype=dtype)

    def space(self, matrices: dict[str, tuple[int, int]]) -> SearchSpace:
        """The search space over ``matrices`` (name -> (out, in)) that these options allow."""
        return SearchSpace(matrices, tuple(self.bits), tuple(self._groups(matrices)), tuple(self.formats),
                           granularity=self.granularity, target=self.target)

    def _groups(self, matrices: dict[str, tuple[int, int]]) -> list[int | None]:
        """The group sizes the target holds on these matrices' rows."""
        return get_target(self.target).groups_for(self.groups, {w for _, w in matrices.values()})

    @classmethod
    def from_data(cls, data: DataConfig, **options: Any) -> "MeasureRequest":
        """A request on ``data`` (the inverse of :meth:`data_config`) with the other ``options``."""
        return cls(model=data.model, dataset=data.dataset, seq_len=data.seq_len, eval_seqs=data.n_eval,
                   calib_seqs=data.n_calib, seed=data.seed, trust_remote_code=data.trust_remote_code,
                   dtype=data.dtype, **options)


class SearchRequest(MeasureRequest):
    """A search against a memory budget: the options of ``turboquant search`` and ``POST /studies``."""

    study: str | None = Field(None, description="study name: letters, digits, '.', '_' and '-', at most 128 "
                                                     "(default: MODEL-BUDGET)")
    budget: str = Field(description="e.g. 3.0bpw or 70MB")
    trials: int = Field(20, ge=1, le=1_000_000, description="finished trials the study should have, complete or "
                                                            "pruned by multi-fidelity (resume adds up to it)")
    sampler: str = Field("evo", description="nsga2, tpe, gp, evo (budget-aware, ours) or random")
    workers: int | None = Field(None, ge=1, le=4096, description="Ray workers, each with its own copy of the model "
                                "(default: chosen: on the CPU one per core, each on cores/workers torch threads; on "
                                "a GPU 2 per GPU; fewer where host or GPU memory holds fewer, never more than the "
                                "trials to run)")
    memory_limit: str | None = Field(None, description="memory the search may use, e.g. 8GB (default: available)")
    multi_fidelity: bool | None = Field(None, description="score children on the first batch of windows and stop "
                                                          "the hopeless ones there (default: on for the evo sampler)")
    sensitivity: bool = Field(True, description="score every unit at every setting first, enqueue DP/greedy "
                                                "seeds solved from it and guide evo by it (see --sensitivity-method)")
    reference_topk: int | None = Field(None, ge=0, le=1 << 24, description="compare with the float model's K "
                                       "most likely words per position, the rest's mass and 64 words drawn from the "
                                       "rest (8K+516 bytes a position instead of 4 x vocabulary; SmolLM2 at K=512: KL "
                                       "0.997-1.002x the full KL); 0: the full log-probs (default: full where "
                                       "they take up to 1 GB, else K=512)")
    device: Device = Field("auto", description="where workers run: cuda (each asks Ray for a share of a GPU), "
                                               "cpu, or auto (cuda when there is a GPU)")
    split_model: bool = Field(False, description="let a model that one GPU cannot hold spread over several, each "
                              "worker taking as many whole GPUs as it needs (accelerate's device map; default: "
                              "such a model is refused with the estimate)")
    context: int | None = Field(None, ge=1, le=1 << 24, description="tokens of KV cache the deployment holds: the "
                                "budget (a size, e.g. 150MB) then counts weights + cache at this context, and each "
                                "attention module's key and value precision is searched with the weights "
                                "(default: weights only, the cache not counted)")
    batch: int = Field(1, ge=1, le=1 << 16, description="sequences cached at once (with --context)")
    kv_formats: list[str] = Field(list(DEFAULT_KV_FORMATS), min_length=1, max_length=MAX_LIST,
                                  description="KV cache formats (with --context): turbo (rotation + Lloyd-Max), "
                                              "turbo+qjl (keys: 1 bit on the QJL residual), rtn_token, rtn_channel "
                                              "(keys, KIVI), float (16-bit)")
    kv_bits: list[int] = Field(list(DEFAULT_KV_BITS), min_length=1, max_length=MAX_LIST,
                               description="KV cache bit-widths (with --context)")

    @field_validator("study")
    @classmethod
    def _study(cls, v: str | None) -> str | None:
        return v if v is None else _refuse(check_study_name, v)

    @field_validator("kv_formats", "kv_bits")
    @classmethod
    def _no_repeats_kv(cls, v: list[Any]) -> list[Any]:
        return _unique(v)

    @field_validator("budget", "memory_limit")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        # The form only: what a bpw budget means in bytes is known once the model is loaded.
        return v if v is None else _refuse(lambda text: parse_budget(text, 8), v)

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, v: str) -> str:
        return _one_of(v, SAMPLERS, "sampler")

    @model_validator(mode="after")
    def _cache(self) -> "SearchRequest":
        _refuse(lambda r: kv_candidates(tuple(r.kv_formats), tuple(r.kv_bits)), self)
        if self.context is not None and self.budget.strip().lower().endswith("bpw"):
            raise ValueError(f"with --context the budget covers the weights and the KV cache: give it as a size "
                             f"(e.g. 150MB), not {self.budget!r} bits per weight")
        return self

    def space(self, matrices: dict[str, tuple[int, int]], attention: dict[str, Any] | None = None) -> SearchSpace:
        """The search space over ``matrices``; with ``--context``, also over the KV cache of the
        ``attention`` modules (``evaluators.kv_attention.attention_modules``)."""
        kv = None
        if self.context is not None:
            if attention is None:
                raise ValueError("a search with --context needs the model's attention modules")
            kv = KVSpace(attention, tuple(self.kv_formats), tuple(self.kv_bits), self.context, self.batch)
        return SearchSpace(matrices, tuple(self.bits), tuple(self._groups(matrices)), tuple(self.formats),
                           granularity=self.granularity, kv=kv, target=self.target)

    def space_of(self, model: Any) -> SearchSpace:
        """:meth:`space` over a loaded float model's weight matrices (and, with ``--context``, its attention
        modules): what the driver searches and what a worker predicts the proxy over."""
        import quant
        from evaluators.kv_attention import attention_modules

        return self.space(quant.weight_matrices(model), attention_modules(model) if self.context is not None else None)

    @property
    def study_name(self) -> str:
        """The study's name: as given, else ``MODEL-BUDGET`` made a valid name (:func:`derived_study_name`)."""
        return self.study or derived_study_name(self.model, self.budget)

    @property
    def memory_limit_bytes(self) -> int | None:
        return None if self.memory_limit is None else parse_budget(self.memory_limit, 8)

    @property
    def uses_multi_fidelity(self) -> bool:
        """Multi-fidelity as asked, or by default for evo, whose children all sit near the budget."""
        return self.multi_fidelity if self.multi_fidelity is not None else self.sampler == "evo"
