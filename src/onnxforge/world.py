"""The pocket world: pictures of simple coloured shapes, their captions and exact masks.

Everything here is a pure function of a seed, so a picture, its caption and the mask of every shape
can be regenerated anywhere (numpy + Pillow only: the runtime may import it). The same module holds the
oracles that score what the pocket models make: a caption parser (does GPT-2's text follow the grammar and
mention the word?) and a picture reader (which colour and which shape did the SD pipeline draw?). Both
are exact for rendered pictures, which the tests check, so a score measures the model, not the oracle.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# Named colours far apart in RGB, so the nearest-colour reading of a picture is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.28, "large": 0.46}  # shape diameter as a fraction of the picture side


class WorldError(ValueError):
    """A world description asks for something the world does not have (one line, names the fix)."""


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    size: str  # a key of SIZES
    cx: float  # centre, as a fraction of the picture side
    cy: float


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str

    @property
    def caption(self) -> str:
        things = " and ".join(f"{_a(s.colour)} {s.colour} {s.shape}" for s in self.shapes)
        return f"{things} on {_a(self.background)} {self.background} background"


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class WorldConfig:
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    max_shapes: int = 1
    size: int = 64  # picture side in pixels
    backgrounds: tuple[str, ...] = field(default=())  # empty: any colour

    def __post_init__(self):
        for name in self.colours + self.backgrounds:
            if name not in COLOURS:
                raise WorldError(f"unknown colour {name!r}: the world has {', '.join(COLOURS)}")
        for name in self.shapes:
            if name not in SHAPES:
                raise WorldError(f"unknown shape {name!r}: the world has {', '.join(SHAPES)}")
        if not 1 <= self.max_shapes <= 2:
            raise WorldError(f"max_shapes must be 1 or 2, got {self.max_shapes}")
        if not 16 <= self.size <= 1024:
            raise WorldError(f"picture size must be 16-1024 px, got {self.size}")
        if len(self.colours) < 2:
            raise WorldError("the world needs at least two colours (a shape and its background)")


def sample_scene(config: WorldConfig, rng: np.random.Generator, n_shapes: int | None = None) -> Scene:
    """One scene: shapes of distinct colours on a background of another colour, not overlapping."""
    n = n_shapes or int(rng.integers(1, config.max_shapes + 1))
    colours = list(rng.permutation(config.colours))
    backgrounds = [c for c in (config.backgrounds or config.colours)]
    background = str(rng.choice(backgrounds))
    colours = [c for c in colours if c != background][:n]
    shapes = []
    slots = [(0.5, 0.5)] if n == 1 else [(0.27, 0.5), (0.73, 0.5)]
    for (cx, cy), colour in zip(slots, colours):
        size = "large" if n == 1 and rng.random() < 0.5 else "small"
        jitter = 0.08 if n == 1 else 0.03
        shapes.append(Shape(
            shape=str(rng.choice(config.shapes)), colour=str(colour), size=size,
            cx=float(cx + rng.uniform(-jitter, jitter)), cy=float(cy + rng.uniform(-jitter, jitter)),
        ))
    return Scene(shapes=tuple(shapes), background=background)


def _outline(shape: Shape, side: int) -> list[tuple[float, float]]:
    """The shape's polygon in pixels (a circle is a 64-gon: smooth at the sizes we draw)."""
    radius = SIZES[shape.size] * side / 2
    cx, cy = shape.cx * side, shape.cy * side

    def ring(n, r, start):
        return [(cx + r * math.cos(start + 2 * math.pi * k / n), cy + r * math.sin(start + 2 * math.pi * k / n))
                for k in range(n)]

    if shape.shape == "circle":
        return ring(64, radius, 0.0)
    if shape.shape == "square":
        return ring(4, radius, math.pi / 4)
    if shape.shape == "triangle":
        return ring(3, radius, -math.pi / 2)
    # star: five points, inner radius 0.45 of the outer
    outer, inner = ring(5, radius, -math.pi / 2), ring(5, radius * 0.45, -math.pi / 2 + math.pi / 5)
    return [p for pair in zip(outer, inner) for p in pair]


def render(scene: Scene, side: int) -> tuple[Image.Image, np.ndarray]:
    """The picture and one boolean mask per shape, shape (n_shapes, side, side)."""
    image = Image.new("RGB", (side, side), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    masks = []
    for shape in scene.shapes:
        polygon = _outline(shape, side)
        draw.polygon(polygon, fill=COLOURS[shape.colour])
        mask = Image.new("L", (side, side), 0)
        ImageDraw.Draw(mask).polygon(polygon, fill=1)
        masks.append(np.asarray(mask, dtype=bool))
    return image, np.stack(masks)


def dataset(config: WorldConfig, seed: int, count: int, n_shapes: int | None = None):
    """`count` (scene, picture, masks) triples, the same for the same seed on every machine."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        scene = sample_scene(config, rng, n_shapes)
        image, masks = render(scene, config.size)
        yield scene, image, masks


# --- oracles -------------------------------------------------------------------------------------

_COLOUR = "|".join(COLOURS)
_THING = rf"an? ({_COLOUR}) ({'|'.join(SHAPES)})"
_CAPTION = re.compile(rf"^{_THING}(?: and {_THING})? on an? ({_COLOUR}) background$")


def parse_caption(text: str) -> Scene | None:
    """The scene a caption describes, or None when it is not a sentence of the world's grammar."""
    match = _CAPTION.match(text.strip().lower().rstrip("."))
    if not match:
        return None
    c1, s1, c2, s2, background = match.groups()
    things = [(c1, s1)] + ([(c2, s2)] if c2 else [])
    return Scene(tuple(Shape(s, c, "small", 0.5, 0.5) for c, s in things), background)


def caption_mentions(scene: Scene, word: str) -> bool:
    """Does a parsed caption use the word (a colour or a shape)?"""
    word = word.lower()
    return any(word in (s.colour, s.shape) for s in scene.shapes) or word == scene.background


@dataclass(frozen=True)
class Reading:
    """What the picture oracle sees: the background and the largest foreground blob's colour and shape."""
    background: str
    colour: str | None
    shape: str | None
    mask: np.ndarray


def _nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    table = np.array([COLOURS[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(((table - rgb.astype(np.float32)) ** 2).sum(axis=1)))]


def read_picture(image: Image.Image) -> Reading:
    """Read one-shape pictures: background = the border's colour; the shape = pixels of another colour.

    The shape is told by two numbers of its mask, both independent of size and position: solidity (area
    over convex-hull area: a star's points leave ~40 % of its hull empty, every other shape is convex) and,
    for convex shapes, how much of the bounding box they fill (square 1.0, circle pi/4, triangle ~0.5).
    """
    pixels = np.asarray(image.convert("RGB"))
    # A decoder's convolutions pad with zeros, so a generated picture's outermost pixels can be off-colour (a thin
    # frame): the background is read on a ring a few pixels in, and the frame is never part of a shape. Shapes
    # stay >= 12 % of the side away from the edge (sample_scene), so on rendered pictures this changes nothing.
    m = max(1, min(pixels.shape[:2]) // 20)
    ring = np.concatenate([pixels[m, m:-m], pixels[-m - 1, m:-m], pixels[m:-m, m], pixels[m:-m, -m - 1]])
    background = _nearest_colour(np.median(ring, axis=0))
    distance = np.linalg.norm(pixels.astype(np.float32) - np.array(COLOURS[background], np.float32), axis=-1)
    frame = np.ones(distance.shape, bool)
    frame[m:-m, m:-m] = False
    distance[frame] = 0.0
    mask = distance > 60.0
    if mask.sum() < 0.005 * mask.size:
        return Reading(background, None, None, mask)
    # The colour from the blob's purest pixels, those farthest from the background (blurred edges are a mix
    # of the two); then the mask again at half the way from background to that colour, where a blurred edge
    # of the true outline lies.
    far = distance >= np.percentile(distance[mask], 75)
    colour = _nearest_colour(np.median(pixels[mask & far], axis=0))
    gap = np.linalg.norm(np.array(COLOURS[colour], np.float32) - np.array(COLOURS[background], np.float32))
    mask = distance > gap / 2
    ys, xs = np.nonzero(mask)
    area = float(mask.sum())
    fill = area / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    if area / _hull_area(xs, ys) < 0.78:
        shape = "star"
    elif fill > 0.9:
        shape = "square"
    elif fill > 0.66:
        shape = "circle"
    else:
        shape = "triangle"
    return Reading(background, colour, shape, mask)


def _hull_area(xs: np.ndarray, ys: np.ndarray) -> float:
    """Area of the convex hull of the pixels (their corners), by Andrew's monotone chain + shoelace."""
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    points = sorted(set(map(tuple, corners.tolist())))

    def half(seq):
        chain = []
        for p in seq:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    hull = np.array(half(points) + half(points[::-1]), dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def contact_sheet(pictures: list[Image.Image], captions: list[str], columns: int = 8, cell: int = 128) -> Image.Image:
    """A grid of generated pictures with, under each, what its caption asked for and what the oracle read;
    framed green where colour and shape are both right, red where not (one-shape captions)."""
    from PIL import ImageFont

    font = ImageFont.load_default()
    rows = -(-len(pictures) // columns)
    pad, text_h = 4, 26
    sheet = Image.new("RGB", (columns * (cell + 2 * pad), rows * (cell + 2 * pad + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (picture, caption) in enumerate(zip(pictures, captions)):
        want, got = parse_caption(caption), read_picture(picture)
        thing = want.shapes[0]
        right = got.colour == thing.colour and got.shape == thing.shape
        x, y = (i % columns) * (cell + 2 * pad), (i // columns) * (cell + 2 * pad + text_h)
        draw.rectangle([x, y, x + cell + 2 * pad - 1, y + cell + 2 * pad - 1], fill=(40, 160, 60) if right else (200, 40, 40))
        sheet.paste(picture.convert("RGB").resize((cell, cell), Image.NEAREST), (x + pad, y + pad))
        draw.text((x + pad, y + cell + 2 * pad), f"{thing.colour} {thing.shape} / {want.background}", fill=(0, 0, 0), font=font)
        draw.text((x + pad, y + cell + 2 * pad + 12), f"read: {got.colour or '-'} {got.shape or '-'}",
                  fill=(0, 0, 0), font=font)
    return sheet
