"""Block-wise int4/int8 weights (eigenpatch.export.nbits): the codes mean what ONNX Runtime reads,
and GPTQ beats rounding to nearest where it should, on the inputs it was given."""

from __future__ import annotations

import numpy as np
import pytest

from eigenpatch.quantizer import quantize_gptq, quantize_rtn

pytest.importorskip("onnxruntime")


def correlated_inputs(rng: np.random.Generator, tokens: int, k: int) -> np.ndarray:
    """Inputs with a few strong directions and per-feature scales spread 100x, as activations have."""
    basis = rng.standard_normal((k, k)) * np.logspace(0, -2, k)[:, None]
    return (rng.standard_normal((tokens, k)) @ basis).astype(np.float32)


@pytest.mark.parametrize("bits", [4, 8])
def test_matmul_nbits_reads_our_packed_codes_as_we_dequantize_them(bits):
    """A real ONNX Runtime MatMulNBits on our bytes gives x @ dequantize().T, K padded (K = 40)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    n, k = 24, 40  # K not a multiple of the block: the last block is padded
    q = quantize_rtn(rng.standard_normal((n, k)).astype(np.float32), bits, 16)
    inits = [
        numpy_helper.from_array(q.packed_codes(), "b"),
        numpy_helper.from_array(q.scales, "s"),
        numpy_helper.from_array(q.packed_zeros(), "z"),
    ]
    node = helper.make_node(
        "MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits, block_size=16
    )
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])], inits,
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    )
    x = rng.standard_normal((3, k)).astype(np.float32)
    (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ q.dequantize().T, rtol=1e-5, atol=1e-5)


def test_rounding_error_is_within_half_a_step_and_zero_stays_exact():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    w[:, :5] = 0.0
    q = quantize_rtn(w, 4, 32, search=False)
    step = np.repeat(q.scales, 32, axis=1)
    assert np.all(np.abs(q.dequantize() - w) <= step / 2 + 1e-6)
    assert np.all(q.dequantize()[:, :5] == 0.0)
    assert q.codes.max() <= 15 and q.zeros.max() <= 15


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_output_error_on_its_calibration_inputs(act_order):
    """GPTQ trades weight error for output error: on the inputs whose Gram it saw, ||X (W - Q)^T||
    is well below round-to-nearest's (and its weights' own error is larger)."""
    rng = np.random.default_rng(2)
    x = correlated_inputs(rng, 2048, 96)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    gram = x.astype(np.float64).T @ x
    rtn, gptq = quantize_rtn(w, 4, 32, search=False), quantize_gptq(w, gram, 4, 32, act_order=act_order)

    def out_err(q):
        return float(np.linalg.norm(x @ (w - q.dequantize()).T))

    assert out_err(gptq) < 0.6 * out_err(rtn)
    assert np.linalg.norm(w - gptq.dequantize()) > np.linalg.norm(w - rtn.dequantize())
