"""Packed checkpoints: `turboquant apply` writes one, `turboquant eval DIR` and the API reload it."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

import quant
from app.cli import main
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


# Writes that are whole or absent (issue 22, item 9): a tiny checkpoint, no search needed.

def _tiny_checkpoint(folder, bits: int = 4):
    from evaluators import load_model

    loaded = load_model("tiny-random-llama")
    policy = quant.Policy.from_dict({"format_version": 1, "provenance": {"model": "tiny-random-llama"},
                                     "matrices": {n: {"format": "rtn", "bits": bits, "group_size": 32}
                                                  for n in quant.weight_matrices(loaded.model)}})
    quant.apply_policy(loaded.model, policy)
    return quant.save_checkpoint(loaded.model, policy, folder)


def test_checkpoint_records_its_tensors_hash_and_refuses_other_tensors(tmp_path) -> None:
    import hashlib
    import shutil

    from quant.checkpoint import META_FILE, TENSORS_FILE

    out = _tiny_checkpoint(tmp_path / "a")
    meta = json.loads((out / META_FILE).read_text())
    data = (out / TENSORS_FILE).read_bytes()
    assert meta["tensors"] == {"file": TENSORS_FILE, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert sorted(p.name for p in out.iterdir()) == [TENSORS_FILE, META_FILE]  # no temporary file left
    other = _tiny_checkpoint(tmp_path / "b", bits=8)
    shutil.copy(other / TENSORS_FILE, out / TENSORS_FILE)  # the tensors of another checkpoint
    with pytest.raises(quant.PolicyError, match="from another checkpoint"):
        quant.load_checkpoint(out)


def test_a_checkpoint_written_before_the_hash_still_loads(tmp_path) -> None:
    from quant.checkpoint import META_FILE

    out = _tiny_checkpoint(tmp_path / "old")
    meta = json.loads((out / META_FILE).read_text())
    del meta["tensors"]
    (out / META_FILE).write_text(json.dumps(meta))
    assert quant.load_checkpoint(out).nbytes == sum(m["bytes"] for m in meta["matrices"].values())


def test_a_crash_while_writing_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch) -> None:
    import safetensors.torch

    from quant.checkpoint import META_FILE, TENSORS_FILE

    out = _tiny_checkpoint(tmp_path / "c")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(tensors, filename, metadata=None):  # half a file, then the process "dies"
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        _tiny_checkpoint(out, bits=8)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # same files, same bytes, no temporary
    monkeypatch.undo()
    assert quant.load_checkpoint(out).packed  # and it still loads
    # A crash between the two renames (new tensors, old config) is refused, not loaded with the wrong weights.
    newer = _tiny_checkpoint(tmp_path / "d", bits=8)
    (out / TENSORS_FILE).write_bytes((newer / TENSORS_FILE).read_bytes())
    with pytest.raises(quant.PolicyError, match="its config says"):
        quant.load_checkpoint(out)
    assert (out / META_FILE).read_bytes() == before[META_FILE]


def test_replace_atomically_keeps_the_old_file_on_error_and_writes_devices_in_place(tmp_path) -> None:
    from quant.checkpoint import replace_atomically

    path = tmp_path / "p.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with replace_atomically(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["p.json"]
    with replace_atomically(path) as tmp:
        assert tmp.parent == path.parent and tmp != path
        tmp.write_text("new")
    assert path.read_text() == "new"
    with replace_atomically("/dev/null") as tmp:  # never a rename over the device
        assert str(tmp) == "/dev/null"
        tmp.write_text("gone")
    import stat

    assert stat.S_ISCHR(__import__("os").stat("/dev/null").st_mode)
    with pytest.raises(IsADirectoryError):
        with replace_atomically(tmp_path):
            pass
    with pytest.raises(NotADirectoryError) as refused:
        with replace_atomically(path / "x.json"):
            pass
    assert refused.value.filename == str(path / "x.json")  # the path asked for, not a temporary name


def test_apply_then_eval_through_the_cli_on_the_tiny_model(tmp_path, corpus, capsys) -> None:
    """apply writes both files (no temporary left beside them), eval reloads and measures them; applied again
    over the same folder, the checkpoint is replaced whole."""
    from evaluators import load_model
    from quant.checkpoint import META_FILE, TENSORS_FILE

    names = list(quant.weight_matrices(load_model("tiny-random-llama").model))
    doc = {"format_version": 1, "provenance": {"model": "tiny-random-llama", "dataset": corpus, "seq_len": 32,
                                               "n_eval": 2, "n_calib": 0},
           "matrices": {n: {"format": "rtn", "bits": 4, "group_size": 32} for n in names}}
    (tmp_path / "p.json").write_text(json.dumps(doc))
    out = tmp_path / "ckpt"
    for _ in range(2):
        assert main(["apply", str(tmp_path / "p.json"), "--out", str(out)]) == 0
        assert sorted(p.name for p in out.iterdir()) == [TENSORS_FILE, META_FILE]
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["bytes"] == quant.load_checkpoint(out).nbytes and measured["kl"] > 0
