"""Model fingerprints come from the weights' content and are computed once per checkpoint."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import evaluators.fingerprint as fp
from evaluators import load_model


@pytest.fixture()
def counted(monkeypatch, tmp_path) -> list[int]:
    """A private fingerprint cache, and how many times the tensors were hashed."""
    monkeypatch.setenv("TURBOQUANT_CACHE", str(tmp_path / "cache"))
    calls: list[int] = []
    real = fp.tensor_hash
    monkeypatch.setattr(fp, "tensor_hash", lambda model: calls.append(1) or real(model))
    return calls


def _folder(path, scale: float | None = None):
    """The tiny model saved as a local model folder (with a tokenizer), its weights scaled by ``scale``."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = load_model("tiny-random-llama").model
    if scale is not None:
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.mul_(scale)
    model.save_pretrained(path)
    vocab = {chr(i): i for i in range(32, 127)} | {"<unk>": 0}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    assert AutoTokenizer.from_pretrained(path)("ab")["input_ids"]
    return path


def test_same_shapes_other_weights_other_fingerprint_and_computed_once(tmp_path, counted) -> None:
    a, b = _folder(tmp_path / "a"), _folder(tmp_path / "b", scale=1.001)
    assert {p.name: p.stat().st_size for p in a.iterdir()} == {p.name: p.stat().st_size for p in b.iterdir()}
    counted.clear()  # building the folders fingerprinted the in-memory tiny model
    fa, fb = load_model(str(a)).fingerprint, load_model(str(b)).fingerprint
    assert fa != fb  # the old name-and-size fingerprint made these equal
    assert len(counted) == 2
    assert load_model(str(a)).fingerprint == fa and len(counted) == 2  # cached: not hashed again
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)  # another folder, the same content: hashed once more, the same answer
    assert load_model(str(copy)).fingerprint == fa and len(counted) == 3
    weights = a / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert load_model(str(a)).fingerprint == fa and len(counted) == 4  # a touched file: hashed again


def test_built_in_models_are_fingerprinted_by_their_tensors(counted) -> None:
    model = load_model("tiny-random-llama")
    assert model.fingerprint == load_model("tiny-random-llama").fingerprint
    assert len(model.fingerprint) == 16
    with torch.no_grad():
        model.model.model.layers[1].self_attn.q_proj.weight[0, 0] += 1e-3
    assert fp.model_fingerprint(model.model, tag="tiny-random-llama:bytes") != model.fingerprint
    # The tokenizer is part of it: the same tensors under another tag are another model.
    assert fp.model_fingerprint(load_model("tiny-random-llama").model, tag="other") != model.fingerprint


def test_tensor_hash_covers_dtype_and_shape() -> None:
    a = torch.nn.Linear(4, 4, bias=False)
    b = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        b.weight.copy_(a.weight)
    assert fp.tensor_hash(a) == fp.tensor_hash(b)
    assert fp.tensor_hash(a) != fp.tensor_hash(b.to(torch.bfloat16))
    c = torch.nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        c.weight.copy_(a.weight.reshape(2, 8))
    assert fp.tensor_hash(a) != fp.tensor_hash(c)
