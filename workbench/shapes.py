"""Captioned coloured shapes: the procedural, seeded data set the tiny models learn from, and the simple
classifier that judges what they draw (issue #15).

Every example is a function of its index and the data set's seed alone, so a training run and an evaluation
anywhere draw the same images. Captions read like prompts people write: "a blue square on a white background",
"a red circle on the left on a black background". The classifier knows nothing of any model: it takes the
background from the image's border, the shape's colour from the median of the pixels that differ from it, and the
shape from its mask's fill ratio and symmetry, so a model is judged by what is on the image, not by its insides.

Only numpy: the rendering is done here (anti-aliasing by supersampling), no drawing library.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 220, 30),
    "purple": (150, 40, 190), "orange": (245, 130, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "black": (15, 15, 15),
                                                "gray": (128, 128, 128)}
POSITIONS = ("", "on the left", "on the right")
SUPERSAMPLING = 4
HELD_OUT_PERCENT = 10
BORDER_INSET = 2
"""How far inside the border the judge reads the background (the shapes keep at least 4 pixels off it at 128)."""
"""Captions whose hash falls in the first this many percent are never trained on: the evaluation's set."""


@dataclass(frozen=True)
class Scene:
    """What one image shows: the caption is made from it."""

    shape: str
    colour: str
    background: str
    position: str = ""

    @property
    def caption(self) -> str:
        where = f" {self.position}" if self.position else ""
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape}{where} on a {self.background} background"

    @property
    def held_out(self) -> bool:
        """Whether this caption belongs to the evaluation's set (by a hash of the caption, so stably)."""
        digest = hashlib.sha256(self.caption.encode()).digest()
        return int.from_bytes(digest[:4], "big") % 100 < HELD_OUT_PERCENT


def all_scenes() -> list[Scene]:
    return [Scene(shape, colour, background, position) for shape in SHAPES for colour in COLOURS
            for background in BACKGROUNDS for position in POSITIONS]


def training_scenes() -> list[Scene]:
    return [scene for scene in all_scenes() if not scene.held_out]


def evaluation_scenes() -> list[Scene]:
    return [scene for scene in all_scenes() if scene.held_out]


def render(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """The scene as a ``size`` by ``size`` RGB uint8 image; its size and place jitter with ``rng``."""
    fine = size * SUPERSAMPLING
    extent = rng.uniform(0.42, 0.6) * size  # the shape's width, in output pixels
    centre_x = {"": 0.5, "on the left": 0.3, "on the right": 0.7}[scene.position] * size
    centre_x += rng.uniform(-0.04, 0.04) * size
    centre_y = rng.uniform(0.46, 0.54) * size
    if scene.position:
        extent *= 0.75  # room beside it
    coordinates = (np.arange(fine) + 0.5) / SUPERSAMPLING
    x, y = np.meshgrid(coordinates - centre_x, coordinates - centre_y)
    half = extent / 2
    if scene.shape == "circle":
        mask = x * x + y * y <= half * half
    elif scene.shape == "square":
        mask = (np.abs(x) <= half * 0.9) & (np.abs(y) <= half * 0.9)
    elif scene.shape == "triangle":  # pointing up, base at the bottom
        height = extent * 0.9
        top = -height / 2
        relative = (y - top) / height  # 0 at the apex, 1 at the base
        mask = (relative >= 0) & (relative <= 1) & (np.abs(x) <= relative * half)
    elif scene.shape == "cross":  # a plus sign, arms a third of its width
        arm = extent / 6
        mask = ((np.abs(x) <= arm) & (np.abs(y) <= half)) | ((np.abs(y) <= arm) & (np.abs(x) <= half))
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; the shapes are {SHAPES}")
    cover = mask.reshape(size, SUPERSAMPLING, size, SUPERSAMPLING).mean(axis=(1, 3))[..., None]
    colour = np.array(COLOURS[scene.colour], dtype=np.float64)
    background = np.array(BACKGROUNDS[scene.background], dtype=np.float64)
    blended = cover * colour + (1 - cover) * background
    image: np.ndarray = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return image


def example(index: int, size: int, seed: int = 0, scenes: list[Scene] | None = None) -> tuple[str, np.ndarray]:
    """The data set's ``index``-th example: a caption and its image, the same for the same arguments anywhere."""
    scenes = training_scenes() if scenes is None else scenes
    rng = np.random.default_rng([seed, index])
    scene = scenes[int(rng.integers(len(scenes)))]
    return scene.caption, render(scene, size, rng)


# --- the classifier ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Judgement:
    """What the classifier sees on an image."""

    colour: str | None
    shape: str | None
    colour_share: float
    """The share of the image's pixels that are near the caption's colour (0 to 1)."""


def colour_share(image: np.ndarray, colour: str) -> float:
    """The share of pixels nearer (in RGB) to ``colour`` than to any other colour or background of the data set.

    Nearest rather than within a fixed distance: a small model draws a darker or paler green than the data's, and
    that is still green, not black or white.
    """
    palette = np.array([*COLOURS.values(), *BACKGROUNDS.values()], dtype=np.float64)
    distances = np.linalg.norm(image.astype(np.float64)[..., None, :] - palette, axis=-1)
    return float((distances.argmin(axis=-1) == list(COLOURS).index(colour)).mean())


def judge(image: np.ndarray, expected_colour: str | None = None) -> Judgement:
    """The shape and colour an image shows: None for either when there is no clear foreground.

    The background is read from a ring just inside the border: a generated image's outermost pixel or two are
    often darker (the convolutions' zero padding), and taken as the background they made all of a white
    background look like foreground. The shape is the largest connected patch of foreground, so stray specks
    neither stretch its box nor tint its colour.
    """
    pixels = image.astype(np.float64)
    inset = BORDER_INSET
    ring = np.concatenate([pixels[inset], pixels[-1 - inset], pixels[:, inset], pixels[:, -1 - inset]])
    background = np.median(ring, axis=0)
    share = colour_share(image, expected_colour) if expected_colour else 0.0
    foreground = _largest_patch(np.linalg.norm(pixels - background, axis=-1) > 60)
    if foreground.sum() < 0.02 * foreground.size:
        return Judgement(colour=None, shape=None, colour_share=share)
    median = np.median(pixels[foreground], axis=0)
    colour = min(COLOURS, key=lambda name: float(np.linalg.norm(median - np.array(COLOURS[name]))))
    return Judgement(colour=colour, shape=_shape(foreground), colour_share=share)


def _largest_patch(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of ``mask`` (all False if it has none)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    height, width = mask.shape
    best_label, best_size, label = 0, 0, 0
    for start in zip(*np.nonzero(mask), strict=True):
        if labels[start]:
            continue
        label += 1
        labels[start] = label
        stack, size = [start], 0
        while stack:
            row, column = stack.pop()
            size += 1
            for neighbour in ((row - 1, column), (row + 1, column), (row, column - 1), (row, column + 1)):
                if (0 <= neighbour[0] < height and 0 <= neighbour[1] < width and mask[neighbour]
                        and not labels[neighbour]):
                    labels[neighbour] = label
                    stack.append(neighbour)
        if size > best_size:
            best_label, best_size = label, size
    result: np.ndarray = labels == best_label if best_size else np.zeros_like(mask)
    return result


def _shape(mask: np.ndarray) -> str:
    rows, columns = np.nonzero(mask)
    box = mask[rows.min():rows.max() + 1, columns.min():columns.max() + 1]
    fill = float(box.mean())
    # A cross and a triangle fill about as much of their box; a triangle is heavier at the bottom.
    upper, lower = box[: box.shape[0] // 2].mean(), box[(box.shape[0] + 1) // 2:].mean()
    if fill > 0.9:
        return "square"
    if fill > 0.68:
        return "circle"
    if lower > 1.4 * max(upper, 1e-6):
        return "triangle"
    return "cross"
