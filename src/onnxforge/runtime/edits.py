"""The demo's edits: a small explicit grammar, and the edits that need no model. numpy + Pillow only.

    edit = parse_edit("make it red")          # Edit(kind="recolor", color=(255, 0, 0), ...)
    rgba_or_rgb = apply_edit(edit, rgb, mask)  # uint8 pixels; outside the edited region byte-identical

The grammar (case and surrounding punctuation ignored):

    make it <colour> | recolor it to <colour> | color it <colour> | paint it <colour> | turn it <colour>
                                  colour: a CSS colour name (red, light blue, teal, ...) or #rgb / #rrggbb
    make it brighter | lighter | darker           lightness up or down, hue and chroma kept
    make it more saturated | less saturated | more colorful | duller
    blur the background                           the object stays sharp
    cut it out | cut out the object | remove the background     the object on transparency (RGBA PNG)
    cut out the background                        the background with a transparent hole (RGBA PNG)
    replace it with <text>                        generative: Stable Diffusion draws <text> in the mask
    make it <text>                                generative, when <text> is not a colour or brightness word
    remove it | erase it                          generative: the masked area is redrawn as background

Recolouring works in OKLab (Ottosson 2020): lightness L is kept, the hue and chroma of the asked colour
are put in; where the result would leave the sRGB gamut the chroma is reduced (never L), so shading
and texture survive. The change is faded in over a feathered edge that lies inside the edited region,
so every pixel outside it keeps its exact bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Edit", "EditNotUnderstood", "parse_edit", "apply_edit", "GRAMMAR", "feather", "dilate", "erode",
           "srgb_to_oklab", "oklab_to_srgb"]

GRAMMAR = """\
  make it <colour>              recolour the object (CSS colour name or #hex), keeping its shading
  recolor it to <colour>        the same (also: color/paint/turn it <colour>)
  make it brighter | darker     lightness up or down
  make it more saturated | less saturated
  blur the background           the object stays sharp
  cut it out                    the object on a transparent background (PNG)
  cut out the background        the background with the object transparent (PNG)
  replace it with <text>        Stable Diffusion draws <text> in the mask
  make it <text>                the same for a description, e.g. "make it a golden statue"
  remove it                     the object is redrawn as background"""


class EditNotUnderstood(ValueError):
    """The edit text matches nothing in the grammar; the message lists what is understood."""


@dataclass(frozen=True)
class Edit:
    """A parsed edit. `region` is what changes: "object" (the mask) or "background" (everything else)."""

    text: str
    kind: str  # recolor | lightness | saturation | blur | cutout | generate
    region: str = "object"
    color: tuple[int, int, int] | None = None  # recolor target
    amount: float = 0.0  # lightness: +-L in OKLab; saturation: chroma factor
    prompt: str = ""  # generate: what to draw
    strength: float | None = None  # generate: default strength for this kind of edit
    params: dict = field(default_factory=dict)

    @property
    def generative(self) -> bool:
        return self.kind == "generate"

    def describe(self) -> dict:
        d = {"text": self.text, "kind": self.kind, "region": self.region}
        if self.color is not None:
            d["color"] = "#%02x%02x%02x" % self.color
        if self.kind in ("lightness", "saturation"):
            d["amount"] = self.amount
        if self.generative:
            d["prompt"] = self.prompt
        return d


_BRIGHTER = {"brighter", "lighter", "bright", "light"}
_DARKER = {"darker", "dark", "dimmer"}
_MORE_SAT = {"more saturated", "saturated", "more colorful", "more colourful", "more vivid", "vivid", "vibrant"}
_LESS_SAT = {"less saturated", "desaturated", "duller", "dull", "less colorful", "less colourful", "muted"}
LIGHTNESS_STEP = 0.12  # OKLab L runs 0..1: a visible but not blown-out step
SATURATION_FACTOR = 1.6
REPLACE_STRENGTH, MAKE_STRENGTH, REMOVE_STRENGTH = 0.8, 0.7, 1.0
REMOVE_PROMPT = "empty background, nothing there"


def _colour(word: str) -> tuple[int, int, int] | None:
    """A CSS colour name (spaces/hyphens ignored: 'light blue') or #rgb/#rrggbb, else None."""
    from PIL import ImageColor

    w = word.strip().lower()
    if re.fullmatch(r"#([0-9a-f]{3}|[0-9a-f]{6})", w):
        return ImageColor.getrgb(w)[:3]
    name = re.sub(r"[\s\-_]", "", w)
    if name in ImageColor.colormap:
        return ImageColor.getrgb(name)[:3]
    return None


def not_understood(text: str) -> EditNotUnderstood:
    return EditNotUnderstood(f"edit {text!r} is not understood; say one of:\n{GRAMMAR}")


def parse_edit(text: str) -> Edit:
    """The user's words -> an Edit; anything else raises EditNotUnderstood listing the grammar."""
    if not isinstance(text, str) or not text.strip():
        raise EditNotUnderstood(f"say what the edit should do; one of:\n{GRAMMAR}")
    raw = text.strip()
    t = re.sub(r"\s+", " ", raw.lower().strip(" .!?\"'"))
    t = re.sub(r"^(please )?", "", t)

    if m := re.fullmatch(r"(?:re-?colou?r|colou?r|paint|turn|change) (?:it|the object)(?: to| into)? (.+)", t):
        colour = _colour(m.group(1))
        if colour is None:
            raise EditNotUnderstood(f"{m.group(1)!r} is not a colour: use a CSS colour name (red, light blue, teal, "
                                    f"...) or #rrggbb; or say \"make it {m.group(1)}\" for a generative edit")
        return Edit(raw, "recolor", color=colour)
    if t in ("blur the background", "blur background", "blur the back ground"):
        return Edit(raw, "blur", region="background")
    if t in ("cut it out", "cut out", "cut out it", "cut out the object", "cut the object out",
             "remove the background", "remove background"):
        return Edit(raw, "cutout", region="object")
    if t in ("cut out the background", "cut the background out"):
        return Edit(raw, "cutout", region="background")
    if t in ("remove it", "erase it", "remove the object", "erase the object", "delete it"):
        return Edit(raw, "generate", prompt=REMOVE_PROMPT, strength=REMOVE_STRENGTH, params={"remove": True})
    if m := re.fullmatch(r"replace (?:it|the object) (?:with|by) (.+)", t):
        return Edit(raw, "generate", prompt=m.group(1).strip(), strength=REPLACE_STRENGTH)
    m = re.fullmatch(r"(?:make|turn) (?:it|the object) (?:look )?(.+)", t)
    words = m.group(1).strip() if m else t
    words = re.sub(r"^(a bit|a little|much|slightly|more and more) ", "", words)
    if words in _BRIGHTER:
        return Edit(raw, "lightness", amount=LIGHTNESS_STEP)
    if words in _DARKER:
        return Edit(raw, "lightness", amount=-LIGHTNESS_STEP)
    if words in _MORE_SAT:
        return Edit(raw, "saturation", amount=SATURATION_FACTOR)
    if words in _LESS_SAT:
        return Edit(raw, "saturation", amount=1 / SATURATION_FACTOR)
    colour = _colour(words)
    if colour is not None and (m or words == t):
        return Edit(raw, "recolor", color=colour)
    if m:
        return Edit(raw, "generate", prompt=words, strength=MAKE_STRENGTH)
    raise not_understood(raw)


# ---- applying the edits that need no model ------------------------------------------------------------


def apply_edit(edit: Edit, rgb: np.ndarray, mask: np.ndarray, feather_px: int | None = None) -> np.ndarray:
    """uint8 (H, W, 3) picture + bool (H, W) object mask -> uint8 (H, W, 3), or (H, W, 4) for a cut-out.

    Pixels outside the edited region (the object, or the background for background edits) are
    returned byte-identical; the change fades in over `feather_px` inside it (default: ~1 % of the side).
    """
    rgb, mask = _check(rgb, mask)
    if edit.generative:
        raise ValueError(f"{edit.text!r} is a generative edit: it needs Stable Diffusion (StableDiffusion.edit)")
    region = mask if edit.region == "object" else ~mask
    if not region.any():
        raise ValueError(f"the {edit.region} is empty in this mask: nothing to edit (pick another object)")
    radius = default_feather(rgb.shape[:2]) if feather_px is None else int(feather_px)
    alpha = feather(region, radius)
    if edit.kind == "cutout":
        return np.dstack([rgb, np.round(alpha * 255).astype(np.uint8)])
    if edit.kind == "blur":
        from PIL import Image, ImageFilter

        blur_radius = max(2.0, max(rgb.shape[:2]) / 60)
        changed = np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(blur_radius)), np.float32) / 255
    else:
        lab = srgb_to_oklab(rgb.astype(np.float32) / 255)
        if edit.kind == "recolor":
            target = srgb_to_oklab(np.asarray(edit.color, np.float32)[None] / 255)[0]
            lab[..., 1:] = target[1:]  # the asked hue and chroma; L (shading, texture) untouched
        elif edit.kind == "lightness":
            lab[..., 0] = np.clip(lab[..., 0] + edit.amount, 0.0, 1.0)
        elif edit.kind == "saturation":
            lab[..., 1:] *= np.float32(edit.amount)
        else:
            raise ValueError(f"unknown edit kind {edit.kind!r}")
        changed = oklab_to_srgb_in_gamut(lab)
    return blend(rgb, changed, alpha)


def blend(rgb: np.ndarray, changed: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """alpha * changed + (1 - alpha) * rgb in uint8; where alpha == 0 the original bytes are copied."""
    out = rgb.copy()
    inside = alpha > 0
    a = alpha[inside][:, None]
    mixed = a * np.asarray(changed, np.float32)[inside] * 255 + (1 - a) * rgb[inside].astype(np.float32)
    out[inside] = np.clip(np.round(mixed), 0, 255).astype(np.uint8)
    return out


def _check(rgb, mask) -> tuple[np.ndarray, np.ndarray]:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"picture must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    mask = np.asarray(mask)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} px but the picture is "
                         f"{rgb.shape[1]}x{rgb.shape[0]} px")
    return rgb, mask.astype(bool)


# ---- masks -------------------------------------------------------------------------------------------


def default_feather(shape) -> int:
    return max(1, round(max(shape) / 100))


def _shift_stack(m: np.ndarray, fill: bool) -> np.ndarray:
    p = np.pad(m, 1, constant_values=fill)
    h, w = m.shape
    return np.stack([p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])


def erode(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """3x3 erosion, `steps` times (the picture's border counts as inside, so edges are not eaten)."""
    m = np.asarray(mask, bool)
    for _ in range(max(0, int(steps))):
        m = _shift_stack(m, True).all(axis=0)
    return m


def dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """3x3 dilation, `steps` times."""
    m = np.asarray(mask, bool)
    for _ in range(max(0, int(steps))):
        m = _shift_stack(m, False).any(axis=0)
    return m


def feather(region: np.ndarray, radius: int) -> np.ndarray:
    """float32 alpha: 0 outside `region`, rising to 1 at `radius` px inside its edge (inward feather).

    Counting erosions gives the chessboard distance to the edge; the ramp stays inside the region so
    the outside is never touched.
    """
    m = np.asarray(region, bool)
    radius = max(0, int(radius))
    if radius == 0:
        return m.astype(np.float32)
    depth = np.zeros(m.shape, np.float32)
    cur = m
    for _ in range(radius):
        depth += cur
        cur = erode(cur)
        if not cur.any():
            break
    return np.clip(depth / radius, 0.0, 1.0).astype(np.float32)


# ---- colour ------------------------------------------------------------------------------------------

# OKLab (Björn Ottosson, 2020): linear sRGB -> LMS -> cube root -> Lab.
_M1 = np.array([[0.4122214708, 0.5363325363, 0.0514459929],
                [0.2119034982, 0.6806995451, 0.1073969566],
                [0.0883024619, 0.2817188376, 0.6299787005]], np.float64)
_M2 = np.array([[0.2104542553, 0.7936177850, -0.0040720468],
                [1.9779984951, -2.4285922050, 0.4505937099],
                [0.0259040371, 0.7827717662, -0.8086757660]], np.float64)
_M1_INV, _M2_INV = np.linalg.inv(_M1), np.linalg.inv(_M2)


def _to_linear(c):
    c = np.asarray(c, np.float64)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _to_srgb(c):
    c = np.asarray(c, np.float64)
    return np.where(c <= 0.0031308, 12.92 * c, 1.055 * np.abs(c) ** (1 / 2.4) * np.sign(c) - 0.055)


def srgb_to_oklab(rgb01: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB in [0, 1] -> (..., 3) OKLab (L in [0, 1], a/b about +-0.4), float32."""
    lms = _to_linear(rgb01) @ _M1.T
    return (np.cbrt(lms) @ _M2.T).astype(np.float32)


def oklab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """(..., 3) OKLab -> (..., 3) sRGB, NOT clipped (values outside [0, 1] are out of gamut)."""
    lms = (np.asarray(lab, np.float64) @ _M2_INV.T) ** 3
    return _to_srgb(lms @ _M1_INV.T)


def oklab_to_srgb_in_gamut(lab: np.ndarray, iterations: int = 12) -> np.ndarray:
    """OKLab -> sRGB in [0, 1], pulling out-of-gamut colours towards grey at the same L (chroma
    bisection), so lightness and hue are kept and only chroma gives way."""
    lab = np.asarray(lab, np.float64)
    rgb = oklab_to_srgb(lab)
    eps = 1e-6
    out = ((rgb < -eps) | (rgb > 1 + eps)).any(axis=-1)
    if out.any():
        sub = lab[out]
        lo, hi = np.zeros(len(sub)), np.ones(len(sub))  # chroma scale known in / out of gamut
        for _ in range(iterations):
            mid = (lo + hi) / 2
            trial = oklab_to_srgb(np.concatenate([sub[:, :1], sub[:, 1:] * mid[:, None]], axis=1))
            ok = ((trial >= -eps) & (trial <= 1 + eps)).all(axis=1)
            lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
        rgb[out] = oklab_to_srgb(np.concatenate([sub[:, :1], sub[:, 1:] * lo[:, None]], axis=1))
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)
