"""The embedded SmolLM2-135M (slow: converts the GGUF once, ~40 s, then a few forwards)."""

import pytest

from evaluators import Evaluator
from evaluators.context import DataConfig
from quant import Policy, QuantSetting

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2() -> Evaluator:
    loaded, tokens = DataConfig(model="smollm2-135m", seq_len=128, n_eval=2, n_calib=1).load()
    assert loaded.model.config.num_hidden_layers == 30 and loaded.model.config.vocab_size == 49152
    return Evaluator(loaded, tokens)


def test_q4_1_grid_is_reproduced_exactly_and_two_bits_hurt(smollm2: Evaluator) -> None:
    names = list(smollm2.matrices)
    assert len(names) == 30 * 7 + 1  # tied LM head shares the embedding
    # The float weights are dequantized Q4_1 (4-bit asymmetric, blocks of 32 along the input):
    # rtn with that setting lands on the same grid. The embedding was Q8_0, so give it 8 bits.
    q4 = {n: QuantSetting("rtn", 4, 32) for n in names}
    q4["model.embed_tokens"] = QuantSetting("rtn", 8, 32)
    exact = smollm2.evaluate(Policy(q4))
    assert exact["kl"] < 1e-3 and exact["top1"] > 0.98
    two = smollm2.evaluate(Policy.uniform(names, QuantSetting("rtn", 2, 64)))
    assert two["kl"] > 1.0 and two["kl"] > 100 * exact["kl"]
    assert smollm2.numel == 134_479_872  # all 134,515,008 parameters but the 35,136 norm weights
