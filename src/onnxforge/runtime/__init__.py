"""The run side: numpy + onnxruntime + tokenizers + Pillow only.

Nothing here may import torch, transformers or diffusers (a test checks it):
everything the runtime needs comes from the artifact's manifest.
"""
