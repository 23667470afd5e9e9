"""The life of one planned run of ``clip_benchmark eval``: plan and check, run, write the result.

The patches (``integration/clip_benchmark.py``) hand every run clip_benchmark plans to
:func:`plan_run` before the first one computes, then each plan to :func:`execute`. A run writes
into a hidden partial file beside its result and moves it into place when complete. What a run
learns while it computes (the diffusion model it loaded, the logits to dump) lives in its
:class:`RunState`, reached through :func:`current_run`.
"""
from __future__ import annotations

import json
import os
import sys
from contextvars import ContextVar
from copy import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from clip_benchmark_diffusion.errors import Interrupted, UserError
from clip_benchmark_diffusion.partial_files import partial_path, remove_stale_partials
from clip_benchmark_diffusion.predictions import write_predictions

MODEL_TYPE = "diffusion"
# Tasks a diffusion model cannot serve exactly, and why (one line each).
UNSUPPORTED_TASKS = {
    "zeroshot_retrieval": "retrieval scores every text against every image in independent batches, "
                          "which a joint image-text score cannot serve exactly",
    "linear_probe": "a linear probe needs image features, and a diffusion classifier has none",
    "captioning": "captioning needs a text generator",
}
# clip_benchmark scores a multi-label set by each class's average precision, ranking that class's
# logits *across images*; a diffusion classifier's logits are ranks made within each image, so the
# ranking would be meaningless (a refusal, not a wrong mAP: see docs/compositional.md, issue 24).
MULTILABEL_DATASETS = ("voc2007_multilabel",)
MULTILABEL_ERROR = ("multi-label datasets ({dataset}) are not supported by diffusion models: clip_benchmark computes "
                    "each class's average precision by ranking its logits across images, and a diffusion "
                    "classifier's logits are ranks within each image; use a single-label dataset (e.g. voc2007)")
LOAD_CLFS_ERROR = ("--load_clfs is not supported by diffusion models: a saved text classifier "
                   "holds no prompts to denoise with; drop --load_clfs")
SAVE_CLF_ERROR = ("--save_clf is not supported by diffusion models: their classifier is a one-hot "
                  "placeholder, not text features; drop --save_clf")


def unsupported_task_error(task: str) -> UserError:
    return UserError(f"task {task} is not supported by diffusion models: {UNSUPPORTED_TASKS[task]}; "
                     "use zeroshot_classification")


def stderr_line(text: str) -> None:
    """Print one line to stderr in a single write: under torchrun the ranks share stderr, and
    print() writes the text and its newline separately, so another rank's output can land between."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


@dataclass(frozen=True)
class RunPlan:
    """One run of the command (a model x dataset x language), checked before any run computes."""

    args: Any                 # clip_benchmark's namespace for this run (its own copy)
    task: str                 # the task, ``auto`` resolved
    output: Path              # the result file
    ours: bool                # a diffusion model
    store_path: Path | None   # its score store; None when off or not ours

    @property
    def partial(self) -> Path:
        """Where clip_benchmark writes the result before it is complete."""
        return partial_path(self.output)


@dataclass
class RunState:
    """What the run in progress has learnt: filled in by the patches while it computes."""

    plan: RunPlan
    model: Any = None                       # the diffusion classifier, once loaded
    predictions: tuple[Any, Any, float] | None = None  # (logits, target, CLIP's logit scale) when asked
    shortlist_recall: float | None = None   # a hybrid's shortlister recall@k on this run
    # caption selection: (per-instance verdicts, top captions of the first image) when asked
    caption_predictions: tuple[list[bool], list[list[int]]] | None = None
    # zero-shot classification, diffusion: the predicted-class histogram (``prior_bias.prediction_histogram``)
    prediction_histogram: dict | None = None


_state: ContextVar[RunState | None] = ContextVar("clip_benchmark_diffusion_run", default=None)


def current_run() -> RunState | None:
    """The state of the run being executed, or None outside :func:`execute`."""
    return _state.get()


def task_of(args: Any) -> str:
    from clip_benchmark.datasets.builder import get_dataset_default_task

    return args.task if args.task != "auto" else get_dataset_default_task(dataset_name(args))


def dataset_name(args: Any) -> str:
    """The dataset name without clip_benchmark's ``wds/`` prefix, as its ``run`` computes it."""
    return args.dataset.replace("wds/", "", 1) if args.dataset.startswith("wds/") else args.dataset


def is_ours(args: Any) -> bool:
    from clip_benchmark_diffusion.registry import is_diffusion_model

    return is_diffusion_model(args.model) or args.model_type == MODEL_TYPE


def _rank() -> int:
    from clip_benchmark_diffusion.distributed import world_from_env

    return world_from_env().rank


def plan_run(args: Any) -> RunPlan:
    """Every check that needs no model weights and no images, then the run's plan."""
    from clip_benchmark_diffusion.integration.checks import check_run
    from clip_benchmark_diffusion.store import ScoreStore, default_store_path

    ours = is_ours(args)
    if ours:
        validate_run(args)
    task = task_of(args)
    output = output_path(args, task)
    if args.skip_existing and output.exists():  # will be skipped: its data need not be there any more
        return RunPlan(args=args, task=task, output=output, ours=ours, store_path=None)
    check_run(args, task, dataset_name(args), diffusion=ours)
    store_path = default_store_path(str(output)) if ours else None
    if store_path is not None:
        ScoreStore.check(store_path)  # creates nothing: a refused run leaves no empty store behind
    return RunPlan(args=args, task=task, output=output, ours=ours, store_path=store_path)


def validate_run(args: Any) -> None:
    """The model checks of a diffusion run: recipe, weights, task and flags; UserError before compute."""
    from clip_benchmark_diffusion.registry import parse_model_spec

    if not is_ours(args):
        return
    spec = parse_model_spec(args.model)
    spec.resolve_source(args.pretrained, args.model_cache_dir)
    task = task_of(args)
    if task in UNSUPPORTED_TASKS:
        raise unsupported_task_error(task)
    if task == "zeroshot_classification" and dataset_name(args) in MULTILABEL_DATASETS:
        raise UserError(MULTILABEL_ERROR.format(dataset=dataset_name(args)))
    if args.load_clfs:
        raise UserError(LOAD_CLFS_ERROR)
    if args.save_clf:
        raise UserError(SAVE_CLF_ERROR)
    if args.distributed:
        raise UserError("--distributed splits whole runs, not images; for diffusion models start the same command "
                        "under torchrun (or srun) without --distributed and the images are split across ranks")


def _slug(text: str) -> str:
    return text.strip("/").replace("/", "_") if not os.path.isfile(text) else os.path.basename(text)


def output_path(args: Any, task: str) -> Path:
    """clip_benchmark's output name, with ``/`` in model and weights names made file-safe; checked writable."""
    from clip_benchmark_diffusion.integration.checks import format_output

    dataset = dataset_name(args)
    return format_output(args.output, dict(model=_slug(args.model), pretrained=_slug(args.pretrained),
                                           pretrained_full_path=args.pretrained.replace("/", "_"), task=task,
                                           dataset=dataset.replace("/", "_"), language=args.language))


def execute(original_run: Callable[[Any], Any], plan: RunPlan) -> Any:
    """Run clip_benchmark's ``run`` into the partial file, add our fields, then move it in place."""
    args, final, tmp = plan.args, plan.output, plan.partial
    if args.skip_existing and final.exists():
        if args.verbose:
            print(f"Skip {final}, exists already.")
        return None
    # stock clip_benchmark opens --output only after the compute: a missing folder would lose the run
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final)
    patched = copy(args)
    patched.output, patched.skip_existing = str(tmp), False
    state = RunState(plan)
    token = _state.set(state)
    try:
        try:
            result = original_run(patched)
            if tmp.exists():
                _finish(state, tmp, final)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted{_kept(plan)}") from None
        except UserError:
            raise
        except Exception as exc:
            _translate_errors(exc, plan)
            raise
        return result
    finally:
        tmp.unlink(missing_ok=True)
        _state.reset(token)


def _finish(state: RunState, tmp: Path, final: Path) -> None:
    """Add our fields to clip_benchmark's result and move it (and the predictions) into place."""
    dump = json.loads(tmp.read_text())
    model = state.model
    if model is not None:
        stderr_line(model.store_report())
        dump["metrics"].update(model.cost_summary())
        dump["diffusion_classifier"] = model.result_metadata(model_type=state.plan.args.model_type)
        if state.prediction_histogram is not None:
            dump["diffusion_classifier"]["predicted_classes"] = state.prediction_histogram
        if dump["diffusion_classifier"].get("hybrid"):  # a hybrid's row must not pass for pure diffusion
            dump["model"] = f"{dump['model']}+{dump['diffusion_classifier']['hybrid']}"
            dump["metrics"]["shortlist_recall_at_k"] = state.shortlist_recall
    if _rank() == 0:  # every rank computed the same metrics; one writes them
        tmp.write_text(json.dumps(dump))
        os.replace(tmp, final)
        if state.predictions is not None:
            _write_predictions(final, state.predictions, model)
        if state.caption_predictions is not None:
            verdicts, rankings = state.caption_predictions
            calls = model.record.calls if model is not None else []
            if len(calls) != len(verdicts):  # Winoground: calls are per image, not per instance
                calls = [None] * len(verdicts)
            write_predictions(final, [0] * len(verdicts), rankings, calls, correct=verdicts,
                              extra=_caption_errors(model, len(verdicts)))
        if state.plan.args.verbose:
            print(f"Wrote {final}")


def _caption_errors(model: Any, n: int) -> list[dict] | None:
    """A diffusion model's raw errors per instance (what every caption normalisation is computed from)."""
    if model is None or not getattr(model, "pair_errors", None):
        return None
    import torch

    pair = torch.cat(model.pair_errors)                        # (N, nim, nt)
    if len(pair) != n:
        return None
    uncond = torch.cat(model.unconditional_errors) if model.unconditional_errors else None
    return [{"pair_errors": pair[i].tolist(),
             **({"unconditional_errors": uncond[i].tolist()} if uncond is not None else {})} for i in range(n)]


def _write_predictions(final: Path, predictions: tuple[Any, Any, float], model: Any) -> None:
    """``<output stem>.predictions.jsonl``: per image the label, the top-5 classes, the top-1
    probability and (ours) the calls."""
    import torch

    logits, target, scale = predictions
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices.tolist()
    if model is not None:
        calls = model.record.calls
        confidence = model.record.confidences(model.options.temperature, model.options.temperature_power)
    else:
        calls = [None] * len(top)
        confidence = torch.softmax(logits.float() * (scale / 100.0), dim=1).max(1).values.tolist()
    write_predictions(final, target.tolist(), top, calls, confidence)


def _kept(plan: RunPlan) -> str:
    """What survives a run stopped mid-way, and how to go on."""
    if plan.store_path is None:
        return "; no result file was written" if not plan.ours else \
            "; the score store is off, so the images scored so far are lost"
    return (f"; every image finished so far is kept in the score store {plan.store_path}: "
            "run the same command again to resume")


def _translate_errors(exc: BaseException, plan: RunPlan) -> None:
    """Raise a one-line UserError for problems found mid-run that a user can fix (data, disk)."""
    import errno
    import tarfile

    from PIL import Image

    seen: BaseException | None = exc
    while seen is not None:
        text = " ".join(str(seen).split())
        if isinstance(seen, Image.DecompressionBombError):
            raise UserError(f"an image in the dataset is too large to decode safely ({seen}); downscale it, "
                            "or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the data") from None
        if isinstance(seen, (Image.UnidentifiedImageError, SyntaxError)) or "image file is truncated" in text:
            raise UserError(f"an image in {plan.args.dataset} cannot be decoded ({text}); remove or restore "
                            f"it{_kept(plan)}") from None
        if isinstance(seen, tarfile.TarError):
            raise UserError(f"a shard of {plan.args.dataset} cannot be read ({seen.args[0]}; {seen.args[-1]}); "
                            f"restore it{_kept(plan)}") from None
        if isinstance(seen, ValueError) and "fewer shards than workers" in text:
            raise UserError(f"a dataloader worker of {plan.args.dataset} got no shard; use fewer --num_workers "
                            "than the dataset has shards") from None
        if isinstance(seen, ValueError) and text.startswith("Unsupported dataset"):
            raise UserError(f"clip_benchmark does not know the dataset {plan.args.dataset!r}; see its "
                            "dataset list, or give a local webdataset folder as wds/NAME") from None
        if isinstance(seen, RuntimeError) and text.startswith("Failed to download weights for tag"):
            raise UserError(f"open_clip could not fetch the weights {plan.args.pretrained!r} of {plan.args.model} "
                            f"({text[:200]}); connect to the network once, or give a local weights file") from None
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            raise UserError(f"no space left on device ({text}); free disk space{_kept(plan)}") from None
        seen = seen.__cause__ or seen.__context__
