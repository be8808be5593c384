"""Quantization shared by every model family (onnxruntime.quantization)."""

from __future__ import annotations

from pathlib import Path

EXTERNAL_DATA_THRESHOLD = 1.8e9  # protobuf cannot hold a model over 2 GB in one file


def dynamic_int8(src: Path, dst: Path, op_types=("MatMul",), per_channel=False, reduce_range=False) -> None:
    """Dynamic int8: weights stored int8, activations quantized on the fly (u8)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    total = sum(p.stat().st_size for p in src.parent.glob(src.name + "*"))
    quantize_dynamic(str(src), str(dst), op_types_to_quantize=list(op_types), per_channel=per_channel,
                     reduce_range=reduce_range, weight_type=QuantType.QInt8,
                     use_external_data_format=total > EXTERNAL_DATA_THRESHOLD)
