"""Class names and caption templates shared by the demo dataset and both demo training scripts.

The evaluation templates are held out: neither model sees them in training, so the zero-shot
accuracy measured with them (and written into the dataset's templates file, which is what
clip_benchmark uses) is not inflated by prompt memorisation. They reuse training *words* in new
combinations, because text encoders trained from scratch on a few captions cannot generalise to
words they never saw.
"""

from __future__ import annotations

# Fashion-MNIST label order (0..9), in readable form.
CLASSNAMES: tuple[str, ...] = (
    "T-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

TRAIN_TEMPLATES: tuple[str, ...] = (
    "{c}",
    "a {c}",
    "a photo of a {c}.",
    "a black and white photo of the {c}.",
    "a grayscale image of a {c}.",
    "a small picture of a {c}.",
    "a low resolution photo of the {c}.",
    "an image of the {c}.",
)

# The training template both training scripts report a "seen prompt" accuracy with.
TRAIN_EVAL_TEMPLATE = TRAIN_TEMPLATES[2]  # "a photo of a {c}."

EVAL_TEMPLATES: tuple[str, ...] = (
    "a picture of the {c}.",
    "a grayscale photo of a {c}.",
    "a low resolution image of a {c}.",
)


def captions_for(label: int, templates: tuple[str, ...] = TRAIN_TEMPLATES) -> list[str]:
    """All captions of one class under the given templates (clip_benchmark's ``{c}`` format)."""
    return [t.format(c=CLASSNAMES[label]) for t in templates]
