"""The clip_benchmark modules the start-up hook hands to the integration, in import order.

Its own module so that ``_startup`` (which must stay tiny) and the integration both read it
without importing each other. ``clip_benchmark.cli`` is last: it imports the others.
"""
WATCHED = (
    "clip_benchmark.models",
    "clip_benchmark.datasets.winoground",
    "clip_benchmark.metrics.captioning",
    "clip_benchmark.metrics.image_caption_selection",
    "clip_benchmark.metrics.linear_probe",
    "clip_benchmark.metrics.zeroshot_classification",
    "clip_benchmark.metrics.zeroshot_retrieval",
    "clip_benchmark.cli",
)
