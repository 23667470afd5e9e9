"""One test per thing the integration patches in clip_benchmark."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.integration import clip_benchmark as integ


@pytest.fixture(scope="module", autouse=True)
def installed():
    integ.ensure_installed()


def test_model_type_registered_in_place():
    import clip_benchmark.cli as cli
    import clip_benchmark.models as models

    assert models.TYPE2FUNC["diffusion"] is integ._load_diffusion
    assert "diffusion" in models.MODEL_TYPES and models.MODEL_TYPES.count("diffusion") == 1
    parser_types = subprocess.run([sys.executable, "-c", "import clip_benchmark.cli as c, sys; sys.argv=['x','eval','--help'];\n"
                                   "try: c.get_parser_args()\nexcept SystemExit: pass"], capture_output=True, text=True)
    assert "diffusion" in parser_types.stdout          # the stock parser's --model_type choices, via the .pth hook
    assert cli.load_clip is models.load_clip


def test_load_clip_routes_by_name(monkeypatch):
    import clip_benchmark.models as models

    calls = []
    monkeypatch.setattr(integ, "_load_diffusion", lambda *a, **k: calls.append(a) or "ours")
    assert models.load_clip("open_clip", "diffusion_sd2", "x/y", None, "cpu") == "ours"
    assert models.load_clip("ja_clip", "diffusion_sd2", "x/y", None, "cpu") == "ours"
    with pytest.raises(UserError, match="did you mean"):
        models.load_clip("diffusion", "diffusion_sdx2", "x/y", None, "cpu")


def test_accuracy_fixed_for_numpy_2_4():
    from clip_benchmark.metrics import zeroshot_classification as zc

    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.0, 0.4, 0.6]])
    target = torch.tensor([1, 1, 2, 1])
    assert zc.accuracy(logits, target, topk=(1, 2)) == [0.5, 1.0]
    if tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 4):
        with pytest.raises(TypeError, match="0-dimensional"):   # upstream issue 147, what users hit
            zc.upstream_accuracy(logits, target, topk=(1, 2))
    else:
        assert zc.upstream_accuracy(logits, target, topk=(1, 2)) == [0.5, 1.0]


def test_output_name_is_file_safe():
    args = SimpleNamespace(output="{dataset}_{pretrained}_{model}_{language}_{task}.json", dataset="wds/digits",
                           model="diffusion_sd2@configs/x.json", pretrained="stabilityai/stable-diffusion-2-base",
                           language="en")
    assert str(integ.output_path(args, "zeroshot_classification")) == \
        "digits_stabilityai_stable-diffusion-2-base_diffusion_sd2@configs_x.json_en_zeroshot_classification.json"


def test_task_wrappers_refuse_and_hand_over():
    from clip_benchmark.metrics import zeroshot_classification as zc
    from clip_benchmark.metrics import zeroshot_retrieval as zr

    class Fake:
        is_diffusion_classifier = True
        task = None
        options = SimpleNamespace(shortlist_model="")   # pure diffusion: no shortlist

        def begin_task(self, task, expected_images=None, **task_info):
            self.task, self.expected = task, expected_images
            raise RuntimeError("stop here")

    with pytest.raises(UserError, match="zeroshot_retrieval with a diffusion model needs a CLIP shortlist"):
        zr.evaluate(Fake(), None, None, "cpu")
    with pytest.raises(UserError, match="--load_clfs"):
        zc.evaluate(Fake(), None, None, ["a"], ["{c}"], "cpu", load_clfs=["x.pt"])
    fake = Fake()
    with pytest.raises(RuntimeError, match="stop here"):
        zc.evaluate(fake, SimpleNamespace(dataset=[1, 2, 3]), None, ["a"], ["{c}"], "cpu")
    assert (fake.task, fake.expected) == ("zeroshot_classification", 3)


def test_unsupported_clip_benchmark_version_is_one_line(tmp_path):
    code = ("import importlib.metadata as m; real = m.version\n"
            "m.version = lambda n: '2.0.0' if n == 'clip_benchmark' else real(n)\n"
            "import clip_benchmark.models as models; print('diffusion' in models.MODEL_TYPES)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "False"
    assert proc.stderr.strip() == ("clip_benchmark_diffusion: clip_benchmark 2.0.0 is not supported (needs 1.6.x); "
                                   "diffusion models are not registered")


def test_startup_hook_imports_nothing_heavy():
    code = "import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch','clip_benchmark','diffusers','typing','pluggy')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "[]", proc.stdout
    assert "clip_benchmark_diffusion._startup" in subprocess.run(
        [sys.executable, "-c", "import sys; print(list(sys.modules))"], capture_output=True, text=True).stdout


def test_a_run_parses_its_model_and_resolves_its_weights_once(tiny_sd, tmp_path, inproc, monkeypatch):
    """The plan resolves the model (spec, weights, model index) and hands it to the loader: one
    parse and one weights look-up per run, not one per check."""
    from cli_helpers import quick_options
    from wds_data import write_digits_wds

    from clip_benchmark_diffusion import registry, weights

    calls = {"parse": 0, "locate": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(registry, "parse_model_spec", counted("parse", registry.parse_model_spec))
    monkeypatch.setattr(weights, "locate_weights", counted("locate", weights.locate_weights))
    data = write_digits_wds(tmp_path / "digits", per_class=1)
    opts = quick_options(tmp_path, max_samples=3, min_samples=2)
    proc = inproc("--dataset", "wds/digits", "--dataset_root", str(data), "--model", f"diffusion_sd2@{opts}",
                  "--pretrained", str(tiny_sd), "--output", str(tmp_path / "r.json"), "--batch_size", "10",
                  cwd=tmp_path, env={"CLIP_BENCHMARK_DIFFUSION_STORE": "off"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "r.json").exists()
    assert calls == {"parse": 1, "locate": 1}


def _interrupt_while_importing(command: list[str], cwd) -> subprocess.CompletedProcess:
    """Start ``command`` and send SIGINT as soon as torch's library is mapped (clip_benchmark's import
    under way); if the import is already over by then, the run itself gets the signal."""
    import os
    import signal
    import time
    from pathlib import Path

    from cli_helpers import subprocess_env

    proc = subprocess.Popen(command, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if "libtorch" in maps.read_text():
                break
        except OSError:
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="watches /proc/PID/maps")
@pytest.mark.parametrize("script", ["clip_benchmark", "clip_benchmark_diffusion"])
def test_ctrl_c_while_the_command_imports_is_one_line(script, tmp_path):
    """Ctrl-C in the first seconds (torch, open_clip and clip_benchmark importing) was a KeyboardInterrupt
    traceback; now it is the one line of any Ctrl-C, exit 130."""
    from cli_helpers import BIN

    proc = _interrupt_while_importing([str(BIN / script), "eval", "--dataset", "wds/digits", "--dataset_root",
                                       str(tmp_path / "none"), "--model", "diffusion_tiny"], tmp_path)
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    # the signal lands mid-import (libtorch is mapped seconds before the import ends); were the import
    # ever over first, the command's own one line (the missing dataset folder) is as good
    assert (proc.returncode, last.startswith("clip_benchmark_diffusion: interrupted")) in ((130, True), (2, False))
    assert last.startswith("clip_benchmark_diffusion: "), proc.stderr[-2000:]


def test_other_programs_keep_their_sigint_handler(tmp_path):
    """The start-up hook runs in every interpreter: importing clip_benchmark from another program
    leaves Python's own handler (KeyboardInterrupt), and the clip_benchmark command gets it back in main."""
    code = ("import signal, clip_benchmark.datasets.builder, clip_benchmark.cli; "
            "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.stdout.strip() == "True", proc.stderr[-2000:]
    script = tmp_path / "clip_benchmark"            # named like the command: ours while importing, then Python's
    script.write_text("import signal, sys, clip_benchmark.cli as c\n"
                      "during = signal.getsignal(signal.SIGINT) is not signal.default_int_handler\n"
                      "sys.argv = ['clip_benchmark', 'eval', '--help']\n"
                      "try:\n    c.main()\nexcept SystemExit:\n    pass\n"
                      "print(during, signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.stdout.strip().splitlines()[-1] == "True True", proc.stdout[-2000:] + proc.stderr[-2000:]


def test_a_hybrid_chosen_through_the_environment_gets_its_own_output_name(monkeypatch):
    # it wrote to the pure run's file, overwriting it
    from clip_benchmark_diffusion.options import OPTIONS_ENV

    args = SimpleNamespace(output="{dataset}_{model}_{task}.json", dataset="wds/digits", model="diffusion_tiny",
                           model_type="open_clip", pretrained="default", language="en")
    pure = str(integ.output_path(args, "zeroshot_classification"))
    monkeypatch.setenv(OPTIONS_ENV, "strategy=full")                     # not a hybrid: the same name
    assert str(integ.output_path(args, "zeroshot_classification")) == pure == \
        "digits_diffusion_tiny_zeroshot_classification.json"
    monkeypatch.setenv(OPTIONS_ENV, "shortlist_model=ViT-B-32,shortlist_pretrained=laion2b_s34b_b79k,shortlist_k=5")
    assert str(integ.output_path(args, "zeroshot_classification")) == \
        "digits_diffusion_tiny+hybrid-ViT-B-32_laion2b_s34b_b79k@top5_zeroshot_classification.json"


def test_results_name_local_paths_without_the_machines_folders(tmp_path, monkeypatch):
    from clip_benchmark_diffusion.integration.lifecycle import _portable_paths

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    (work / "configs").mkdir(parents=True)
    (elsewhere / "sd-model").mkdir(parents=True)
    (work / "configs" / "opts.json").write_text("{}")
    (elsewhere / "opts.json").write_text('{"strategy": "full"}')
    monkeypatch.chdir(work)
    dump = {"model": f"diffusion_sd2@{work / 'configs' / 'opts.json'}", "pretrained": str(elsewhere / "sd-model"),
            "diffusion_classifier": {"weights": str(elsewhere / "sd-model"), "option_source": str(elsewhere / "opts.json")}}
    _portable_paths(dump, lambda: "0123456789abcdef")
    assert dump["model"] == "diffusion_sd2@configs/opts.json"               # inside the working directory
    assert dump["pretrained"] == dump["diffusion_classifier"]["weights"] == "sd-model#0123456789abcdef"
    source = dump["diffusion_classifier"]["option_source"]
    assert source.startswith("opts.json#") and len(source) == len("opts.json#") + 16 and str(tmp_path) not in source
    hub = {"model": "diffusion_sd2@fast", "pretrained": "org/model", "diffusion_classifier": {"weights": "org/model"}}
    _portable_paths(hub, lambda: "unused")
    assert hub == {"model": "diffusion_sd2@fast", "pretrained": "org/model", "diffusion_classifier": {"weights": "org/model"}}


def test_zero_shot_metrics_on_a_set_smaller_than_its_classes_warn_nothing():
    # clip_benchmark's balanced accuracy warns whenever an image is predicted as a class no image of the
    # set has: on every small evaluation, and nothing a user can act on
    import warnings

    from clip_benchmark.metrics import zeroshot_classification as zc

    classes = ["a", "b", "c"]

    class Clip(torch.nn.Module):
        def encode_text(self, ids):
            return torch.nn.functional.one_hot(ids[:, 0], 3).float()

        def encode_image(self, images):
            return images

    batches = [(torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]), torch.tensor([0, 0]))]   # predicted: 0 and 2

    class Loader(list):
        dataset = SimpleNamespace(classes=classes)

    tokenizer = lambda texts: torch.tensor([[classes.index(t)] for t in texts])   # noqa: E731
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        metrics = zc.evaluate(Clip(), Loader(batches), tokenizer, classes, ["{c}"], "cpu", amp=False)
    assert metrics["acc1"] == 0.5 and not [str(w.message) for w in seen]
