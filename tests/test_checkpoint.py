"""Packed checkpoints: `turboquant apply` writes one, `turboquant eval DIR` and the API reload it."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

import quant
from search.cli import main
from studies import Store, export_policy


@pytest.fixture(scope="module")
def study(gptq_study) -> tuple[str, str]:
    # gptq in the space: apply must quantize it with the search's calibration Hessians to reproduce the KL.
    return gptq_study


@pytest.fixture(scope="module")
def applied(study, tmp_path_factory) -> tuple[dict, str]:
    storage, name = study
    store = Store(storage)
    docs = [export_policy(store, name, trial=int(t)) for t in store.front(store.get_study(name))["trial"]]
    formats = [{s["format"] for s in d["matrices"].values()} for d in docs]
    # A front point mixing both formats if there is one, else one with gptq.
    doc = next((d for d, f in zip(docs, formats) if f == {"rtn", "gptq"}), None) or \
        next(d for d, f in zip(docs, formats) if "gptq" in f)
    folder = tmp_path_factory.mktemp("ckpt")
    (folder / "policy.json").write_text(json.dumps(doc))
    assert main(["apply", str(folder / "policy.json"), "--out", str(folder / "out")]) == 0
    return doc, str(folder / "out")


def test_eval_of_the_checkpoint_reproduces_the_stored_metrics(applied, capsys) -> None:
    doc, out = applied
    capsys.readouterr()
    assert main(["eval", out, "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert abs(measured["kl"] - doc["metrics"]["kl"]) < 1e-4
    assert abs(measured["ppl"] - doc["metrics"]["ppl"]) < 1e-3 * doc["metrics"]["ppl"]
    assert measured["bytes"] == doc["metrics"]["bytes"]


def test_packed_bytes_on_disk_equal_packed_tensor_nbytes(applied) -> None:
    doc, out = applied
    ckpt = quant.load_checkpoint(out)
    meta = json.loads((ckpt_path := __import__("pathlib").Path(out) / quant.checkpoint.META_FILE).read_text())
    with safe_open(str(ckpt_path.parent / quant.checkpoint.TENSORS_FILE), "pt") as f:
        on_disk: dict[str, int] = {}
        for key in f.keys():
            t = f.get_tensor(key)
            on_disk[key] = t.numel() * t.element_size()
    assert set(ckpt.packed) == set(doc["matrices"])
    for name, packed in ckpt.packed.items():
        assert sum(on_disk[f"{name}.{b}"] for b in packed.buffers) == packed.nbytes == meta["matrices"][name]["bytes"]
        assert packed.setting.to_dict() == quant.Policy.from_dict(doc).settings[name].to_dict()
    assert sum(p.nbytes for p in ckpt.packed.values()) == doc["metrics"]["bytes"]
    # Everything else in the file is float tensors that stay float: norms, never a weight matrix.
    floats = set(on_disk) - {f"{n}.{b}" for n, p in ckpt.packed.items() for b in p.buffers}
    assert floats and all("norm" in k for k in floats)


def test_reloaded_model_is_a_transformers_model_that_generates(applied) -> None:
    import torch
    from transformers import PreTrainedModel

    _, out = applied
    ckpt = quant.load_checkpoint(out)
    assert isinstance(ckpt.model, PreTrainedModel)
    assert isinstance(ckpt.model.model.layers[0].self_attn.q_proj, quant.QuantLinear)
    assert isinstance(ckpt.model.model.embed_tokens, quant.QuantEmbedding)
    ids = torch.tensor([[72, 101, 108, 108, 111]])
    with torch.inference_mode():
        again = ckpt.model.generate(ids, max_new_tokens=4, do_sample=False)
    assert again.shape == (1, 9)


def test_bad_checkpoint_folder_is_one_line_error(tmp_path, capsys) -> None:
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not a TurboQuant checkpoint" in err and len(err.splitlines()) == 1
