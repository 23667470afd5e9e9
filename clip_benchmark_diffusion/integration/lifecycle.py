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
from typing import TYPE_CHECKING, Any, Callable

from clip_benchmark_diffusion.errors import Interrupted, Terminated, UserError
from clip_benchmark_diffusion.integration.refusals import (LOAD_CLFS_ERROR, MULTILABEL_DATASETS,  # noqa: F401
                                                           MULTILABEL_ERROR, RETRIEVAL_NEEDS_SHORTLIST,
                                                           SAVE_CLF_ERROR, UNSUPPORTED_TASKS, unsupported_task_error)
from clip_benchmark_diffusion.partial_files import partial_path, remove_stale_partials
from clip_benchmark_diffusion.predictions import DIGEST_FIELD, file_digest, predictions_path, write_predictions

if TYPE_CHECKING:
    from argparse import Namespace

    from clip_benchmark_diffusion.adapter.protocols import DiffusionRunModel
    from clip_benchmark_diffusion.registry import ModelSpec, ResolvedModel

MODEL_TYPE = "diffusion"


def stderr_line(text: str) -> None:
    """Print one line to stderr in a single write: under torchrun the ranks share stderr, and
    print() writes the text and its newline separately, so another rank's output can land between."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


@dataclass(frozen=True)
class RunPlan:
    """One run of the command (a model x dataset x language), checked before any run computes."""

    args: "Namespace"         # clip_benchmark's namespace for this run (its own copy)
    task: str                 # the task, ``auto`` resolved
    output: Path              # the result file
    ours: bool                # a diffusion model
    store_path: Path | None   # its score store; None when off or not ours
    resolved: "ResolvedModel | None" = None   # the model spec and checked weights, resolved once; None if not ours

    @property
    def partial(self) -> Path:
        """Where clip_benchmark writes the result before it is complete."""
        return partial_path(self.output)


@dataclass
class RunState:
    """What the run in progress has learnt: filled in by the patches while it computes."""

    plan: RunPlan
    model: "DiffusionRunModel | None" = None   # the diffusion classifier, once loaded
    predictions: tuple[Any, Any, float] | None = None  # (logits, target, CLIP's logit scale) when asked
    shortlist_recall: float | None = None   # a hybrid's shortlister recall@k on this run
    # caption selection: (per-instance verdicts, top captions of the first image) when asked
    caption_predictions: tuple[list[bool], list[list[int]]] | None = None
    # zero-shot classification, diffusion: the predicted-class histogram (``prior_bias.prediction_histogram``)
    prediction_histogram: dict | None = None
    # zero-shot retrieval (a hybrid): how it reranked, for the result, and its closing line
    retrieval: dict | None = None
    retrieval_report: str | None = None


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
    from clip_benchmark_diffusion.results.store import ScoreStore, default_store_path

    ours = is_ours(args)
    resolved = validate_run(args) if ours else None
    task = task_of(args)
    output = output_path(args, task, resolved)
    if args.skip_existing and output.exists():  # will be skipped: its data need not be there any more
        return RunPlan(args=args, task=task, output=output, ours=ours, store_path=None, resolved=resolved)
    check_run(args, task, dataset_name(args), diffusion=ours)
    store_path = default_store_path(str(output)) if ours else None
    if store_path is not None:
        ScoreStore.check(store_path)  # creates nothing: a refused run leaves no empty store behind
    return RunPlan(args=args, task=task, output=output, ours=ours, store_path=store_path, resolved=resolved)


def validate_run(args: Any) -> "ResolvedModel | None":
    """The model checks of a diffusion run: recipe, weights, task and flags; UserError before compute.
    Returns the resolved model (None for a model that is not ours)."""
    from clip_benchmark_diffusion.registry import resolve

    if not is_ours(args):
        return None
    resolved = resolve(args.model, args.pretrained, args.model_cache_dir)
    options = resolved.spec.options
    from clip_benchmark_diffusion.integration.checks import check_shortlister

    check_shortlister(options)
    options.fast_path.check_device(_run_device_type())
    options.fast_path.check_family(resolved.family.name, resolved.family.classic_attention)
    task = task_of(args)
    if task in UNSUPPORTED_TASKS:
        raise unsupported_task_error(task)
    if task == "zeroshot_retrieval" and not options.shortlist_model:
        raise UserError(RETRIEVAL_NEEDS_SHORTLIST)
    if task == "zeroshot_classification" and dataset_name(args) in MULTILABEL_DATASETS:
        raise UserError(MULTILABEL_ERROR.format(dataset=dataset_name(args)))
    if args.load_clfs:
        raise UserError(LOAD_CLFS_ERROR)
    if args.save_clf:
        raise UserError(SAVE_CLF_ERROR)
    if args.distributed:
        raise UserError("--distributed splits whole runs, not images; for diffusion models start the same command "
                        "under torchrun (or srun) without --distributed and the images are split across ranks")
    return resolved


def _run_device_type() -> str:
    """The device type clip_benchmark's ``run`` will pick (it sets ``args.device`` itself: cuda when it has one)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _slug(text: str) -> str:
    return text.strip("/").replace("/", "_") if not os.path.isfile(text) else os.path.basename(text)


def _hybrid_from_environment(spec: "ModelSpec") -> str | None:
    """The hybrid label that ``CLIP_BENCHMARK_DIFFUSION_OPTIONS`` gives ``--model`` beyond what ``--model``
    itself says (None when it makes no hybrid, or the same one as ``--model``'s options file)."""
    label = spec.options.shortlist_label
    return label if label != spec.model_options.shortlist_label else None


def output_path(args: Any, task: str, resolved: "ResolvedModel | None" = None) -> Path:
    """clip_benchmark's output name, with ``/`` in model and weights names made file-safe; checked writable.
    ``resolved``: the run's model, when the plan has it (else ``--model`` is parsed here)."""
    from clip_benchmark_diffusion.integration.checks import format_output
    from clip_benchmark_diffusion.options import OPTIONS_ENV
    from clip_benchmark_diffusion.registry import parse_model_spec

    dataset = dataset_name(args)
    model = _slug(args.model)
    hybrid = None
    if resolved is not None:
        hybrid = _hybrid_from_environment(resolved.spec)
    elif is_ours(args) and os.environ.get(OPTIONS_ENV, "").strip():  # without the variable, no hybrid
        hybrid = _hybrid_from_environment(parse_model_spec(args.model))
    if hybrid:  # the pure run's file name would be overwritten: the name says what ran, as the result does
        model = f"{model}+{hybrid.replace('/', '_').replace(':', '-')}"
    return format_output(args.output, dict(model=model, pretrained=_slug(args.pretrained),
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
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated): in-flight work is saved by now
            if isinstance(exc, Terminated):
                raise Interrupted(f"terminated (SIGTERM){_kept(plan)}", Terminated.exit_code) from None
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
        if state.model is not None:  # the run is over: a closed store leaves no -wal or -shm beside it
            state.model.close_store()


def _finish(state: RunState, tmp: Path, final: Path) -> None:
    """Add our fields to clip_benchmark's result and move it (and the predictions) into place."""
    dump = json.loads(tmp.read_text())
    model = state.model
    if model is not None:
        stderr_line(state.retrieval_report or model.store_report())
        if state.retrieval is None:  # retrieval writes its cost per query with its metrics
            dump["metrics"].update(model.cost_summary())
        dump["diffusion_classifier"] = model.result_metadata(model_type=state.plan.args.model_type)
        _portable_paths(dump, model.weights_digest)
        if state.prediction_histogram is not None:
            dump["diffusion_classifier"]["predicted_classes"] = state.prediction_histogram
        if state.retrieval is not None:
            dump["diffusion_classifier"]["retrieval"] = state.retrieval
        if dump["diffusion_classifier"].get("hybrid"):  # a hybrid's row must not pass for pure diffusion
            dump["model"] = f"{dump['model']}+{dump['diffusion_classifier']['hybrid']}"
            if state.retrieval is None:  # retrieval writes its ceilings in both directions itself
                dump["metrics"]["shortlist_recall_at_k"] = state.shortlist_recall
    if _rank() == 0:  # every rank computed the same metrics; one writes them
        # Predictions first, then the result with their digest: a result never names a file that is not
        # its own, and one rewritten without predictions removes the previous run's (compare reads it).
        preds = _write_any_predictions(state, final, model)
        if preds is None:
            predictions_path(final).unlink(missing_ok=True)
        dump[DIGEST_FIELD] = file_digest(preds) if preds is not None else None
        tmp.write_text(json.dumps(dump))
        os.replace(tmp, final)
        if state.plan.args.verbose:
            print(f"Wrote {final}")


def _write_any_predictions(state: RunState, final: Path, model: "DiffusionRunModel | None") -> Path | None:
    """The predictions file of this run, if it was asked for (``PREDICTIONS_ENV``)."""
    if state.predictions is not None:
        return _write_predictions(final, state.predictions, model)
    if state.caption_predictions is not None:
        verdicts, rankings = state.caption_predictions
        calls = model.image_calls() if model is not None else []
        if len(calls) != len(verdicts):  # Winoground: calls are per image, not per instance
            calls = [None] * len(verdicts)
        return write_predictions(final, [0] * len(verdicts), rankings, calls, correct=verdicts,
                                 extra=_caption_errors(model, len(verdicts)))
    return None


SMALL_FILE = 16 << 20   # files up to this size are identified by a digest of their bytes


def portable_path(text: str, weights_digest: Callable[[], str]) -> str:
    """How a result names a local path without leaking the machine's folders into leaderboards: relative
    to the working directory when inside it; otherwise the file or folder's name and a digest of its
    content (a small file's bytes; the loaded weights' fingerprint for a folder or a weights file).
    Anything else (a hub name, a preset, a relative path) is returned as given."""
    path = Path(text)
    if not path.is_absolute() or not path.exists():
        return text
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        pass
    if path.is_file() and path.stat().st_size <= SMALL_FILE:
        import hashlib

        digest = hashlib.blake2b(path.read_bytes(), digest_size=8).hexdigest()
    else:
        digest = weights_digest()
    return f"{path.name}#{digest}"


def _portable_paths(dump: dict, weights_digest: Callable[[], str]) -> None:
    """Our result's path fields (weights, options file, --model's options part, --pretrained) made portable."""
    from clip_benchmark_diffusion.registry import OPTION_SEPARATOR

    meta = dump["diffusion_classifier"]
    for holder, name in ((meta, "weights"), (meta, "option_source"), (dump, "pretrained")):
        if isinstance(holder.get(name), str):
            holder[name] = portable_path(holder[name], weights_digest)
    base, sep, source = dump["model"].partition(OPTION_SEPARATOR)
    if sep:
        dump["model"] = f"{base}{sep}{portable_path(source, weights_digest)}"


def _caption_errors(model: "DiffusionRunModel | None", n: int) -> list[dict] | None:
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


def _write_predictions(final: Path, predictions: tuple[Any, Any, float], model: "DiffusionRunModel | None") -> Path:
    """``<output stem>.predictions.jsonl``: per image the label, the top-5 classes, the top-1
    probability and (ours) the calls."""
    import torch

    logits, target, scale = predictions
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices.tolist()
    if model is not None:
        calls = model.image_calls()
        confidence = model.confidences()
    else:
        calls = [None] * len(top)
        confidence = torch.softmax(logits.float() * (scale / 100.0), dim=1).max(1).values.tolist()
    return write_predictions(final, target.tolist(), top, calls, confidence)


def _kept(plan: RunPlan) -> str:
    """What survives a run stopped mid-way, and how to go on."""
    if plan.store_path is None:
        return "; no result file was written" if not plan.ours else \
            "; the score store is off, so the images scored so far are lost"
    return (f"; every image finished so far is kept in the score store {plan.store_path}, and the work "
            "done on the images in flight: run the same command again to resume")


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
