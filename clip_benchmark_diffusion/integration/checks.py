"""Checks of a planned run that need no model weights and no image decoding.

:func:`check_run` is called for every run of a command before the first one computes, for any
model type: a mistake in the third run's dataset then costs seconds, not the first two runs'
compute. Each check raises :class:`UserError` with one line that says what to fix.
"""
from __future__ import annotations

import os
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.integration.datasets import check_dataset_present
from clip_benchmark_diffusion.integration.shards import check_shards, read_nshards

if TYPE_CHECKING:
    from clip_benchmark_diffusion.options import ScoringOptions

OUTPUT_FIELDS = ("dataset", "model", "pretrained", "pretrained_full_path", "task", "language")


def check_run(args: Any, task: str, dataset_name: str, diffusion: bool) -> None:
    """The checks every run gets (CLIP runs included): batch size, workers, open_clip names, data."""
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: give at least 1 image per batch")
    if args.num_workers < 0:
        raise UserError(f"--num_workers {args.num_workers}: give 0 (load in the main process) or more")
    for flag, path in (("--custom_template_file", args.custom_template_file),
                       ("--custom_classname_file", args.custom_classname_file)):
        if path:
            check_json_file(flag, path)
    if args.model_type == "open_clip" and not diffusion:
        check_open_clip(args.model, args.pretrained)
    try:  # clip_benchmark fills these two fields only
        root = args.dataset_root.format(dataset=dataset_name, dataset_cleaned=dataset_name.replace("/", "-"))
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(f"--dataset_root {args.dataset_root!r} is not a valid template ({exc!r}); clip_benchmark "
                        "fills only {dataset} and {dataset_cleaned}") from None
    if args.dataset.startswith("wds/"):
        check_wds(args, root, task, diffusion)
    else:
        check_dataset_present(args, root, args.dataset)


def check_model_list(pretrained_model: Any) -> None:
    """``--pretrained_model`` entries clip_benchmark can split: ``MODEL,PRETRAINED``, a collection or a file."""
    from clip_benchmark.model_collection import model_collection

    entries = pretrained_model if isinstance(pretrained_model, list) else [pretrained_model] if pretrained_model else []
    for entry in entries:
        if os.path.isfile(entry) or entry in model_collection:
            continue
        if entry.count(",") != 1:
            raise UserError(f"--pretrained_model {entry!r} should be MODEL,PRETRAINED (e.g. diffusion_tiny,default "
                            "or ViT-B-32,openai), a model collection name or a file of such lines")


def check_plans(outputs: list[Path], names: list[str]) -> None:
    """A command plans at least one run, and no two runs write the same result file."""
    if not outputs:
        raise UserError("the command plans no run (an empty --pretrained_model file or --dataset list?)")
    first: dict[Path, int] = {}
    for i, path in enumerate(outputs):
        key = Path(os.path.abspath(path))
        if key in first:
            raise UserError(f"runs {names[first[key]]} and {names[i]} would both write {path}, the second "
                            "overwriting the first; put {model}, {pretrained} and {dataset} in --output")
        first[key] = i


def check_json_file(flag: str, path: str) -> None:
    """A custom prompt or class-name file: an existing UTF-8 JSON object (clip_benchmark reads it later)."""
    import json

    try:
        # utf-8-sig: a byte-order mark is read past here and dropped before clip_benchmark reads the file
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise UserError(f"{flag} {path} does not exist") from None
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{flag} {path} is not a UTF-8 JSON file ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise UserError(f"{flag} {path} must hold a JSON object keyed by dataset name, not {type(data).__name__}")


def format_output(template: str, fields: Mapping[str, str]) -> Path:
    """``--output`` filled in like clip_benchmark does, and a place we can write to."""
    try:
        path = Path(template.format(**fields))
    except KeyError as exc:
        raise UserError(f"--output {template!r} names {{{exc.args[0]}}}, which clip_benchmark does not fill; "
                        f"use {', '.join('{' + f + '}' for f in OUTPUT_FIELDS)}") from None
    except (IndexError, ValueError) as exc:
        raise UserError(f"--output {template!r} is not a valid name template ({exc}); "
                        f"name fields like {{dataset}}, and write a literal brace as {{{{ or }}}}") from None
    if path.is_dir():
        raise UserError(f"--output {path} is a folder; give a file name such as {path}/{{dataset}}_{{model}}.json")
    check_writable(path, "--output")
    return path


def check_writable(path: Path, what: str) -> None:
    """``path`` can be created: its nearest existing ancestor is a writable folder."""
    for ancestor in path.parents:
        if ancestor.exists() or ancestor == Path(ancestor.anchor or "."):
            break
    else:  # a relative path with no existing ancestor: the working directory
        ancestor = Path(".")
    if not ancestor.is_dir():
        raise UserError(f"{what} {path} is under {ancestor}, which is a file, not a folder; pick another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: the folder {ancestor} is not writable; pick another path")


def check_shortlister(options: ScoringOptions) -> None:
    """A hybrid's open_clip shortlister names a model and weights open_clip can find (nothing to check
    for pure diffusion); before the diffusion model loads."""
    if options.shortlist_model:
        check_open_clip(options.shortlist_model, options.shortlist_pretrained, "shortlist_pretrained")


def check_open_clip(model: str, pretrained: str, what: str = "--pretrained") -> None:
    """An open_clip architecture and weights open_clip can find, before any model of the command loads
    (``what`` names the weights' flag or option in the message)."""
    if model.startswith(("hf-hub:", "local-dir:")):
        return  # open_clip reads these itself; pretrained is ignored
    import open_clip
    from open_clip.pretrained import is_pretrained_cfg, list_pretrained_tags_by_model

    from clip_benchmark_diffusion.plugins import register_open_clip_configs

    register_open_clip_configs()  # plugins' CLIP architectures (the demo's), which hybrids may name
    if model not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(model, open_clip.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; open_clip.list_models() lists them"
        raise UserError(f"unknown open_clip model {model!r}{hint}")
    if not pretrained or is_pretrained_cfg(model, pretrained) or os.path.isfile(pretrained):
        return
    tags = list_pretrained_tags_by_model(model)
    raise UserError(f"{what} {pretrained!r} is neither an open_clip weights tag of {model} "
                    f"({', '.join(tags) if tags else 'it has none'}) nor an existing file")


def check_wds(args: Any, root: str, task: str, diffusion: bool) -> None:
    """A local clip_benchmark webdataset folder: shards, class names, templates and labels."""
    if "://" in root:
        return  # remote shards are read by webdataset itself
    folder = Path(root)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--dataset_root {root} of {args.dataset} is a file; give the folder that holds "
                        f"{args.split}/nshards.txt")
    if not folder.is_dir():
        hint = " (the default; pass --dataset_root)" if root == "root" else ""
        raise UserError(f"dataset folder {root!r}{hint} of {args.dataset} does not exist; give the folder that "
                        f"holds {args.split}/nshards.txt")
    classes = None
    if task == "zeroshot_classification":
        classes, templates = _classes_and_templates(args, root, task)
        check_prompts(classes, templates, f"the class list of {args.dataset}", diffusion)
    kind = folder / "dataset_type.txt"
    if diffusion and task == "zeroshot_classification" and kind.is_file() \
            and kind.read_text().strip().lower() == "multilabel":
        from clip_benchmark_diffusion.integration.refusals import MULTILABEL_ERROR

        raise UserError(MULTILABEL_ERROR.format(dataset=f"{args.dataset}: its dataset_type.txt says multilabel"))
    labelled = task == "zeroshot_classification" and (
        not kind.is_file() or kind.read_text().strip().lower() == "classification")
    nshards = check_shards(folder / args.split, classes, labelled=labelled)
    if args.num_workers > nshards:
        raise UserError(f"--num_workers {args.num_workers} is more than the {nshards} shard(s) of {args.dataset}: "
                        f"webdataset gives each worker whole shards and fails on a worker without one; "
                        f"use --num_workers {nshards} or fewer")


def _classes_and_templates(args: Any, root: str, task: str) -> tuple[list[str], Any]:
    """clip_benchmark's own reading of the folder and the custom files (no images opened)."""
    split = Path(root) / args.split
    if not split.is_dir():
        raise UserError(f"{split} does not exist: {args.dataset} has no {args.split!r} split there; "
                        f"write the dataset with clip_benchmark's webdataset converter")
    read_nshards(split)
    if not args.custom_classname_file and not (Path(root) / "classnames.txt").is_file():
        raise UserError(f"{root}/classnames.txt does not exist; write one class name per line")
    from clip_benchmark.datasets.builder import build_dataset

    try:
        ds = build_dataset(dataset_name=args.dataset, root=root, transform=None, split=args.split,
                           download=False, language=args.language, task=task,
                           custom_template_file=args.custom_template_file,
                           custom_classname_file=args.custom_classname_file)
    except (AssertionError, FileNotFoundError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"dataset {args.dataset} in {root} cannot be read: {' '.join(str(exc).split())}") from None
    classes = getattr(ds, "classes", None)
    if classes is None:
        raise UserError(f"{root}/classnames.txt does not exist; write one class name per line")
    return list(classes), ds.templates


def check_prompts(classes: Any, templates: Any, where: str, diffusion: bool) -> None:
    """Class names and prompts that let a model tell the classes apart; ``diffusion`` adds its own rules."""
    if classes is None or templates is None:
        return  # clip_benchmark itself refuses a dataset without classes or templates
    classes = list(classes)
    check_classes(classes, where)
    if isinstance(templates, dict):
        empty = [c for c in classes if not templates.get(c)]
        if empty:
            raise UserError(f"the per-class prompt file gives no prompts for {', '.join(map(repr, empty[:3]))}"
                            f"{' and more' if len(empty) > 3 else ''}; add prompts for every class")
    elif not templates:
        raise UserError("the template list is empty (an empty zeroshot_classification_templates.txt or "
                        "--custom_template_file entry?); add templates such as 'a photo of a {c}.'")
    check_template_fields(templates)
    if diffusion and not isinstance(templates, dict):
        # one prompt of a class's average for CLIP, but a diffusion score would mix in a constant
        missing = [t for t in templates if "{c}" not in t]
        if missing:
            raise UserError(f"template {missing[0]!r} has no {{c}} placeholder, so every class would get the same "
                            "prompt; write templates like 'a photo of a {c}.'")
    check_distinct_prompts(classes, templates)


def check_labels(target: Any, n_classes: int) -> None:
    """Every label indexes the class list: one outside it would skew per-class recall without a word."""
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= n_classes):
        bad = int(target.max()) if int(target.max()) >= n_classes else int(target.min())
        raise UserError(f"the dataset has label {bad}, outside its {n_classes} classes (0-{n_classes - 1}); "
                        "fix the labels or the class list (classnames.txt, --custom_classname_file)")


def check_classes(classes: list[str], where: str) -> None:
    """A non-empty list of distinct, non-empty names: a repeated class can never be told apart."""
    if not classes:
        raise UserError(f"{where} is empty (an empty classnames.txt?); write one class name per line")
    seen: dict[str, int] = {}
    for i, name in enumerate(classes):
        if not str(name).strip():
            raise UserError(f"{where} has an empty name at line {i + 1}; remove blank lines from classnames.txt")
        if name in seen:
            raise UserError(f"{where} names {name!r} twice (lines {seen[name] + 1} and {i + 1}): a model cannot "
                            "tell two classes of one name apart; make the names distinct")
        seen[name] = i


def check_template_fields(templates: Any) -> None:
    """Templates name only ``{c}``: clip_benchmark formats them with ``c=`` alone."""
    texts = _all_templates(templates)
    for text in texts:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
        except ValueError as exc:
            raise UserError(f"template {text!r} is not a valid template ({exc}); write a literal brace as "
                            "{{ or }}") from None
        other = [f for f in fields if f != "c"]
        if other:
            raise UserError(f"template {text!r} has the field {{{other[0]}}}, but clip_benchmark fills only {{c}} "
                            "(the class name); write templates like 'a photo of a {c}.'")


def check_distinct_prompts(classes: list[str], templates: Any) -> None:
    """No two classes with the same set of prompts: they would get identical scores from any model."""
    owner: dict[frozenset[str], str] = {}
    for name in classes:
        prompts = frozenset(_prompts_of(name, templates))
        if prompts and prompts in owner:
            raise UserError(f"classes {owner[prompts]!r} and {name!r} get identical prompts "
                            f"({sorted(prompts)[0]!r}...), so no model can tell them apart; "
                            "give them different names or prompts")
        owner.setdefault(prompts, name)


def _prompts_of(name: str, templates: Any) -> list[str]:
    if isinstance(templates, dict):
        return list(templates.get(name) or [])
    return [t.format(c=name) for t in templates or []]


def _all_templates(templates: Any) -> Iterable[str]:
    if isinstance(templates, dict):
        return []  # per-class prompt files hold finished prompts: clip_benchmark does not format them
    return list(templates or [])
