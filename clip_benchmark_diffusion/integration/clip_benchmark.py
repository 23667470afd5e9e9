"""Every patch of clip_benchmark lives here, behind one version guard.

clip_benchmark has no plugin API (DESIGN.md §2). The start-up hook calls :func:`on_import` right
after each watched module executes; each ``_patch_*`` below changes one thing and has a test.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from clip_benchmark_diffusion._startup import _WATCHED
from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.predictions import PREDICTIONS_ENV, write_predictions

SUPPORTED = ((1, 6), (1, 7))  # [min, max) of clip_benchmark's (major, minor)
MODEL_TYPE = "diffusion"
MARK = "_clip_benchmark_diffusion_patched"
# The watched modules, in import order (cli last: it imports the others).
WATCHED = tuple(sorted(_WATCHED, key=lambda n: (n == "clip_benchmark.cli", n)))
# Tasks a diffusion model cannot serve exactly, and why (one line each).
UNSUPPORTED_TASKS = {
    "zeroshot_retrieval": "retrieval scores every text against every image in independent batches, "
                          "which a joint image-text score cannot serve exactly",
    "linear_probe": "a linear probe needs image features, and a diffusion classifier has none",
    "captioning": "captioning needs a text generator",
}


def unsupported_task_error(task: str) -> UserError:
    return UserError(f"task {task} is not supported by diffusion models: {UNSUPPORTED_TASKS[task]}; "
                     "use zeroshot_classification")


def _stderr_line(text: str) -> None:
    """Print one line to stderr in a single write: under torchrun the ranks share stderr, and
    print() writes the text and its newline separately, so another rank's output can land between."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


_version_ok: bool | None = None
_current: dict[str, Any] = {}  # the diffusion model of the run in progress


def version_ok() -> bool:
    """True when the installed clip_benchmark is one we know; otherwise say so once."""
    global _version_ok
    if _version_ok is None:
        try:
            version = metadata.version("clip_benchmark")
        except metadata.PackageNotFoundError:
            version = "0"
        parts = tuple(int(p) for p in (version.split(".") + ["0", "0"])[:2] if p.isdigit())
        _version_ok = len(parts) == 2 and SUPPORTED[0] <= parts < SUPPORTED[1]
        if not _version_ok:
            _stderr_line(f"clip_benchmark_diffusion: clip_benchmark {version} is not supported (needs "
                         f"{'.'.join(map(str, SUPPORTED[0]))}.x); diffusion models are not registered")
    return _version_ok


def on_import(name: str, module: Any) -> None:
    """Patch ``module`` (just executed) if it is one we watch and the version is supported."""
    if name not in WATCHED or getattr(module, MARK, False) or not version_ok():
        return
    if name == "clip_benchmark.models":
        _patch_models(module)
    elif name == "clip_benchmark.cli":
        _patch_cli(module)
    else:
        _patch_metric(name.rsplit(".", 1)[1], module)
    setattr(module, MARK, True)


def ensure_installed() -> None:
    """Import and patch every watched module (for our own CLI and API users without the hook)."""
    import importlib

    for name in WATCHED:
        on_import(name, importlib.import_module(name))


# -- models: registration and routing by name ---------------------------------------------------
def _load_diffusion(model_name: str, pretrained: str, cache_dir: str | None = None, device: Any = "cuda"):
    from clip_benchmark_diffusion.adapter.loader import load_diffusion_classifier

    model, transform, tokenizer = load_diffusion_classifier(model_name, pretrained, cache_dir, device)
    if _current.get("store_path") is not None:
        from clip_benchmark_diffusion.store import ScoreStore

        model.attach_store(ScoreStore(_current["store_path"]))
    _current["model"] = model
    return model, transform, tokenizer


def _patch_models(models: Any) -> None:
    from clip_benchmark_diffusion.demo import register_open_clip_configs

    register_open_clip_configs()  # the demo CLIP's architecture, so --pretrained_model NAME,PATH finds it
    models.TYPE2FUNC[MODEL_TYPE] = _load_diffusion
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)  # in place: the CLI's argparse choices hold this list
    original = models.load_clip

    @functools.wraps(original)
    def load_clip(model_type: str, model_name: str, pretrained: str, cache_dir: str | None, device: Any = "cuda"):
        from clip_benchmark_diffusion.registry import get_recipe, is_diffusion_model

        if is_diffusion_model(model_name) or model_type == MODEL_TYPE:
            get_recipe(model_name.split("@", 1)[0])  # unknown names: our error with suggestions
            return _load_diffusion(model_name, pretrained, cache_dir, device)
        return original(model_type, model_name, pretrained, cache_dir, device)

    models.load_clip = load_clip


# -- metrics: the numpy fix, task hand-off and refusals -------------------------------------------
def _accuracy(output, target, topk=(1,)):
    """clip_benchmark's top-k accuracy without ``float(1-element array)`` (fails on numpy >= 2.4)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def _is_diffusion(model: Any) -> bool:
    return getattr(model, "is_diffusion_classifier", False)


def _patch_metric(task: str, module: Any) -> None:
    task_name = task
    if task == "zeroshot_classification":
        module.upstream_accuracy, module.accuracy = module.accuracy, _accuracy
        _patch_run_classification(module)
    original = module.evaluate
    signature = inspect.signature(original)

    @functools.wraps(original)
    def evaluate(model, dataloader, *args, **kwargs):
        if _is_diffusion(model):
            if task_name in UNSUPPORTED_TASKS:
                raise unsupported_task_error(task_name)
            call = signature.bind_partial(model, dataloader, *args, **kwargs).arguments
            if call.get("load_clfs"):
                raise UserError(LOAD_CLFS_ERROR)
            if task_name == "zeroshot_classification":
                check_templates(call.get("classnames"), call.get("templates"))
                model.begin_task(task_name, expected_images=_dataset_size(dataloader),
                                 classnames=call.get("classnames"), templates=call.get("templates"))
            else:
                model.begin_task(task_name, expected_images=_dataset_size(dataloader))
            if task_name == "image_caption_selection":
                dataloader = _AnnouncedBatches(dataloader, model)
        return original(model, dataloader, *args, **kwargs)

    module.evaluate = evaluate


def _patch_run_classification(module: Any) -> None:
    """Keep the logits and labels of each run when asked, for any model (per-image analyses)."""
    original = module.run_classification

    @functools.wraps(original)
    def run_classification(model, classifier, dataloader, device, amp=True):
        logits, target = original(model, classifier, dataloader, device, amp=amp)
        if getattr(model, "is_diffusion_classifier", False):
            _current["shortlist_recall"] = model.shortlist_recall(target)   # None unless a hybrid
        if os.environ.get(PREDICTIONS_ENV):
            # clip_benchmark's logits are 100 * cosine; CLIP's own probabilities use its learned
            # scale (100 for OpenAI's and most LAION models, 13.5 for the demo's clip_tiny).
            import torch

            scale = getattr(model, "logit_scale", None)
            scale = float(scale.exp()) if isinstance(scale, torch.Tensor) else 100.0
            _current["predictions"] = (logits, target, scale)
        return logits, target

    module.run_classification = run_classification


def _write_predictions(final: str, model: Any) -> None:
    """``<output stem>.predictions.jsonl``: per image the label, the top-5 classes, the top-1
    probability and (ours) the calls."""
    import torch

    logits, target, scale = _current.pop("predictions")
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices.tolist()
    if model is not None:
        calls = model.record.calls
        confidence = [r.outcome.confidence for r in model.record.results]
    else:
        calls = [None] * len(top)
        confidence = torch.softmax(logits.float() * (scale / 100.0), dim=1).max(1).values.tolist()
    write_predictions(Path(final), target.tolist(), top, calls, confidence)


def check_templates(classnames: Any, templates: Any) -> None:
    """Prompts that cannot tell classes apart are a user error, caught before any image is scored."""
    if isinstance(templates, dict):
        empty = [c for c in classnames if not templates.get(c)]
        if empty:
            raise UserError(f"the per-class prompt file gives no prompts for {', '.join(map(repr, empty[:3]))}"
                            f"{' and more' if len(empty) > 3 else ''}; add prompts for every class")
        return
    if not templates:
        raise UserError("the template list is empty (an empty zeroshot_classification_templates.txt or "
                        "--custom_template_file entry?); add templates such as 'a photo of a {c}.'")
    missing = [t for t in templates if "{c}" not in t]
    if missing:
        raise UserError(f"template {missing[0]!r} has no {{c}} placeholder, so every class would get the same "
                        "prompt; write templates like 'a photo of a {c}.'")


LOAD_CLFS_ERROR = ("--load_clfs is not supported by diffusion models: a saved text classifier "
                   "holds no prompts to denoise with; drop --load_clfs")
SAVE_CLF_ERROR = ("--save_clf is not supported by diffusion models: their classifier is a one-hot "
                  "placeholder, not text features; drop --save_clf")


class _AnnouncedBatches:
    """Caption selection: tell the model each batch's (instances, images, texts) before it is encoded."""

    def __init__(self, loader: Any, model: Any) -> None:
        self.loader, self.model = loader, model

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, texts in self.loader:
            nim = 1 if images.dim() == 4 else images.shape[1]
            self.model.set_batch_structure(len(texts), nim, len(texts[0]))
            yield images, texts


def _dataset_size(dataloader: Any) -> int | None:
    try:
        return len(dataloader.dataset)
    except (TypeError, AttributeError):
        return None


# -- cli: validation before compute, safe output names, results with cost --------------------------
def _patch_cli(cli: Any) -> None:
    import clip_benchmark.models as models

    cli.load_clip = models.load_clip
    original_run, original_main_eval, original_main = cli.run, cli.main_eval, cli.main

    def run(args: Any) -> Any:
        return _run_one(original_run, args)  # direct callers of cli.run get validation too

    def main_eval(base: Any) -> None:
        planned: list[Any] = []
        cli.run = planned.append  # reuse clip_benchmark's own expansion of models x datasets x languages
        try:
            original_main_eval(base)
        finally:
            cli.run = run
        for args in planned:
            validate_run(args)
        for args in planned:
            _run_one(original_run, args, validated=True)

    @functools.wraps(original_main)
    def main(*a: Any, **kw: Any) -> Any:
        try:
            return original_main(*a, **kw)
        except UserError as exc:
            _stderr_line(str(exc))
            return 2

    cli.run, cli.main_eval, cli.main = run, main_eval, main


def _task_of(args: Any) -> str:
    from clip_benchmark.datasets.builder import get_dataset_default_task

    return args.task if args.task != "auto" else get_dataset_default_task(_dataset_name(args))


def _dataset_name(args: Any) -> str:
    """The dataset name without clip_benchmark's ``wds/`` prefix, as its ``run`` computes it."""
    return args.dataset.replace("wds/", "", 1) if args.dataset.startswith("wds/") else args.dataset


def _is_ours(args: Any) -> bool:
    from clip_benchmark_diffusion.registry import is_diffusion_model

    return is_diffusion_model(args.model) or args.model_type == MODEL_TYPE


def _rank() -> int:
    from clip_benchmark_diffusion.distributed import world_from_env

    return world_from_env().rank


def validate_run(args: Any) -> None:
    """Every check that needs no model weights and no images: raise UserError before compute."""
    from clip_benchmark_diffusion.registry import parse_model_spec
    from clip_benchmark_diffusion.store import ScoreStore, default_store_path
    if not _is_ours(args):
        return
    spec = parse_model_spec(args.model)
    spec.resolve_source(args.pretrained, args.model_cache_dir)
    task = _task_of(args)
    if task in UNSUPPORTED_TASKS:
        raise unsupported_task_error(task)
    if args.load_clfs:
        raise UserError(LOAD_CLFS_ERROR)
    if args.save_clf:
        raise UserError(SAVE_CLF_ERROR)
    if args.distributed:
        raise UserError("--distributed splits whole runs, not images; for diffusion models start the same command "
                        "under torchrun (or srun) without --distributed and the images are split across ranks")
    store_path = default_store_path(output_path(args, task))
    if store_path is not None:
        ScoreStore(store_path).close()  # an unreadable store is a user error now, not after the compute


def _slug(text: str) -> str:
    return text.strip("/").replace("/", "_") if not os.path.isfile(text) else os.path.basename(text)


def output_path(args: Any, task: str) -> str:
    """clip_benchmark's output name, with ``/`` in model and weights names made file-safe."""
    dataset = _dataset_name(args)
    return args.output.format(model=_slug(args.model), pretrained=_slug(args.pretrained),
                              pretrained_full_path=args.pretrained.replace("/", "_"), task=task,
                              dataset=dataset.replace("/", "_"), language=args.language)


def _run_one(original_run: Callable[[Any], Any], args: Any, validated: bool = False) -> Any:
    """Run clip_benchmark's ``run`` into a temporary file, add our fields, then move it in place."""
    from copy import copy

    if not validated:
        validate_run(args)
    final = output_path(args, _task_of(args))
    if args.skip_existing and os.path.exists(final):
        if args.verbose:
            print(f"Skip {final}, exists already.")
        return None
    # stock clip_benchmark opens --output only after the compute: a missing folder would lose the run
    Path(final).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(final).with_name(f".{Path(final).name}.{os.getpid()}.partial")
    patched = copy(args)
    patched.output, patched.skip_existing = str(tmp), False
    _current.clear()
    ours = _is_ours(args)
    if ours:
        from clip_benchmark_diffusion.store import default_store_path

        _current["store_path"] = default_store_path(final)
    try:
        try:
            result = original_run(patched)
        except Exception as exc:
            _translate_data_errors(exc)
            raise
        if tmp.exists():
            dump = json.loads(tmp.read_text())
            model = _current.get("model")
            if model is not None:
                _stderr_line(model.store_report())
                dump["metrics"].update(model.cost_summary())
                dump["diffusion_classifier"] = model.result_metadata(model_type=args.model_type)
                if dump["diffusion_classifier"]["hybrid"]:  # a hybrid's row must not pass for pure diffusion
                    dump["model"] = f"{dump['model']}+{dump['diffusion_classifier']['hybrid']}"
                    dump["metrics"]["shortlist_recall_at_k"] = _current.get("shortlist_recall")
            if _rank() == 0:  # every rank computed the same metrics; one writes them
                tmp.write_text(json.dumps(dump))
                os.replace(tmp, final)
                if "predictions" in _current:
                    _write_predictions(final, model)
                if args.verbose:
                    print(f"Wrote {final}")
        return result
    finally:
        tmp.unlink(missing_ok=True)
        _current.clear()


def _translate_data_errors(exc: BaseException) -> None:
    """Raise a one-line UserError for dataset problems a user can fix (found while reading images)."""
    from PIL import Image

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, Image.DecompressionBombError):
            raise UserError(f"an image in the dataset is too large to decode safely ({seen}); downscale it, "
                            "or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the data") from None
        seen = seen.__cause__ or seen.__context__
