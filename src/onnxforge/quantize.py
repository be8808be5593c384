"""Quantization shared by every model family (onnxruntime.quantization)."""

from __future__ import annotations

from pathlib import Path

EXTERNAL_DATA_THRESHOLD = 1.8e9  # protobuf cannot hold a model over 2 GB in one file


def dynamic_int8(src: Path, dst: Path, op_types=("MatMul",), per_channel=False, reduce_range=False,
                 nodes_to_exclude=(), weight_type: str = "QInt8") -> None:
    """Dynamic int8: weights stored int8, activations quantized on the fly (u8)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    total = _model_bytes(src)
    # Dynamic mode first rewrites every Gemm as a MatMul named "<gemm>_MatMul" (+ Add) and only then
    # applies nodes_to_exclude, so an excluded Gemm (the UNet's time embedding) would be quantized anyway.
    excluded = [*nodes_to_exclude, *(f"{n}_MatMul" for n in nodes_to_exclude)]
    quantize_dynamic(str(src), str(dst), op_types_to_quantize=list(op_types), per_channel=per_channel,
                     reduce_range=reduce_range, weight_type=QuantType[weight_type],
                     nodes_to_exclude=excluded,
                     use_external_data_format=total > EXTERNAL_DATA_THRESHOLD)


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
