"""Two-garment scenes for the compositional test (issue 11): composition, tinting, captions, class names.

A scene is two Fashion-MNIST garments side by side (28x56 RGB), each tinted one of four colours.
The tints are pure primaries and their sums (red, green, blue, yellow), so every channel of a
garment is either its grey image or zero: the maximum over channels gives the source image back
exactly, which is how tests check where a scene's pixels came from.

Captions name both garments, their colours and their order. A caption is a *wrapper* (``"a photo
of {c}."``) around a *relation* (``"{l} on the left and {r} on the right"``) whose slots hold noun
phrases (``"a red bag"``). Training and evaluation share the relations (the words a text encoder
trained from scratch must know) but not the wrappers: the evaluation wrappers are never seen in
training, as in the single-garment demo. Everything here is pure: no file I/O, randomness only
through the ``numpy.random.Generator`` passed in.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clip_benchmark_diffusion_demo.captions import CLASSNAMES as GARMENTS

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
# 0/1 channel masks: tinting multiplies the grey image by these, which loses nothing (see module doc).
COLOUR_MASKS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=np.uint8)
SCENE_HEIGHT, SCENE_WIDTH = 28, 56

# Slots {l} and {r}: the left and the right garment's noun phrase (with its article).
RELATIONS: tuple[str, ...] = (
    "{l} on the left and {r} on the right",
    "{r} on the right and {l} on the left",
    "{l} to the left of {r}",
    "{r} to the right of {l}",
)
TRAIN_WRAPPERS: tuple[str, ...] = (
    "{c}",
    "a photo of {c}.",
    "an image of {c}.",
    "a small picture of {c}.",
    "a low resolution photo of {c}.",
    "{c}, side by side.",
)
# Held out of training. Also the classification set's templates (clip_benchmark's ``{c}`` format).
EVAL_WRAPPERS: tuple[str, ...] = (
    "a picture of {c}.",
    "a low resolution image of {c}.",
    "a small photo of {c}.",
)
# Share of training captions that leave the colours out, so that colourless prompts (the
# classification set's class names) are in the training distribution too.
COLOURLESS_SHARE = 0.25
N_PAIR_CLASSES = len(GARMENTS) ** 2


@dataclass(frozen=True)
class Scenes:
    """``n`` scenes as parallel int arrays: source-image indices, garment classes and colours per side."""

    left_index: np.ndarray
    right_index: np.ndarray
    left_garment: np.ndarray
    right_garment: np.ndarray
    left_colour: np.ndarray
    right_colour: np.ndarray

    def __len__(self) -> int:
        return len(self.left_index)

    @property
    def pair_class(self) -> np.ndarray:
        """The ordered-pair class of each scene: ``10 * left garment + right garment``."""
        return pair_class(self.left_garment, self.right_garment)


# -- images ------------------------------------------------------------------------------------------
def tint(gray: np.ndarray, colour: np.ndarray | int) -> np.ndarray:
    """uint8 grey images (..., 28, 28) -> (..., 28, 28, 3), each with its colour's channel mask."""
    masks = COLOUR_MASKS[np.asarray(colour)]                        # (..., 3)
    return gray[..., None] * masks[..., None, None, :]


def compose(images: np.ndarray, scenes: Scenes) -> np.ndarray:
    """The scenes' pixels, uint8 (n, 28, 56, 3): left garment then right garment, each tinted."""
    left = tint(images[scenes.left_index], scenes.left_colour)
    right = tint(images[scenes.right_index], scenes.right_colour)
    return np.concatenate([left, right], axis=-2)


def untint(scene: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two grey source images of a (..., 28, 56, 3) scene, exactly (max over channels)."""
    gray = scene.max(axis=-1)
    return gray[..., :SCENE_WIDTH // 2], gray[..., SCENE_WIDTH // 2:]


# -- text ----------------------------------------------------------------------------------------
def noun_phrase(garment: int, colour: int | None) -> str:
    """``"a red bag"``, ``"an ankle boot"`` (no colour): a garment with its indefinite article."""
    words = f"{COLOURS[colour]} {GARMENTS[garment]}" if colour is not None else GARMENTS[garment]
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def caption(left: tuple[int, int | None], right: tuple[int, int | None], relation: int, wrapper: str) -> str:
    """One caption; ``left``/``right`` are (garment, colour or None), ``wrapper`` holds ``{c}``."""
    text = RELATIONS[relation].format(l=noun_phrase(*left), r=noun_phrase(*right))
    return wrapper.format(c=text)


def pair_class(left_garment: np.ndarray | int, right_garment: np.ndarray | int) -> np.ndarray | int:
    return left_garment * len(GARMENTS) + right_garment


def pair_class_name(label: int) -> str:
    """Class ``10 * l + r`` as words that state the order: ``"a bag on the left and a sneaker on the right"``."""
    left, right = divmod(label, len(GARMENTS))
    return RELATIONS[0].format(l=noun_phrase(left, None), r=noun_phrase(right, None))


PAIR_CLASSNAMES: tuple[str, ...] = tuple(pair_class_name(k) for k in range(N_PAIR_CLASSES))


def training_captions(scenes: Scenes, rng: np.random.Generator) -> list[str]:
    """One random training caption per scene: random relation and training wrapper; colours kept
    except for a ``COLOURLESS_SHARE`` of captions."""
    n = len(scenes)
    relations = rng.integers(len(RELATIONS), size=n)
    wrappers = rng.integers(len(TRAIN_WRAPPERS), size=n)
    colourless = rng.random(n) < COLOURLESS_SHARE
    out = []
    for i in range(n):
        lc = None if colourless[i] else int(scenes.left_colour[i])
        rc = None if colourless[i] else int(scenes.right_colour[i])
        out.append(caption((int(scenes.left_garment[i]), lc), (int(scenes.right_garment[i]), rc),
                           int(relations[i]), TRAIN_WRAPPERS[wrappers[i]]))
    return out


# -- sampling ------------------------------------------------------------------------------------
def random_scenes(rng: np.random.Generator, labels: np.ndarray, pool: np.ndarray, n: int) -> Scenes:
    """``n`` training scenes: both sides drawn uniformly from ``pool`` (indices into ``labels``),
    colours uniform and independent (so a quarter of scenes have one colour twice)."""
    left, right = pool[rng.integers(len(pool), size=n)], pool[rng.integers(len(pool), size=n)]
    colours = rng.integers(len(COLOURS), size=(2, n))
    return Scenes(left, right, labels[left], labels[right], colours[0], colours[1])


class SourceImages:
    """Draws source images of a given garment without replacement, in a seeded order per class."""

    def __init__(self, labels: np.ndarray, pool: np.ndarray, rng: np.random.Generator) -> None:
        self._queues = {c: list(rng.permutation(pool[labels[pool] == c])) for c in range(len(GARMENTS))}

    def take(self, garment: int) -> int:
        queue = self._queues[garment]
        if not queue:
            raise ValueError(f"no unused source image of garment {garment} ({GARMENTS[garment]}) is left")
        return int(queue.pop(0))

    def remaining(self, garment: int) -> int:
        return len(self._queues[garment])


def classification_scenes(rng: np.random.Generator, sources: SourceImages, per_class: int) -> Scenes:
    """``per_class`` scenes of each of the 100 ordered pairs, interleaved (every 100-prefix is
    balanced), random colours; each source image used once."""
    rows = []
    for _ in range(per_class):
        for k in rng.permutation(N_PAIR_CLASSES):
            left_g, right_g = divmod(int(k), len(GARMENTS))
            rows.append((sources.take(left_g), sources.take(right_g), left_g, right_g,
                         *rng.integers(len(COLOURS), size=2)))
    return _scenes(rows)


def probe_scenes(rng: np.random.Generator, sources: SourceImages, n: int) -> Scenes:
    """``n`` scenes for the caption-selection probes: two *different* garments in two *different*
    colours, so that swapping either gives a different caption; each source image used once."""
    rows = []
    for _ in range(n):
        left_g, right_g = rng.choice(len(GARMENTS), size=2, replace=False)
        left_c, right_c = rng.choice(len(COLOURS), size=2, replace=False)
        rows.append((sources.take(int(left_g)), sources.take(int(right_g)), left_g, right_g, left_c, right_c))
    return _scenes(rows)


def retrieval_scenes(rng: np.random.Generator, sources: SourceImages, n: int) -> Scenes:
    """``n`` scenes for retrieval: as the probe scenes (two different garments in two different colours),
    and no two with the same description, so each caption matches exactly one scene of the set."""
    rows, seen = [], set()
    while len(rows) < n:
        left_g, right_g = (int(g) for g in rng.choice(len(GARMENTS), size=2, replace=False))
        left_c, right_c = (int(c) for c in rng.choice(len(COLOURS), size=2, replace=False))
        if (left_g, right_g, left_c, right_c) in seen:
            continue
        seen.add((left_g, right_g, left_c, right_c))
        rows.append((sources.take(left_g), sources.take(right_g), left_g, right_g, left_c, right_c))
    return _scenes(rows)


def retrieval_captions(scenes: Scenes, rng: np.random.Generator, per_scene: int) -> list[list[str]]:
    """``per_scene`` captions of each scene, each naming both garments, their colours and their order, in
    different (relation, held-out wrapper) wordings."""
    wordings = [(r, w) for r in range(len(RELATIONS)) for w in range(len(EVAL_WRAPPERS))]
    if not 1 <= per_scene <= len(wordings):
        raise ValueError(f"per_scene must be 1..{len(wordings)}, got {per_scene}")
    out = []
    for i in range(len(scenes)):
        left = (int(scenes.left_garment[i]), int(scenes.left_colour[i]))
        right = (int(scenes.right_garment[i]), int(scenes.right_colour[i]))
        picks = rng.choice(len(wordings), size=per_scene, replace=False)
        out.append([caption(left, right, wordings[p][0], EVAL_WRAPPERS[wordings[p][1]]) for p in picks])
    return out


def _scenes(rows: list[tuple]) -> Scenes:
    cols = np.asarray(rows, dtype=np.int64).reshape(-1, 6).T
    return Scenes(*cols)


# -- caption-selection probes ----------------------------------------------------------------------
# SugarCrepe task name -> what the negative caption changes.
PROBES: dict[str, str] = {
    "swap_obj": "position swap: the two garments (with their colours) in the other order",
    "swap_att": "colour swap: the two colours exchanged between the garments (attribute binding)",
    "replace_obj": "replace garment: one garment named as a garment absent from the scene (control)",
    "replace_att": "replace colour: one colour named as a colour absent from the scene (control)",
}

Side = tuple[int, int]  # (garment, colour)


@dataclass(frozen=True)
class ProbeItem:
    """One scene's positive and negative description under one probe, and how both are worded."""

    positive: tuple[Side, Side]
    negative: tuple[Side, Side]
    relation: int
    wrapper: int  # index into EVAL_WRAPPERS

    @property
    def caption(self) -> str:
        return caption(*self.positive, self.relation, EVAL_WRAPPERS[self.wrapper])

    @property
    def negative_caption(self) -> str:
        return caption(*self.negative, self.relation, EVAL_WRAPPERS[self.wrapper])


def negative(probe: str, positive: tuple[Side, Side], rng: np.random.Generator) -> tuple[Side, Side]:
    """The negative description of ``probe``: it differs from ``positive`` only in the probed aspect."""
    (lg, lc), (rg, rc) = positive
    if probe == "swap_obj":
        return (rg, rc), (lg, lc)
    if probe == "swap_att":
        return (lg, rc), (rg, lc)
    side = int(rng.integers(2))
    sides = [(lg, lc), (rg, rc)]
    garment, colour = sides[side]
    if probe == "replace_obj":
        garment = int(rng.choice([g for g in range(len(GARMENTS)) if g not in (lg, rg)]))
    elif probe == "replace_att":
        colour = int(rng.choice([c for c in range(len(COLOURS)) if c not in (lc, rc)]))
    else:
        raise ValueError(f"unknown probe {probe!r}; one of {sorted(PROBES)}")
    sides[side] = (garment, colour)
    return sides[0], sides[1]


def probe_items(scenes: Scenes, rng: np.random.Generator) -> dict[str, list[ProbeItem]]:
    """Every probe on every scene. A scene's positive caption (relation, held-out wrapper) is the
    same in all four probes, so the probes differ only in their negatives."""
    out: dict[str, list[ProbeItem]] = {p: [] for p in PROBES}
    for i in range(len(scenes)):
        positive = ((int(scenes.left_garment[i]), int(scenes.left_colour[i])),
                    (int(scenes.right_garment[i]), int(scenes.right_colour[i])))
        relation, wrapper = int(rng.integers(len(RELATIONS))), int(rng.integers(len(EVAL_WRAPPERS)))
        for probe in PROBES:
            out[probe].append(ProbeItem(positive, negative(probe, positive, rng), relation, wrapper))
    return out
