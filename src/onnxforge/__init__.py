"""onnxforge: recipe-driven ONNX builds of generative models for CPUs."""

__version__ = "0.1.0"
