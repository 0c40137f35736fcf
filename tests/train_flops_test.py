"""flops: analytic model FLOPs agree with XLA's count of the forward matmuls; peak table."""
import jax
import pytest

from t5x_lite.config import gpt2, t5_1_1
from t5x_lite.models import build_model
from t5x_lite.training import flops


@pytest.mark.parametrize("cfg", [
    gpt2(vocab_size=512, d_model=64, num_heads=4, head_dim=16, d_ff=256, num_layers=2, max_len=64),
    t5_1_1(vocab_size=512, d_model=64, num_heads=4, head_dim=16, d_ff=128, num_layers=2,
           num_decoder_layers=3),
], ids=["gpt", "t5"])
def test_forward_flops_match_xla_cost_analysis(cfg):
    model = build_model(cfg)
    batch = model.dummy_batch(4, 64, 32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))["params"]
    params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params,
                          is_leaf=lambda x: hasattr(x, "value"))
    compiled = jax.jit(lambda p, b: model.logits(p, b)).lower(params, batch).compile()
    xla = compiled.cost_analysis()["flops"]
    # dummy_batch: encoder features of length 64, decoder features of length 32.
    ours = (flops.forward_flops(cfg, 4, 64, 32) if cfg.family == "t5"
            else flops.forward_flops(cfg, 4, 32))
    # XLA also counts softmax, norms and elementwise ops: a little more than the matmuls.
    assert ours < xla < 1.15 * ours, (ours, xla)


def test_train_step_is_three_forwards():
    cfg = gpt2(vocab_size=512, d_model=64, num_heads=4, head_dim=16, d_ff=256, num_layers=2)
    assert flops.train_step_flops(cfg, 2, 16) == 3 * flops.forward_flops(cfg, 2, 16)


def test_peak_flops_table_and_override():
    assert flops.peak_flops_per_device("TPU v4") == 275e12
    assert flops.peak_flops_per_device("TPU v5 lite") == 197e12
    assert flops.peak_flops_per_device("TPU v5p") == 459e12
    assert flops.peak_flops_per_device("TPU v6 lite") == 918e12
    assert flops.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_flops_per_device("NVIDIA H200") == 989e12
    assert flops.peak_flops_per_device("NVIDIA A100-SXM4-40GB") == 312e12
    assert flops.peak_flops_per_device("cpu") is None
    assert flops.peak_flops_per_device("cpu", override=2.8e11) == 2.8e11
