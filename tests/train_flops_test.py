"""flops: analytic model FLOPs agree with XLA's count of the forward matmuls and with the
estimator's count (one function computes both); peak table by device kind."""
import jax
import jax.numpy as jnp
import pytest

from t5x_lite import estimate_flops
from t5x_lite.config import bert, gpt2, t5_1_1
from t5x_lite.models import build_model
from t5x_lite.training import flops

TINY = {
    "gpt": gpt2(vocab_size=512, d_model=64, num_heads=4, head_dim=16, d_ff=256, num_layers=2,
                max_len=64),
    "t5": t5_1_1(vocab_size=512, d_model=64, num_heads=4, head_dim=16, d_ff=128, num_layers=2,
                 num_decoder_layers=3),
    "bert": bert(vocab_size=512, d_model=256, num_heads=4, head_dim=64, d_ff=512, num_layers=2,
                 max_len=128),
}


def _abstract_params(model, batch):
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))["params"]
    return jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params,
                        is_leaf=lambda x: hasattr(x, "value"))


@pytest.mark.parametrize("name", ["gpt", "t5", "bert"])
def test_forward_flops_match_xla_cost_analysis(name):
    cfg = TINY[name]
    model = build_model(cfg)
    batch = model.dummy_batch(4, 64, 32)
    params = _abstract_params(model, batch)
    kwargs = {}
    if name == "bert":  # the MLM loss's head: 8 scored positions per row
        kwargs["predict_positions"] = jnp.zeros((4, 8), jnp.int32)
    compiled = jax.jit(lambda p, b: model.logits(p, b, **kwargs)).lower(params, batch).compile()
    xla = compiled.cost_analysis()["flops"]
    # dummy_batch: encoder features of length 64, decoder features of length 32.
    ours = {"t5": lambda: flops.forward_flops(cfg, 4, 64, 32),
            "gpt": lambda: flops.forward_flops(cfg, 4, 32),
            "bert": lambda: flops.forward_flops(cfg, 4, 64, predictions=8)}[name]()
    # XLA also counts softmax, norms and elementwise ops: a little more than the matmuls.
    assert ours < xla < 1.15 * ours, (ours, xla)


def test_train_step_is_three_forwards():
    cfg = gpt2(vocab_size=512, d_model=64, num_heads=4, head_dim=16, d_ff=256, num_layers=2)
    assert flops.train_step_flops(cfg, 2, 16) == 3 * flops.forward_flops(cfg, 2, 16)


@pytest.mark.parametrize("name,args", [
    ("bert", (4, 128, None, 19)), ("bert", (4, 128, None, 0)), ("bert", (4, 128, None, 500)),
    ("gpt", (4, 64, None, 0)), ("t5", (4, 128, 32, 0)),
], ids=["bert_k19", "bert_all", "bert_k_over_t", "gpt", "t5"])
def test_trainer_flops_equal_the_estimators(name, args):
    # The trainer's MFU and `python -m t5x_lite.estimate` must count the same model FLOPs.
    cfg = TINY[name]
    est = estimate_flops.step_flops(cfg, *args)
    assert flops.train_step_flops(cfg, *args) == est.train
    assert flops.forward_flops(cfg, *args) == est.forward


@pytest.mark.parametrize("predictions,scored", [(19, 19), (0, 128), (128, 128), (500, 128)])
def test_bert_flops_equal_a_hand_count(predictions, scored):
    # bert.Bert: encoder -> (scored positions) -> mlm_dense d x d -> gelu -> norm -> tied d x V.
    cfg = TINY["bert"]  # V=512, D=256, H*K=256, F=512, gelu (1 input projection), L=2
    b, t, d, hk, f, v = 4, 128, 256, 256, 512, 512
    layers = 2 * (b * t * (2 * 4 * d * hk + 2 * 2 * d * f) + 4 * b * t * t * hk)
    head = 2 * b * scored * (d * d + d * v)
    assert flops.forward_flops(cfg, b, t, predictions=predictions) == layers + head
    assert flops.train_step_flops(cfg, b, t, predictions=predictions) == 3 * (layers + head)


def test_peak_flops_by_device_kind():
    # The strings jax reports as `device.device_kind` (TPU: v5e is "TPU v5 lite", v5p "TPU v5").
    table = {
        "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12,
        "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
        "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100-SXM4-80GB": 312e12,
        "NVIDIA A100-PCIE-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12,
        "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H200": 989e12,
        "NVIDIA GH200 480GB": 989e12,
    }
    for kind, peak in table.items():
        assert flops.peak_flops_per_device(kind) == peak, kind
    # Unlisted kinds give no MFU rather than a neighbour's figure: the H100 NVL's dense peak is
    # below the SXM part's; a v4i ("TPU v4 lite") is not a v4; a MIG slice is not the whole GPU.
    for kind in ("NVIDIA H100 NVL", "NVIDIA H200 NVL", "TPU v4 lite", "TPU v3", "TPU7x",
                 "NVIDIA H100 80GB HBM3 MIG 1g.10gb", "cpu"):
        assert flops.peak_flops_per_device(kind) is None, kind
    assert flops.peak_flops_per_device("cpu", override=2.8e11) == 2.8e11
    assert flops.peak_flops_per_device("NVIDIA H100 NVL", override=8e14) == 8e14


def test_unknown_device_kind_is_logged_once(caplog):
    flops._warned.discard("NVIDIA H100 NVL")
    with caplog.at_level("WARNING"):
        for _ in range(2):
            assert flops.peak_flops_per_device("NVIDIA H100 NVL") is None
    msgs = [r.getMessage() for r in caplog.records if "'NVIDIA H100 NVL'" in r.getMessage()]
    assert len(msgs) == 1 and "set train.peak_flops" in msgs[0], msgs
