"""The compact (top-k) reference: KL by its definition with the rest as one bucket, against full KL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evaluators import Evaluator, LoadedModel, MetricSums, TopKReference, reference_logprobs, reference_nbytes
from evaluators.data import TokenSets
from quant import Policy, QuantSetting

UNIFORM = (QuantSetting("rtn", 2, 64), QuantSetting("rtn", 4, 32), QuantSetting("rtn", 8, None))


def _pair(seed: int, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.log_softmax(3 * torch.randn(*shape, generator=g), -1)
    q = torch.log_softmax(p + torch.randn(*shape, generator=g), -1)
    return p, q


def _topk_metrics(p: torch.Tensor, q: torch.Tensor, k: int, targets: torch.Tensor) -> dict[str, float]:
    ref = TopKReference.from_logprobs(p, k)
    sums = MetricSums()
    sums.add_topk(q, *(torch.from_numpy(a) for a in (ref.logprobs, ref.indices, ref.log_rest)), targets)
    return sums.result()


def test_topk_kl_is_the_bucketed_definition() -> None:
    p, q = _pair(0, (2, 5, 40))
    k = 7
    idx = p.topk(k, -1).indices
    pk, qk = p.gather(-1, idx).double(), q.gather(-1, idx).double()
    rp, rq = 1 - pk.exp().sum(-1), 1 - qk.exp().sum(-1)
    expected = float(((pk.exp() * (pk - qk)).sum(-1) + rp * (rp.log() - rq.log())).mean())
    out = _topk_metrics(p, q, k, torch.zeros(2, 5, dtype=torch.long))
    assert out["kl"] == pytest.approx(expected, rel=1e-5)
    assert out["logit_err"] == pytest.approx(float((pk - qk).abs().mean()), rel=1e-5)


def test_topk_equals_full_when_k_is_the_vocabulary() -> None:
    p, q = _pair(1, (2, 9, 64))
    targets = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    full = MetricSums()
    full.add(q, p, targets)
    ref = TopKReference.from_logprobs(p, 64)
    assert np.all(np.isneginf(ref.log_rest))  # nothing is left outside
    assert _topk_metrics(p, q, 64, targets) == pytest.approx(full.result(), rel=1e-6)


def test_topk_kl_never_exceeds_full_kl_and_grows_with_k() -> None:
    # Merging outcomes into one bucket can only lose information (the log-sum inequality).
    p, q = _pair(3, (2, 9, 64))
    targets = torch.zeros(2, 9, dtype=torch.long)
    full = MetricSums()
    full.add(q, p, targets)
    kls = [_topk_metrics(p, q, k, targets)["kl"] for k in (1, 4, 16, 48, 64)]
    assert kls == sorted(kls) and kls[-1] == pytest.approx(full.result()["kl"], rel=1e-6)
    assert kls[0] < 0.9 * kls[-1]


def test_reference_keeps_full_logprobs_when_k_covers_the_vocabulary(evaluator) -> None:
    # The tiny model's 256 words: top-512 is the full reference (the same figures, the same cost).
    evaluator.restore_float()  # the shared model may be left quantized by the test before
    ref = reference_logprobs(evaluator.model, evaluator.tokens, topk=512)
    assert isinstance(ref, np.ndarray) and np.array_equal(ref, evaluator.reference)


def test_tiny_model_topk_kl_tracks_full_kl(evaluator) -> None:
    # Measured on this model: top-128 of 256 words gives KL 0.8-1.2 % below full for 2-, 4- and 8-bit.
    evaluator.restore_float()
    top = Evaluator(evaluator.loaded, evaluator.tokens, reference_topk=128)
    names = list(evaluator.matrices)
    for setting in UNIFORM:
        policy = Policy.uniform(names, setting)
        full, part = evaluator.evaluate(policy), top.evaluate(policy)
        assert full["kl"] * 0.97 < part["kl"] <= full["kl"] * (1 + 1e-6)
        assert part["ppl"] == full["ppl"] and part["top1"] == full["top1"]
    top.restore_float()


def test_reference_bytes_full_and_topk() -> None:
    p = torch.log_softmax(torch.randn(3, 7, 1000), -1)
    ref = TopKReference.from_logprobs(p, 16)
    assert ref.nbytes == reference_nbytes(3, 7, 1000, 16) == 3 * 7 * (16 * 8 + 4)
    assert reference_nbytes(3, 7, 1000, None) == reference_nbytes(3, 7, 1000, 1000) == p.numpy().nbytes
    assert ref.shape == (3, 7, 1000) and len(ref) == 3


def _wide_vocab_model(vocab: int) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         initializer_range=0.3, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    return LoadedModel("wide-vocab", model, lambda text: np.zeros(0, dtype=np.int64), "wide-vocab")


def test_a_262k_vocabulary_model_evaluates_on_the_cpu_with_topk() -> None:
    vocab, windows, seq_len, k = 262_144, 2, 32, 512
    loaded = _wide_vocab_model(vocab)
    rng = np.random.default_rng(0)
    tokens = TokenSets(rng.integers(0, vocab, (windows, seq_len)), np.zeros((0, seq_len), np.int64), "random")
    ev = Evaluator(loaded, tokens, reference_topk=k)
    assert isinstance(ev.reference, TopKReference) and ev.reference.k == k
    full_bytes = reference_nbytes(windows, seq_len - 1, vocab, None)
    assert ev.reference.nbytes == reference_nbytes(windows, seq_len - 1, vocab, k)
    assert full_bytes > 60 * ev.reference.nbytes  # 4V = 1 MiB a position against 8k + 4 = 4 KiB
    # A real model's 8 x 1,023 positions: 8.6 GB full, 34 MB top-512.
    assert reference_nbytes(8, 1023, vocab, None) > 8.5e9 > 250 * reference_nbytes(8, 1023, vocab, k)
    names = list(ev.matrices)
    kl8 = ev.evaluate(Policy.uniform(names, QuantSetting("rtn", 8, None)))
    kl2 = ev.evaluate(Policy.uniform(names, QuantSetting("rtn", 2, None)))
    assert 0 <= kl8["kl"] < 0.05 < kl2["kl"] and math.isfinite(kl2["ppl"])
    assert kl2["top1"] < kl8["top1"]


def test_the_object_store_shares_a_topk_reference_without_copying(local_ray) -> None:
    ref = TopKReference.from_logprobs(torch.log_softmax(torch.randn(2, 5, 300), -1), 32)
    back = local_ray.get(local_ray.put(ref))
    for a, b in zip((ref.logprobs, ref.indices, ref.log_rest), (back.logprobs, back.indices, back.log_rest)):
        assert np.array_equal(a, b) and not b.flags.writeable  # read-only: a view of the shared memory


def test_rest_mass_is_resolved_when_little_is_left() -> None:
    # Peaked rows: the top-5 hold all but 4e-4 to 4e-8 of the mass, below what 1 - sum(float32) resolves.
    from evaluators.reference import rest_logmass

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 6, 300, generator=g, dtype=torch.float64)
    logits[..., :5] += torch.linspace(12, 22, 12, dtype=torch.float64).reshape(2, 6, 1)
    lp = torch.log_softmax(logits, -1)
    idx = torch.arange(5).expand(2, 6, 5)
    expected = torch.logsumexp(lp[..., 5:], -1)  # float64, summed over the words left out
    assert float(expected.exp().max()) < 1e-3  # every row below the float64 sum's threshold
    got = rest_logmass(lp.float(), idx).double()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    flat = torch.log_softmax(torch.randn(2, 6, 300, generator=g), -1)
    assert torch.allclose(rest_logmass(flat, idx), torch.logsumexp(flat[..., 5:], -1), atol=1e-6)


def test_search_with_a_topk_reference_measures_with_it_and_resumes_only_with_it(corpus, local_ray, tmp_path,
                                                                                  capsys) -> None:
    from evaluators.context import DataConfig
    from search.cli import main
    from studies import Store

    storage = f"sqlite:///{tmp_path}/k.db"
    argv = ["search", "--model", "tiny-random-llama", "--dataset", corpus, "--seq-len", "64", "--eval-seqs", "4",
            "--calib-seqs", "0", "--budget", "4.5bpw", "--workers", "2", "--trials", "3", "--storage", storage,
            "--study", "k", "--reference-topk", "128", "--device", "cpu"]
    assert main(argv) == 0
    store = Store(storage)
    row = store.get_study("k")
    assert row.provenance["reference_topk"] == 128
    frame = store.trials_frame(row)
    trial = store.trial(row, int(frame[frame["state"] == "complete"]["trial"].iloc[0]))
    loaded, tokens = DataConfig(model="tiny-random-llama", dataset=corpus, seq_len=64, n_eval=4, n_calib=0).load()
    here = Evaluator(loaded, tokens, reference_topk=128).evaluate(Policy.from_dict(trial.policy))
    assert trial.kl == pytest.approx(here["kl"], rel=1e-5)  # the workers measured against top-128
    capsys.readouterr()
    assert main([*argv[:-4], "--reference-topk", "64"]) == 2
    assert "different reference_topk" in capsys.readouterr().err
