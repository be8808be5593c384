"""Quantization shared by every model family (onnxruntime.quantization)."""

from __future__ import annotations

from pathlib import Path

EXTERNAL_DATA_THRESHOLD = 1.8e9  # protobuf cannot hold a model over 2 GB in one file


def dynamic_int8(src: Path, dst: Path, op_types=("MatMul",), per_channel=False, reduce_range=False,
                 nodes_to_exclude=(), weight_type: str = "QInt8") -> None:
    """Dynamic int8: weights stored int8, activations quantized on the fly (u8).

    onnxruntime's quantize_dynamic, except for a model over STREAM_THRESHOLD whose op types and settings
    streamed_dynamic_int8 writes the same graph for (see there why).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    total = _model_bytes(src)
    # Dynamic mode first rewrites every Gemm as a MatMul named "<gemm>_MatMul" (+ Add) and only then
    # applies nodes_to_exclude, so an excluded Gemm (the UNet's time embedding) would be quantized anyway.
    excluded = [*nodes_to_exclude, *(f"{n}_MatMul" for n in nodes_to_exclude)]
    if total > STREAM_THRESHOLD and "MatMul" in op_types and set(op_types) <= {"MatMul", "Gemm"} and not per_channel:
        if streamed_dynamic_int8(src, dst, reduce_range=reduce_range, nodes_to_exclude=excluded,
                                 weight_type=weight_type) is None:
            return
    quantize_dynamic(str(src), str(dst), op_types_to_quantize=list(op_types), per_channel=per_channel,
                     reduce_range=reduce_range, weight_type=QuantType[weight_type],
                     nodes_to_exclude=excluded,
                     use_external_data_format=total > EXTERNAL_DATA_THRESHOLD)


# ---- dynamic int8 of weight MatMuls, one tensor in memory at a time ----------------------

# Why not quantize_dynamic for a big model: it loads every fp32 weight into one ModelProto, copies the
# proto once more to re-run shape inference after rewriting Gemms, and builds the int8 model in it:
# 10.04 GiB peak for the 3.3 GB SD v1.4 UNet (docs/benchmarks/build-memory.md). This writes the graph
# quantize_dynamic writes for op types MatMul (and Gemm, which dynamic mode turns into MatMul + Add)
# with per-tensor weights: the same nodes, names and initializers, the int8 weights computed by
# onnxruntime's own quantize_data, so bit-identical (tests/test_sd.py compares the two on sd-tiny).
# Only the graph is loaded; each weight is read from the source's data file, quantized and appended
# to the new data file in turn. The graph steps that do not touch weights are onnxruntime's own
# (replace_gemm_with_matmul, clean_initializers, topological_sort).
STREAM_THRESHOLD = EXTERNAL_DATA_THRESHOLD  # bytes of model + data above which dynamic_int8 streams


def streamed_dynamic_int8(src: Path, dst: Path, reduce_range=False, nodes_to_exclude=(),
                          weight_type: str = "QInt8") -> str | None:
    """quantize_dynamic(op_types_to_quantize=["MatMul"], per_channel=False) written one tensor at a time.

    Writes `dst` + `dst.data` and returns None, or returns why this graph is not one it handles (then
    nothing is written; the caller uses quantize_dynamic).
    """
    import numpy as np
    import onnx
    from onnx.external_data_helper import uses_external_data
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.onnx_model import ONNXModel
    from onnxruntime.quantization.quant_utils import __producer__, __version__, add_infer_metadata, quantize_data

    qtype = QuantType[weight_type].tensor_type
    model = onnx.load(str(src), load_external_data=False)
    why = _not_streamable(model)
    if why:
        return why
    # Shape inference before and after the Gemm rewrite, as quantize_dynamic (the same value infos, in order).
    model = onnx.shape_inference.infer_shapes(model)
    add_infer_metadata(model)
    base = str(src.parent)
    inits = {t.name: t for t in model.graph.initializer}
    # Gemm -> MatMul (+ Add) as quantize_dynamic does; a transB Gemm's weight is transposed, so load those.
    for node in model.graph.node:
        if node.op_type == "Gemm" and node.input[1] in inits:
            _load_tensor_data(inits[node.input[1]], base)
    ONNXModel(model).replace_gemm_with_matmul()
    model = onnx.shape_inference.infer_shapes(model)
    inits = {t.name: t for t in model.graph.initializer}
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.output,
                                                              *model.graph.input)}
    excluded = set(nodes_to_exclude)

    new_nodes, activations, weights = [], {}, {}  # activations: name -> DynamicQuantizeLinear outputs
    for node in model.graph.node:
        a, b = (node.input[0], node.input[1]) if len(node.input) == 2 else ("", "")
        if node.op_type != "MatMul" or node.name in excluded or b not in inits:
            new_nodes.append(node)
            continue
        if inits[b].data_type != onnx.TensorProto.FLOAT or a in inits or types.get(node.output[0]) is None:
            return f"MatMul {node.name!r} is not float activation x float weight"
        # The nodes onnxruntime's MatMulInteger quantizer adds, in its order and with its names.
        if a not in activations:
            activations[a] = [a + "_quantized", a + "_scale", a + "_zero_point"]
            new_nodes.append(onnx.helper.make_node("DynamicQuantizeLinear", [a], activations[a], a + "_QuantizeLinear"))
        weights.setdefault(b, [b + "_quantized", b + "_scale", b + "_zero_point"])
        qa, sa, za = activations[a]
        qb, sb, zb = weights[b]
        name = node.name + "_quant" if node.name else ""
        out = node.output[0] + "_output_quantized"
        mul = name + "_scales_mul" if name else sa + "_" + sb + "_mul"
        new_nodes += [onnx.helper.make_node("MatMulInteger", [qa, qb, za, zb], [out], name),
                      onnx.helper.make_node("Cast", [out], [out + "_cast_output"], out + "_cast",
                                            to=types[node.output[0]]),
                      onnx.helper.make_node("Mul", [sa, sb], [mul + ":0"], mul),
                      onnx.helper.make_node("Mul", [out + "_cast_output", mul + ":0"], [node.output[0]],
                                            name + "_output_scale_mul" if name else "")]
    if any(o.name in activations for o in model.graph.output):
        return "a graph output is also a quantized MatMul input"
    sources = {b: onnx.TensorProto() for b in weights}  # the fp32 weights' entries, kept past clean_initializers
    for b, t in sources.items():
        t.CopyFrom(inits[b])
    model.graph.ClearField("node")
    model.graph.node.extend(new_nodes)
    for b, (qb, sb, zb) in weights.items():  # placeholders in onnxruntime's order, filled in while writing
        model.graph.initializer.extend([onnx.TensorProto(name=sb), onnx.TensorProto(name=zb),
                                        onnx.TensorProto(name=qb, data_type=qtype, dims=inits[b].dims)])
    qmodel = ONNXModel(model)
    qmodel.clean_initializers()
    model.producer_name, model.producer_version = __producer__, __version__
    qmodel.topological_sort()

    symmetric = qtype == onnx.TensorProto.INT8  # onnxruntime's default for signed weights
    location = dst.name + ".data"
    final = {t.name: t for t in model.graph.initializer}
    quantized = {names[0]: b for b, names in weights.items()}
    # Bytes never enter the graph's proto: protobuf keeps a message's memory until the whole message
    # is freed, so a weight read into it and cleared again would stay resident.
    with open(dst.parent / location, "wb") as data:
        for tensor in model.graph.initializer:
            if tensor.name in quantized:  # quantize_initializer_impl's arithmetic, one weight at a time
                b = quantized[tensor.name]
                w = _tensor_array(sources[b], base)
                zero_point, scale, q = quantize_data(w.flatten(), qtype, symmetric, reduce_range=reduce_range)
                q = np.asarray(q, dtype=onnx.helper.tensor_dtype_to_np_dtype(qtype)).reshape(w.shape)
                final[weights[b][1]].CopyFrom(onnx.helper.make_tensor(weights[b][1], sources[b].data_type, [],
                                                                      scale.reshape((-1,)).tolist()))
                final[weights[b][2]].CopyFrom(onnx.helper.make_tensor(weights[b][2], qtype, [],
                                                                      zero_point.reshape((-1,)).tolist()))
                _write_tensor(tensor, q.tobytes(), data, location)
                del w, q
            elif uses_external_data(tensor):
                _write_tensor(tensor, _external_bytes(tensor, base), data, location)
            elif tensor.HasField("raw_data"):
                _write_tensor(tensor, tensor.raw_data, data, location)
        for node in model.graph.node:  # as onnxruntime's save (convert_attribute=True)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.HasField("raw_data"):
                    _write_tensor(attr.t, attr.t.raw_data, data, location)
    onnx.save(model, str(dst))
    return None


def _write_tensor(tensor, raw: bytes, data, location: str) -> None:
    """Give a tensor its bytes as onnxruntime's save does (onnx's convert_model_to_external_data,
    size_threshold 1024 on sys.getsizeof(raw_data)): appended to the open data file, or inline if small."""
    import sys

    import onnx

    if sys.getsizeof(raw) < 1024:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:  # as onnx.load leaves a tensor it read in
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
        tensor.raw_data = raw
        return
    del tensor.external_data[:]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    offset = data.tell()
    data.write(raw)
    for key, value in (("location", location), ("offset", offset), ("length", len(raw))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


def _external_bytes(tensor, base_dir: str) -> bytes:
    """An external tensor's bytes, read from its data file (the tensor itself is left as it is)."""
    from onnx.external_data_helper import ExternalDataInfo

    info = ExternalDataInfo(tensor)
    with open(Path(base_dir) / info.location, "rb") as f:
        f.seek(int(info.offset or 0))
        return f.read(int(info.length)) if info.length is not None else f.read()


def _not_streamable(model) -> str | None:
    import onnx

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 11:
        return f"opset {opset} (DynamicQuantizeLinear needs 11)"
    for node in model.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return f"node {node.name!r} has a subgraph"
    return None


def _load_tensor_data(tensor, base_dir: str) -> None:
    """Bring an external tensor's bytes into the proto (its raw_data), as onnx.load would."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    if uses_external_data(tensor):
        load_external_data_for_tensor(tensor, base_dir)
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def _tensor_array(tensor, base_dir: str):
    """A tensor's values as numpy, its external bytes read into a copy (the graph's proto stays small)."""
    import onnx
    from onnx import numpy_helper

    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    _load_tensor_data(copy, base_dir)
    array = numpy_helper.to_array(copy)
    del copy
    return array


# ---- static int8 (QDQ) from a calibration reader ------------------------------------


class ArrayReader:
    """An onnxruntime CalibrationDataReader over an indexable source: `item(i)` -> {input name: array}.

    Items are produced one at a time (a calibration set on disk can be memory-mapped), and the
    reader can be rewound and restricted to a range, as onnxruntime's calibrators expect.
    """

    # Duck-typed (get_next, rewind, set_range, __len__) rather than a CalibrationDataReader subclass, so
    # that importing this module does not import onnxruntime.quantization.

    def __init__(self, count: int, item, names: tuple[str, ...] = ()):
        self.count, self.item, self.names = int(count), item, tuple(names)
        self.start, self.end, self.position = 0, self.count, 0

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self):
        for i in range(self.start, self.end):
            yield self.item(i)

    def get_next(self) -> dict | None:
        if self.start + self.position >= self.end:
            return None
        data = self.item(self.start + self.position)
        self.position += 1
        return data

    def rewind(self) -> None:
        self.position = 0

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end, self.position = max(0, start_index), min(self.count, end_index), 0


def _module_segments(node_name: str) -> list[str]:
    return [s for s in node_name.split("/") if s]


def match_nodes(model, pattern: str) -> list[str]:
    """Names of the graph's nodes a keep-float pattern selects.

    Three forms: "op:Softmax" (an op type), a glob with * ? or [ over whole node names, or a module
    path ("conv_in", "down_blocks.0/resnets.0/conv1") matched against whole segments of the exporter's
    node names ("/unet/down_blocks.0/resnets.0/conv1/Conv").
    """
    import fnmatch

    nodes = model.graph.node
    if pattern.startswith("op:"):
        op = pattern[3:]
        return [n.name for n in nodes if n.op_type == op]
    if any(c in pattern for c in "*?["):
        return [n.name for n in nodes if fnmatch.fnmatchcase(n.name, pattern)]
    want = _module_segments(pattern)
    out = []
    for n in nodes:
        segs = _module_segments(n.name)[:-1]  # the last segment is the op itself
        if any(segs[i:i + len(want)] == want for i in range(len(segs) - len(want) + 1)):
            out.append(n.name)
    return out


def resolve_keep_float(model_path: Path, patterns, strict: bool, what: str) -> tuple[list[str], dict[str, int]]:
    """Nodes to keep in float for these patterns, and how many nodes each pattern matched.

    strict (patterns the recipe names): a pattern that matches no node raises ValueError naming
    it; defaults (strict=False) that do not apply to this architecture are skipped.
    """
    import difflib

    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    excluded: list[str] = []
    counts: dict[str, int] = {}
    for pattern in patterns:
        names = match_nodes(model, pattern)
        counts[pattern] = len(names)
        if not names and strict:
            segments = sorted({s for n in model.graph.node for s in _module_segments(n.name)[:-1]})
            ops = sorted({f"op:{n.op_type}" for n in model.graph.node})
            close = difflib.get_close_matches(pattern, segments + ops, n=3)
            hint = f"; close: {', '.join(close)}" if close else ""
            raise ValueError(f"{what}: keep_float pattern {pattern!r} matches no node of {model_path.name} "
                             f"({len(model.graph.node)} nodes){hint}")
        excluded += [n for n in names if n not in excluded]
    return excluded, counts


def activation_matmuls(model_path: Path) -> list[str]:
    """MatMul nodes whose second input is not a constant weight (attention scores and mixing)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in consts]


def _model_bytes(path: Path) -> int:
    """An ONNX file's size with the external-data files it names (whatever their names)."""
    from .store import onnx_files

    return sum(p.stat().st_size for p in onnx_files(path))


def calibrate_ranges(src: Path, reader, cache: Path, op_types, method: str = "MinMax",
                     max_intermediate_outputs: int = 8) -> None:
    """Activation ranges of `src` over the reader's inputs, saved to `cache` (onnxruntime's JSON format).

    Done apart from quantize_static, which would hold the model twice during calibration (the
    full-size SD UNet was killed at 24 GiB that way): here the augmented copy is saved, the
    calibrator's own copy is dropped, the session runs without the memory arena, and min/max are
    merged every `max_intermediate_outputs` inputs.
    """
    import gc
    import tempfile

    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data

    big = _model_bytes(src) > EXTERNAL_DATA_THRESHOLD
    with tempfile.TemporaryDirectory(prefix=".calibrate-", dir=cache.parent) as tmp:
        calibrator = create_calibrator(src, list(op_types), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod[method], use_external_data_format=big,
                                       extra_options={"max_intermediate_outputs": max_intermediate_outputs}
                                       if method == "MinMax" else {})
        calibrator.model = None  # the augmented copy is on disk; MinMax/histograms never read this again
        gc.collect()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.enable_cpu_mem_arena = False
        opts.log_severity_level = 3
        calibrator.infer_session = ort.InferenceSession(calibrator.augmented_model_path, sess_options=opts,
                                                        providers=["CPUExecutionProvider"])
        reader.rewind()
        calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
        del calibrator
        gc.collect()
    save_tensors_data(ranges, cache)


def static_int8(src: Path, dst: Path, reader, *, op_types=("MatMul",), activation_type: str = "QUInt8",
                weight_type: str = "QInt8", per_channel: bool = False, reduce_range: bool = False,
                calibrate_method: str = "MinMax", nodes_to_exclude=(), ranges_cache: Path | None = None) -> Path:
    """Static int8 in QDQ format: weights int8, activations quantized with calibrated ranges.

    Two steps (see calibrate_ranges): ranges into `ranges_cache` (reused when it exists), then
    quantize_static from that cache without running the model again. Returns the cache path.
    """
    import logging

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    cache = ranges_cache or dst.with_name(dst.name + ".ranges.json")
    if not cache.is_file():
        calibrate_ranges(src, reader, cache, op_types, calibrate_method)
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # "consider pre-processing": quant_pre_process breaks the UNet
    try:
        quantize_static(str(src), str(dst), None, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(op_types),
                        per_channel=per_channel, reduce_range=reduce_range,
                        activation_type=QuantType[activation_type], weight_type=QuantType[weight_type],
                        nodes_to_exclude=list(nodes_to_exclude),
                        use_external_data_format=_model_bytes(src) > EXTERNAL_DATA_THRESHOLD,
                        calibrate_method=CalibrationMethod[calibrate_method], calibration_cache_path=str(cache),
                        extra_options={"MatMulConstBOnly": True})
    finally:
        logging.getLogger().setLevel(quiet)
    return cache


# ---- quality of a quantized model vs its float reference (numpy only) ------------------


def cosine(a, b) -> float:
    """Cosine similarity of two arrays, flattened (1.0 for two zero arrays)."""
    import numpy as np

    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def snr_db(reference, test) -> float:
    """Signal-to-noise ratio of `test` against `reference` in dB: 10 log10(sum ref^2 / sum (ref - test)^2)."""
    import numpy as np

    ref, x = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    noise = float(((ref - x) ** 2).sum())
    signal = float((ref ** 2).sum())
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return float(10 * np.log10(signal / noise))


def psnr(reference, test, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two images of the same shape (inf when identical)."""
    import numpy as np

    ref, x = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    if ref.shape != x.shape:
        raise ValueError(f"psnr: shapes differ, {ref.shape} vs {x.shape}")
    mse = float(((ref - x) ** 2).mean())
    return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def _gaussian_valid(x, kernel):
    """Separable 'valid' filtering of the last two axes (no padding: the border is dropped)."""
    from numpy.lib.stride_tricks import sliding_window_view

    x = (sliding_window_view(x, len(kernel), axis=-1) * kernel).sum(-1)
    x = (sliding_window_view(x, len(kernel), axis=-2) * kernel).sum(-1)
    return x


def ssim(reference, test, data_range: float = 255.0, sigma: float = 1.5, radius: int = 5) -> float:
    """Structural similarity (Wang et al. 2004) of two HxW or HxWxC images, mean over channels.

    Gaussian window (sigma 1.5, 11x11), K1 = 0.01, K2 = 0.03, population statistics, border of
    `radius` px left out: the settings of skimage's structural_similarity(gaussian_weights=True,
    use_sample_covariance=False), which this matches.
    """
    import numpy as np

    ref, x = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    if ref.shape != x.shape:
        raise ValueError(f"ssim: shapes differ, {ref.shape} vs {x.shape}")
    if ref.ndim == 2:
        ref, x = ref[..., None], x[..., None]
    if min(ref.shape[:2]) < 2 * radius + 1:
        raise ValueError(f"ssim: images of {ref.shape[1]}x{ref.shape[0]} px are smaller than the {2 * radius + 1} px window")
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    a, b = np.moveaxis(ref, -1, 0), np.moveaxis(x, -1, 0)  # C x H x W
    mu_a, mu_b = _gaussian_valid(a, k), _gaussian_valid(b, k)
    var_a = _gaussian_valid(a * a, k) - mu_a ** 2
    var_b = _gaussian_valid(b * b, k) - mu_b ** 2
    cov = _gaussian_valid(a * b, k) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())
