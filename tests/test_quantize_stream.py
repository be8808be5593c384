"""streamed_dynamic_int8 against onnxruntime's quantize_dynamic on a small hand-made graph with the cases
the SD UNet does not all show: a transB Gemm quantized (dynamic mode turns it into a MatMul on a
transposed weight), one weight used by two MatMuls, one activation feeding two MatMuls, an excluded
MatMul, an activation x activation MatMul, weights and Constant nodes both under and over the external-data
threshold.
The same on the tiny SD models, as the build quantizes them: tests/test_sd.py."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge import quantize


def _model(path):
    rng = np.random.default_rng(0)
    w = lambda name, *shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)  # noqa: E731
    nodes = [
        helper.make_node("MatMul", ["x", "w_big"], ["h1"], "mm_shared_a"),
        helper.make_node("MatMul", ["x", "w_small"], ["h2"], "mm_small"),
        helper.make_node("Gemm", ["h1", "w_gemm", "b_gemm"], ["h3"], "gemm", transB=1),
        helper.make_node("MatMul", ["h3", "w_big2"], ["h4"], "mm_excluded"),
        helper.make_node("MatMul", ["h4", "w_big2"], ["h5"], "mm_shared_w"),
        helper.make_node("Transpose", ["h5"], ["h5t"], "t", perm=[1, 0]),
        helper.make_node("MatMul", ["h5", "h5t"], ["gram"], "mm_activations"),
        helper.make_node("Constant", [], ["c_small"], "c_small",
                         value=numpy_helper.from_array(np.array([1, 2, 3], np.float32), "v")),
        helper.make_node("Constant", [], ["c_big"], "c_big", value=w("c", 3, 300)),
        helper.make_node("Add", ["h2", "c_small"], ["h2c"], "add"),
        helper.make_node("MatMul", ["h2c", "c_big"], ["y2"], "mm_constant"),  # B not an initializer: float
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("gram", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)],
        [w("w_big", 64, 48), w("w_small", 64, 3), w("w_gemm", 40, 48), w("b_gemm", 40), w("w_big2", 40, 40)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=1024)


@pytest.mark.parametrize("weight_type, reduce_range", [("QInt8", False), ("QInt8", True), ("QUInt8", False)])
def test_streamed_graph_and_weights_are_quantize_dynamics(tmp_path, monkeypatch, weight_type, reduce_range):
    from onnxruntime import InferenceSession

    src = tmp_path / "src" / "m.onnx"
    src.parent.mkdir()
    _model(src)
    results, streamed = {}, []
    original = quantize.streamed_dynamic_int8
    monkeypatch.setattr(quantize, "streamed_dynamic_int8", lambda *a, **k: streamed.append(a[1]) or original(*a, **k))
    monkeypatch.setattr(quantize, "EXTERNAL_DATA_THRESHOLD", 0)  # onnxruntime saves as it does a big model
    for how, threshold in (("library", float("inf")), ("streamed", 0)):
        monkeypatch.setattr(quantize, "STREAM_THRESHOLD", threshold)
        (tmp_path / how).mkdir()
        quantize.dynamic_int8(src, tmp_path / how / "m.onnx", op_types=["MatMul"], reduce_range=reduce_range,
                              nodes_to_exclude=["mm_excluded"], weight_type=weight_type)
        results[how] = onnx.load(str(tmp_path / how / "m.onnx"))
    lib, ours = results["library"], results["streamed"]
    assert streamed == [tmp_path / "streamed" / "m.onnx"]  # two different writers
    assert [n.op_type for n in ours.graph.node].count("MatMulInteger") == 4  # both "a"s, the Gemm's, shared_w
    assert [str(n) for n in ours.graph.node] == [str(n) for n in lib.graph.node]
    assert [str(v) for v in ours.graph.value_info] == [str(v) for v in lib.graph.value_info]
    assert list(ours.opset_import) == list(lib.opset_import) and ours.metadata_props == lib.metadata_props
    assert [t.name for t in ours.graph.initializer] == [t.name for t in lib.graph.initializer]
    for a, b in zip(ours.graph.initializer, lib.graph.initializer):
        x, y = numpy_helper.to_array(a), numpy_helper.to_array(b)
        assert x.dtype == y.dtype and np.array_equal(x, y), a.name
    for f in ("m.onnx", "m.onnx.data"):  # and in the end the very same files
        assert (tmp_path / "streamed" / f).read_bytes() == (tmp_path / "library" / f).read_bytes(), f
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    got = [InferenceSession(str(tmp_path / how / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
           for how in ("library", "streamed")]
    for a, b in zip(*got):
        np.testing.assert_array_equal(a, b)  # tolerance 0: the same graph and weights


def test_a_graph_it_does_not_handle_goes_to_quantize_dynamic(tmp_path):
    src = tmp_path / "m.onnx"
    _model(src)
    model = onnx.load(str(src), load_external_data=False)
    model.opset_import[0].version = 10
    onnx.save(model, str(src))
    why = quantize.streamed_dynamic_int8(src, tmp_path / "out.onnx")
    assert why == "opset 10 (DynamicQuantizeLinear needs 11)" and not (tmp_path / "out.onnx").exists()
