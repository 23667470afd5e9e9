"""Every patch of clip_benchmark lives here, behind one version guard.

clip_benchmark has no plugin API, so its functions are wrapped in place. The start-up hook calls
:func:`on_import` right after each watched module executes; each ``_patch_*`` below changes one
thing and has a test.
What happens to each run (checks, output file, result fields) is in ``integration/lifecycle.py``.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import signal
import threading
from importlib import metadata
from typing import Any, Iterator

from clip_benchmark_diffusion._interrupts import restore_interrupts
from clip_benchmark_diffusion._watched import WATCHED
from clip_benchmark_diffusion.errors import Interrupted, Terminated, UserError
from clip_benchmark_diffusion.integration.checks import check_labels, check_model_list, check_plans, check_prompts
from clip_benchmark_diffusion.integration.lifecycle import (LOAD_CLFS_ERROR, MODEL_TYPE, RETRIEVAL_NEEDS_SHORTLIST,
                                                             UNSUPPORTED_TASKS, current_run, execute, output_path,
                                                             plan_run, stderr_line, unsupported_task_error,
                                                             validate_run)
from clip_benchmark_diffusion.predictions import PREDICTIONS_ENV

SUPPORTED = ((1, 6), (1, 7))  # [min, max) of clip_benchmark's (major, minor)
MARK = "_clip_benchmark_diffusion_patched"
__all__ = ["on_import", "ensure_installed", "version_ok", "check_prompts", "output_path", "validate_run"]


_version_ok: bool | None = None


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
            stderr_line(f"clip_benchmark_diffusion: clip_benchmark {version} is not supported (needs "
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
    elif name == "clip_benchmark.datasets.winoground":
        from clip_benchmark_diffusion.integration.winoground_local import patch

        patch(module)  # a local folder in Winoground's release layout, for any model
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

    state = current_run()
    resolved = state.plan.resolved if state is not None else None
    model, transform, tokenizer = load_diffusion_classifier(model_name, pretrained, cache_dir, device, resolved)
    if state is not None:
        if state.plan.store_path is not None:
            from clip_benchmark_diffusion.results.store import ScoreStore

            model.attach_store(ScoreStore(state.plan.store_path))
        state.model = model
    return model, transform, tokenizer


def _patch_models(models: Any) -> None:
    from clip_benchmark_diffusion.plugins import register_open_clip_configs

    register_open_clip_configs()  # plugins' CLIP architectures, so --pretrained_model NAME,PATH finds them
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
        if task_name == "zeroshot_classification":  # any model: also datasets the plan could not read
            call = signature.bind_partial(model, dataloader, *args, **kwargs).arguments
            check_prompts(call.get("classnames"), call.get("templates"), "the class list",
                          diffusion=_is_diffusion(model))
        if _is_diffusion(model):
            if task_name in UNSUPPORTED_TASKS:
                raise unsupported_task_error(task_name)
            if task_name == "zeroshot_retrieval" and not model.options.shortlist_model:
                raise UserError(RETRIEVAL_NEEDS_SHORTLIST)
            call = signature.bind_partial(model, dataloader, *args, **kwargs).arguments
            if call.get("load_clfs"):
                raise UserError(LOAD_CLFS_ERROR)
            if task_name == "zeroshot_classification":
                model.begin_task(task_name, expected_images=_dataset_size(dataloader),
                                 classnames=call.get("classnames"), templates=call.get("templates"))
            else:
                model.begin_task(task_name, expected_images=_dataset_size(dataloader))
            if task_name == "image_caption_selection":
                dataloader = _AnnouncedBatches(dataloader, model)
            if task_name == "zeroshot_retrieval":  # a hybrid: clip_benchmark's evaluate reads the reranked matrix
                from clip_benchmark_diffusion.integration.retrieval import evaluate_retrieval

                bound = signature.bind(model, dataloader, *args, **kwargs)
                bound.apply_defaults()
                return evaluate_retrieval(module, original, bound.arguments)
        if task_name == "image_caption_selection" and os.environ.get(PREDICTIONS_ENV):
            from clip_benchmark_diffusion.integration.caption_records import evaluate_recording_instances

            return evaluate_recording_instances(original, model, dataloader, *args, **kwargs)
        with _without_metric_noise():
            return original(model, dataloader, *args, **kwargs)

    module.evaluate = evaluate


@contextlib.contextmanager
def _without_metric_noise() -> Iterator[None]:
    """clip_benchmark's mean per-class recall (scikit-learn's balanced accuracy) warns whenever a class is
    predicted that no image of the set has, and its verbose report when a class is never predicted: on
    any evaluation smaller than its class list. The metric is still right, and the user can do nothing."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"y_pred contains classes not in y_true", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"(Precision|Recall|F-score) is ill-defined", category=UserWarning)
        yield


def _patch_run_classification(module: Any) -> None:
    """Keep the logits and labels of each run when asked, for any model (per-image analyses)."""
    original = module.run_classification

    @functools.wraps(original)
    def run_classification(model, classifier, dataloader, device, amp=True):
        logits, target = original(model, classifier, dataloader, device, amp=amp)
        check_labels(target, classifier.shape[1])
        state = current_run()
        if getattr(model, "is_diffusion_classifier", False) and target.dim() == 1:
            logits = model.classification_logits(logits)   # the prior correction, when asked
            hist = model.prediction_histogram(logits, target)
            if state is not None:
                state.prediction_histogram = hist
            from clip_benchmark_diffusion.prior_bias import bias_warning

            line = bias_warning(hist)
            if line is not None and model.rank == 0:
                stderr_line(line)
        if state is not None and getattr(model, "is_diffusion_classifier", False):
            state.shortlist_recall = model.shortlist_recall(target)   # None unless a hybrid
        if state is not None and os.environ.get(PREDICTIONS_ENV):
            # clip_benchmark's logits are 100 * cosine; CLIP's own probabilities use its learned
            # scale (100 for OpenAI's and most LAION models, 13.5 for the demo's clip_tiny).
            import torch

            scale = getattr(model, "logit_scale", None)
            scale = float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else 100.0
            state.predictions = (logits, target, scale)
        return logits, target

    module.run_classification = run_classification


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


# -- cli: every planned run checked before the first computes (lifecycle.py does the rest) --------
def _patch_cli(cli: Any) -> None:
    import warnings

    import clip_benchmark.models as models

    # clip_benchmark builds every webdataset without shardshuffle=, and webdataset warns about it
    # on each run; the call is clip_benchmark's (it never shuffles an evaluation), not the user's.
    warnings.filterwarnings("ignore", message=r"WebDataset\(shardshuffle=\.\.\.\) is None", category=UserWarning,
                            module=r"webdataset\.")

    cli.load_clip = models.load_clip
    # BOM-free class names and templates, a failed download as one line; the builder module's name
    # too, which the plan's checks (and API users) call
    import clip_benchmark.datasets.builder as builder

    from clip_benchmark_diffusion.integration.datasets import wrap_build_dataset

    if not hasattr(builder.build_dataset, "__wrapped__"):
        builder.build_dataset = wrap_build_dataset(builder.build_dataset)
    cli.build_dataset = builder.build_dataset
    original_run, original_main_eval, original_main = cli.run, cli.main_eval, cli.main

    def run(args: Any) -> Any:
        return execute(original_run, plan_run(args))  # direct callers of cli.run get validation too

    def main_eval(base: Any) -> None:
        check_model_list(base.pretrained_model)
        planned: list[Any] = []
        cli.run = planned.append  # reuse clip_benchmark's own expansion of models x datasets x languages
        try:
            original_main_eval(base)
        finally:
            cli.run = run
        plans = [plan_run(args) for args in planned]
        check_plans([p.output for p in plans], [f"{p.args.model},{p.args.pretrained} on {p.args.dataset}"
                                                 for p in plans])
        for plan in plans:
            execute(original_run, plan)

    @functools.wraps(original_main)
    def main(*a: Any, **kw: Any) -> Any:
        restore_interrupts()
        previous = _raise_on_sigterm()
        try:
            return original_main(*a, **kw)
        except UserError as exc:
            stderr_line(str(exc))
            return exc.exit_code
        except KeyboardInterrupt as exc:  # outside a run (planning, imports): nothing to keep
            terminated = isinstance(exc, Terminated)
            stderr_line(f"clip_benchmark_diffusion: {'terminated (SIGTERM)' if terminated else 'interrupted'}")
            return Terminated.exit_code if terminated else Interrupted.exit_code
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    cli.run, cli.main_eval, cli.main = run, main_eval, main


def _raise_on_sigterm() -> Any:
    """SIGTERM (what SLURM sends on preemption, and ``kill``'s default) raises :class:`Terminated` in
    the main thread, so it takes Ctrl-C's path: the images in flight are checkpointed and one line
    says what was kept. Python's default would end the process at once and lose their work. Only the
    first raises: later ones (a scheduler repeating itself) must not cut the save short. Returns the
    handler it replaced, or None when it could not install one (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    fired = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise Terminated()

    return signal.signal(signal.SIGTERM, handler)
