"""The tiny SAM 2.1 recipe end to end: export parity with transformers' Sam2Model, the 64 px variant, int8,
batched == one-by-one, one predictor interface for both families, the CLI, and bad input.

The reference is Sam2Model.forward itself (pixel values -> masks), with Sam2Processor's coordinate
scaling (x S/w, y S/h) and post_process_masks' one bilinear resize written out here: transformers'
Sam2ImageProcessorFast imports torchvision, whose wheels on this package index are CUDA-linked.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import Sam2Model

from onnxforge.config import RecipeError, load_recipe
from onnxforge.runtime import artifact as art
from onnxforge.runtime import sam_processing as sp
from onnxforge.runtime.sam import Sam2Predictor, SamPredictor, mask_iou, open_predictor

from conftest import REPO, run_cli
from test_sam_batch import assert_low_res_boxes_near

# Measured on the tiny model (torch 2.13 CPU, onnxruntime 1.32): encoder outputs ~1e-7, decoder logits
# ~7e-6, every mask IoU 1.0.
FEATURES_ATOL = 1e-4
LOGITS_ATOL = 1e-3
MIN_MASK_IOU = 0.99
W, H = 173, 97


def _picture(w=W, h=H, seed=1):
    from onnxforge.families.sam.build import validation_image

    return validation_image(w, h, seed)


@pytest.fixture(scope="module")
def fp32(sam2_tiny):
    return art.load(sam2_tiny.variant("fp32", "sam2-tiny"))


@pytest.fixture(scope="module")
def predictor(fp32):
    p = Sam2Predictor(fp32)
    p.set_image(_picture())
    return p


@pytest.fixture(scope="module")
def torch_model(sam2_tiny, fp32):
    digest = next(s["digest"] for s in fp32.manifest["stages"] if s["stage"] == "source")
    model_dir = sam2_tiny.artifacts / "sam2-tiny" / ".stages" / f"source-all-{digest}" / "model"
    return Sam2Model.from_pretrained(model_dir, attn_implementation="eager").eval()


def _torch_masks(model, image, rt, points=None, labels=None, box=None, multimask=True):
    """Sam2Model.forward on the same pixel values; prompts scaled and masks resized as Sam2Processor does."""
    size = rt["image_size"]
    pixels, (h, w), _ = sp.preprocess_square(image, size, rt["pixel_mean"], rt["pixel_std"])
    scale = np.array([size / w, size / h])
    kwargs = {}
    if points is not None:
        kwargs["input_points"] = torch.tensor(np.asarray(points) * scale, dtype=torch.float32)[None, None]
        kwargs["input_labels"] = torch.tensor(labels)[None, None]
    if box is not None:
        kwargs["input_boxes"] = torch.tensor((np.asarray(box).reshape(2, 2) * scale).reshape(1, 1, 4), dtype=torch.float32)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels), multimask_output=multimask, **kwargs)
        masks = F.interpolate(out.pred_masks[0], (h, w), mode="bilinear", align_corners=False)[0] > 0
    return masks.numpy(), out.iou_scores[0, 0].numpy(), out


PROMPTS = {
    "point": dict(points=[(50, 40)], labels=[1]),
    "points with a negative": dict(points=[(50, 40), (130, 45)], labels=[1, 0]),
    "box": dict(box=(95, 20, 160, 70)),
    "box + point": dict(points=[(120, 45)], labels=[1], box=(90, 15, 165, 75)),
    "single mask": dict(points=[(50, 40)], labels=[1], multimask=False),
    "single mask, box": dict(box=(95, 20, 160, 70), multimask=False),
}


def test_variants_published_and_validated(sam2_tiny):
    for name, size in (("fp32", 128), ("int8", 128), ("fp32-64", 64)):
        m = art.load(sam2_tiny.variant(name, "sam2-tiny")).manifest
        assert m["artifact"]["family"] == "sam2" and m["validation"]["passed"] is True
        rt = m["runtime"]
        assert rt["kind"] == "sam2" and rt["image_size"] == size and rt["resize"] == "square"
        assert m["components"]["encoder"]["inputs"][0]["shape"] == [1, 3, size, size]
    v = art.load(sam2_tiny.variant("fp32-64", "sam2-tiny")).manifest["validation"]
    # The 64 px input against the model's own 128 px masks (same weights): recorded; random weights, so
    # the figure proves the plumbing only.
    assert 0.0 <= v["mask_iou_vs_128px"]["mean"] <= 1.0
    import onnx

    q = art.load(sam2_tiny.variant("int8", "sam2-tiny"))
    assert any(n.op_type == "MatMulInteger" for n in onnx.load(str(q.dir / "encoder.onnx")).graph.node)


def test_encoder_outputs_match_sam2model(predictor, torch_model, fp32):
    rt = fp32.runtime
    pixels = sp.preprocess_square(predictor.image, rt["image_size"], rt["pixel_mean"], rt["pixel_std"])[0]
    with torch.no_grad():
        ref = torch_model.get_image_embeddings(torch.from_numpy(pixels))
    assert [list(r.shape) for r in ref] == [list(predictor.features[n].shape) for n in rt["encoder_io"]["outputs"]]
    for name, r in zip(rt["encoder_io"]["outputs"], ref):
        assert np.abs(predictor.features[name] - r.numpy()).max() <= FEATURES_ATOL


@pytest.mark.parametrize("name", list(PROMPTS))
def test_prompt_modes_match_pytorch(predictor, torch_model, fp32, name):
    prompt = dict(PROMPTS[name])
    multimask = prompt.pop("multimask", True)
    ref_masks, ref_scores, _ = _torch_masks(torch_model, predictor.image, fp32.runtime, multimask=multimask, **prompt)
    masks, scores = predictor.predict(multimask=multimask, **prompt)
    assert masks.shape == ref_masks.shape == ((3 if multimask else 1), H, W)
    assert min(mask_iou(a, b) for a, b in zip(masks, ref_masks)) >= MIN_MASK_IOU
    np.testing.assert_allclose(scores, ref_scores, atol=LOGITS_ATOL)


def test_decoder_batch_matches_sam2model_point_batch(predictor, torch_model):
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 128, (9, 1, 2)).astype(np.float32)  # in the encoder's frame
    feats = [torch.from_numpy(predictor.features[n]) for n in predictor.feature_names]
    with torch.no_grad():
        ref = torch_model(image_embeddings=feats, input_points=torch.from_numpy(pts)[None],
                          input_labels=torch.ones(1, 9, 1, dtype=torch.long))
    iou, low = predictor.decode(np.concatenate([pts, np.zeros_like(pts)], axis=1), np.tile([[1, -1]], (9, 1)))
    assert iou.shape == (9, 4) and low.shape == (9, 4, 32, 32)
    np.testing.assert_allclose(iou[:, 1:], ref.iou_scores[0].numpy(), atol=LOGITS_ATOL)
    assert np.abs(low[:, 1:] - ref.pred_masks[0].numpy()).max() <= LOGITS_ATOL


def test_batched_equals_one_by_one(predictor):
    prompts = [{k: v for k, v in p.items() if k != "multimask"} for p in PROMPTS.values()] + [{"points": [(5, 90)]}]
    for multimask in (True, False):
        for pr, (masks, scores) in zip(prompts, predictor.predict_batch(prompts, multimask=multimask)):
            ref_masks, ref_scores = predictor.predict(**pr, multimask=multimask)
            assert all(mask_iou(a, b) == 1.0 for a, b in zip(masks, ref_masks))
            np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    kwargs = dict(points_per_side=4, pred_iou_threshold=0.0, stability_threshold=0.0, nms_threshold=0.99)
    one, batched = (predictor.segment_everything(points_per_batch=b, **kwargs) for b in (1, 64))
    assert len(one) == len(batched) >= 2
    assert all(a.index == b.index and mask_iou(a.mask, b.mask) == 1.0 for a, b in zip(one, batched))


def test_low_res_filtering_equals_exact_without_stability_and_nms(predictor):
    """SAM 2 stretches the picture over the whole low-res map: with only the IoU test both "segment everything"
    paths resize the same masks, and the low-res NMS boxes are near the picture-size ones (as for SAM)."""
    kwargs = dict(points_per_side=5, pred_iou_threshold=0.0, stability_threshold=0.0, nms_threshold=1.0)
    fast, exact = (predictor.segment_everything(exact=e, **kwargs) for e in (False, True))
    assert len(fast) == len(exact) >= 2
    for a, b in zip(fast, exact):
        assert (a.index, a.score, a.area, a.bbox) == (b.index, b.score, b.area, b.bbox)
        np.testing.assert_array_equal(a.mask, b.mask)
    st = predictor._current()
    coords = sp.transform_points(sp.point_grid(5) * (W, H), st.original_size, st.reshaped_size)
    (_, _, low), = predictor._grid_proposals(coords, 64, 0.0)
    assert predictor._low_res_view(low).shape == low.shape  # the whole map shows the picture
    assert_low_res_boxes_near(predictor, low, predictor._upscale(low[None], binarize=True)[0])


def test_64px_variant_runs_the_same_weights_at_its_size(sam2_tiny, torch_model):
    small = Sam2Predictor(art.load(sam2_tiny.variant("fp32-64", "sam2-tiny")))
    small.set_image(_picture())
    assert small.embeddings.shape[-1] == 4 and small.features["high_res_feats_0"].shape[-1] == 16
    from onnxforge.families.sam2.build import sized_config

    model64 = Sam2Model.from_pretrained(torch_model.name_or_path, config=sized_config(torch_model.config, 64),
                                        attn_implementation="eager").eval()
    ref_masks, _, _ = _torch_masks(model64, small.image, small.runtime, points=[(50, 40)], labels=[1])
    masks, _ = small.predict(points=[(50, 40)])
    assert min(mask_iou(a, b) for a, b in zip(masks, ref_masks)) >= MIN_MASK_IOU


# ---- one predictor interface ------------------------------------------------------------------------


def test_open_predictor_picks_the_family_and_wrong_family_is_one_line(sam2_tiny, sam_tiny):
    sam2_dir, sam_dir = sam2_tiny.variant("fp32", "sam2-tiny"), sam_tiny.variant("fp32", "sam-tiny")
    assert type(open_predictor(sam2_dir)) is Sam2Predictor and type(open_predictor(sam_dir)) is SamPredictor
    with pytest.raises(art.ArtifactError, match=r"is a SAM 2.1 model .*needs a Segment Anything model") as info:
        SamPredictor(sam2_dir)
    assert "\n" not in str(info.value)
    with pytest.raises(art.ArtifactError, match=r"is a Segment Anything model .*needs a SAM 2.1 model"):
        Sam2Predictor(sam_dir)
    gpt2 = REPO  # not an artifact at all
    with pytest.raises(art.ArtifactError):
        open_predictor(gpt2)


def test_cli_segments_with_a_sam2_artifact(fp32, tmp_path):
    picture = tmp_path / "p.png"
    Image.fromarray(_picture()).save(picture)
    proc = run_cli("segment", str(picture), "--artifact", str(fp32.dir), "--box", "95,20,160,70", "--json",
                   "--out", str(tmp_path / "m.png"))
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["area"] > 0 and Image.open(tmp_path / "m.png").size == (W, H)
    proc = run_cli("segment", str(picture), "--artifact", str(fp32.dir), "--everything", "--json",
                   "--out", str(tmp_path / "labels.png"))
    assert proc.returncode == 0, proc.stderr and json.loads(proc.stdout)["candidates"]


def test_runtime_runs_sam2_without_torch(fp32):
    code = ("import sys; from onnxforge.runtime.sam import open_predictor; import numpy as np\n"
            f"p = open_predictor({str(fp32.dir)!r}); p.set_image(np.full((40, 60, 3), 90, np.uint8))\n"
            "p.predict(points=[(10, 10)]); p.segment_everything(points_per_side=2)\n"
            "assert not {'torch', 'transformers'} & set(sys.modules), sorted(sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---- recipes ------------------------------------------------------------------------------------------


def test_shipped_sam2_recipes_load():
    for name in ("sam2-tiny", "sam2.1-hiera-tiny-random", "sam2.1-hiera-tiny"):
        r = load_recipe(REPO / "recipes" / f"{name}.yaml")
        assert r.body.family == "sam2" and r.body.variants
    assert not load_recipe(REPO / "recipes" / "sam2-tiny.yaml").body.default


@pytest.mark.parametrize("variants, match", [
    ("{fp32: {image_size: 500}}", r"variants\.fp32\.image_size: must be a multiple of 32 .*e\.g\. 480"),
    ("{}", r"name at least one"),
    ("{Big: {image_size: 512}}", r"'Big' is not a variant name"),
    ("{fp32: {image_size: 1024, int8: {per_channel: maybe}}}", r"variants\.fp32\.int8\.per_channel"),
])
def test_bad_sam2_recipe_is_one_line(tmp_path, variants, match):
    text = (REPO / "recipes" / "sam2-tiny.yaml").read_text()
    text = text[:text.index("variants:")] + f"variants: {variants}\n"
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=match) as info:
        load_recipe(path)
    assert "\n" not in str(info.value)
