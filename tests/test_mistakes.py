"""Mistakes as a new user makes them, one row each: one line, exit 2, no file, before any run starts.

Every row edits a fresh copy of a 10-image digits webdataset (or the command line) and expects the
stock command to stop with one ``clip_benchmark_diffusion: `` line containing the needle, without
a traceback, a result, a partial file or a new score store, and before clip_benchmark starts the
first run ("Running ..." on stdout). Adding a case is adding a row. The README's "Mistakes and
what they get" table lists them.
"""
from __future__ import annotations

import io
import json
import shutil
import sqlite3
import subprocess
import tarfile
from pathlib import Path
from typing import Callable

import pytest

from cli_helpers import assert_clean_failure
from wds_data import write_digits_wds

STORE = "clip_benchmark_diffusion_scores.sqlite"


class Mistake:
    """A command line and a dataset copy for one row to spoil."""

    def __init__(self, model: Path, wds: Path, tmp: Path) -> None:
        self.model, self.wds, self.tmp = model, wds, tmp
        self.env: dict[str, str] = {}
        self.first = f"diffusion_sd2,{model}"
        self.others: list[str] = []          # further models of the same command, after the first
        self.extra: list[str] = []
        self.root = str(wds)
        self.dataset = "wds/digits"

    @property
    def args(self) -> list[str]:
        return ["--pretrained_model", self.first, *self.others, "--dataset", *self.dataset.split(),
                "--dataset_root", self.root, "--output", "digits_{model}_{dataset}.json", *self.extra]

    # -- edits ---------------------------------------------------------------------------------
    def write(self, name: str, text: str | bytes) -> Path:
        path = self.wds / name
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        return path

    def line(self, name: str, index: int, text: str) -> None:
        lines = (self.wds / name).read_text().splitlines()
        lines[index] = text
        self.write(name, "\n".join(lines) + "\n")

    def member(self, name: str, data: bytes | None) -> None:
        """Replace (or with None drop) one member of shard 0."""
        shard = self.wds / "test" / "0.tar"
        members = []
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(shard, "w") as tar:
            for info, content in members:
                if info.name == name:
                    if data is None:
                        continue
                    content = data
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))

    def cut_shard(self, where: Callable[[tarfile.TarInfo], int], member: int = 9) -> None:
        """Truncate shard 0 at ``where(m)`` of its ``member``-th member."""
        shard = self.wds / "test" / "0.tar"
        with tarfile.open(shard) as tar:
            info = tar.getmembers()[member]
        shard.write_bytes(shard.read_bytes()[: where(info)])

    def options(self, **fields) -> None:
        path = self.tmp / "opts.json"
        path.write_text(json.dumps(fields))
        self.first = f"diffusion_sd2@{path},{self.model}"

    def options_text(self, raw: bytes) -> None:
        (self.tmp / "opts.json").write_bytes(raw)
        self.first = f"diffusion_sd2@{self.tmp / 'opts.json'},{self.model}"

    def cupl(self, prompts: dict, dataset: str = "digits") -> None:
        """A per-class prompt file (``--custom_template_file``) with ``prompts`` for ``dataset``."""
        (self.tmp / "cupl.json").write_text(json.dumps({dataset: prompts}))
        self.extra += ["--custom_template_file", str(self.tmp / "cupl.json")]

    def damaged_store(self) -> None:
        """A real store of many pages with garbage past its first page."""
        from clip_benchmark_diffusion.results.store import ScoreStore

        path = self.tmp / STORE
        with ScoreStore(path) as store:
            for i in range(300):
                store.put(f"k{i}", {"payload": "x" * 500})
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        data = bytearray(path.read_bytes())
        data[3 * 4096 : 6 * 4096] = b"\x5a" * (3 * 4096)
        path.write_bytes(bytes(data))


DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# (id, edit, needle in the one line)
CASES: list[tuple[str, Callable[[Mistake], object], str]] = [
    # silent wrong results before
    ("duplicate class names", lambda m: m.line("classnames.txt", 1, "zero"), "names 'zero' twice"),
    ("two classes with identical prompts", lambda m: m.cupl({**{c: [f"a {c}"] for c in DIGITS}, "one": ["a zero"]}),
     "classes 'zero' and 'one' get identical prompts"),
    ("shard truncated mid-member", lambda m: m.cut_shard(lambda i: i.offset_data + i.size // 2), "is truncated"),
    ("shard truncated at a member boundary", lambda m: m.cut_shard(lambda i: i.offset), "is truncated"),
    ("label outside the class list", lambda m: m.member("s0000004.cls", b"12"), "label 12 of sample s0000004"),
    ("negative label", lambda m: m.member("s0000004.cls", b"-1"), "label -1 of sample s0000004"),
    ("fewer custom class names than labels", lambda m: (m.write("names.json", json.dumps({"digits": DIGITS[:8]})),
                                                        m.extra.extend(["--custom_classname_file",
                                                                        str(m.wds / "names.json")])),
     "outside the 8 classes"),
    # options
    ("p_value 0", lambda m: m.options(p_value=0), "p_value=0.0 must lie strictly between 0 and 1"),
    ("p_value 2", lambda m: m.options(p_value=2), "p_value=2.0 must lie strictly between 0 and 1"),
    ("p_value NaN", lambda m: m.env.update(CLIP_BENCHMARK_DIFFUSION_OPTIONS="p_value=nan"), "p_value=nan"),
    ("to_keep 0", lambda m: m.options(strategy="staged", n_samples=[2, 4], to_keep=[0, 1]), "to_keep must be positive"),
    ("batch_size true", lambda m: m.options(batch_size=True), "batch_size=True should be like 64"),
    ("batch_size word", lambda m: m.options(batch_size="many"), "batch_size='many' should be like 64 or auto"),
    ("cuda graphs on a cpu", lambda m: m.options(compile="cuda_graphs"),
     "compile=cuda_graphs needs a CUDA device, not cpu; use compile=on"),
    ("classic attention on an SD3-format model", lambda m: (
        m.env.update(CLIP_BENCHMARK_DIFFUSION_OPTIONS="attention=classic"),
        setattr(m, "first", "diffusion_tiny_flow,laion400m_e32")),
     "attention=classic: the sd3 family's attention has no classic form in diffusers (only SDPA processors); "
     "use attention=sdpa"),
    ("batch_size 2.5", lambda m: m.options(batch_size=2.5), "batch_size=2.5 should be like 64"),
    ("scoring is a list", lambda m: m.options(scoring=[1, 2]), "'scoring' entry"),
    ("scoring is a string", lambda m: m.options(scoring="fast"), "'scoring' entry"),
    ("options file not UTF-8", lambda m: m.options_text('{"seed": "\u00e9"}'.encode("latin-1")), "is not UTF-8"),
    ("lookahead -1", lambda m: m.options(lookahead=-1), "lookahead=-1 must be 0 or more"),
    ("temperature -1", lambda m: m.options(temperature=-1), "temperature=-1.0 must be 0 (the sampling posterior)"),
    ("temperature_power 0", lambda m: m.options(temperature=0.001, temperature_power=0), "temperature_power=0"),
    ("retrieval without a shortlist", lambda m: m.extra.extend(["--task", "zeroshot_retrieval"]),
     "zeroshot_retrieval with a diffusion model needs a CLIP shortlist"),
    ("unknown shortlist model", lambda m: m.options(shortlist_model="ViT-Q-99", shortlist_pretrained="openai"),
     "unknown open_clip model 'ViT-Q-99'"),
    ("shortlist weights tag of another model", lambda m: m.options(shortlist_model="RN50",
                                                                   shortlist_pretrained="nosuchtag"),
     "shortlist_pretrained 'nosuchtag' is neither an open_clip weights tag of RN50"),
    ("resolution 17 on a VAE of factor 2", lambda m: m.options(resolution=17),
     "resolution=17 cannot be scored by this model: sides must be multiples of 2 px"),
    ("resolution 3", lambda m: m.options(resolution=3), "at least 4 px; use 4"),
    ("sample_norm unknown", lambda m: m.options(sample_norm="max"), "sample_norm"),
    ("guarantee unknown", lambda m: m.options(strategy="anytime", guarantee="exact"), "guarantee"),
    ("guidance NaN", lambda m: m.env.update(CLIP_BENCHMARK_DIFFUSION_OPTIONS="guidance=nan"),
     "guidance=nan must be a number from 0 to 100"),
    ("guidance inf", lambda m: m.options(guidance=float("inf")), "guidance=inf must be a number from 0 to 100"),
    ("guidance -1", lambda m: m.options(guidance=-1), "guidance=-1.0 must be a number from 0 to 100"),
    # templates and class names
    ("template with {0}", lambda m: m.write("zeroshot_classification_templates.txt", "a photo of {0} {c}.\n"),
     "has the field {0}"),
    ("template with {style}", lambda m: m.write("zeroshot_classification_templates.txt", "a {style} {c}.\n"),
     "has the field {style}"),
    ("template with a lone brace", lambda m: m.write("zeroshot_classification_templates.txt", "a {c} {.\n"),
     "is not a valid template"),
    ("empty classnames.txt", lambda m: m.write("classnames.txt", ""), "is empty"),
    ("blank line in classnames.txt", lambda m: m.line("classnames.txt", 3, " "), "empty name at line 4"),
    ("no classnames.txt", lambda m: (m.wds / "classnames.txt").unlink(), "classnames.txt does not exist"),
    # datasets
    ("nshards.txt above the shards present", lambda m: m.write("test/nshards.txt", "3\n"), "says 3 shards"),
    ("nshards.txt not a number", lambda m: m.write("test/nshards.txt", "two\n"), "should hold the number of shards"),
    ("empty test/ folder", lambda m: [p.unlink() for p in (m.wds / "test").iterdir()], "nshards.txt does not exist"),
    ("split that is not there", lambda m: m.extra.extend(["--split", "train"]), "has no 'train' split"),
    ("0-byte shard", lambda m: m.write("test/0.tar", b""), "is empty (0 bytes)"),
    ("shard without members", lambda m: tarfile.open(m.wds / "test" / "0.tar", "w").close(), "holds no samples"),
    ("shard that is not a tar", lambda m: m.write("test/0.tar", b"\x00garbage" * 300), "is not a readable tar"),
    ("0-byte png mid-shard", lambda m: m.member("s0000004.png", b""), "s0000004.png in shard"),
    ("non-image png mid-shard", lambda m: m.member("s0000004.png", b"<html>not an image</html>"), "is not a png file"),
    ("image without a label", lambda m: m.member("s0000004.cls", None), "has no .cls label"),
    ("missing --dataset_root", lambda m: setattr(m, "root", "root"), "(the default; pass --dataset_root)"),
    ("--dataset_root that does not exist", lambda m: setattr(m, "root", str(m.tmp / "nothere")), "does not exist"),
    ("--dataset_root that is a file", lambda m: setattr(m, "root", str(m.wds / "classnames.txt")), "is a file"),
    ("--dataset_root with an unknown {field}", lambda m: setattr(m, "root", str(m.wds.parent / "{name}")),
     "fills only {dataset} and {dataset_cleaned}"),
    ("cifar10 without its data, offline", lambda m: (setattr(m, "dataset", "cifar10"),
                                                    setattr(m, "root", str(m.tmp / "data")),
                                                    m.env.update(HF_HUB_OFFLINE="1")),
     "cannot be downloaded offline"),
    ("--batch_size 0", lambda m: m.extra.extend(["--batch_size", "0"]), "--batch_size 0"),
    ("--num_workers above the shard count", lambda m: m.extra.extend(["--num_workers", "2"]),
     "--num_workers 2 is more than the 1 shard(s)"),
    # the second run of a command: checked before the first computes
    ("unknown open_clip model as the second run", lambda m: m.others.append("ViT-Q-99,openai"),
     "unknown open_clip model 'ViT-Q-99'"),
    ("unknown open_clip weights as the second run", lambda m: m.others.append("RN50,nosuchtag"),
     "is neither an open_clip weights tag of RN50"),
    ("missing dataset as the second run", lambda m: (setattr(m, "dataset", "wds/digits wds/nothere"),
                                                     setattr(m, "root", str(m.wds.parent / "{dataset}"))),
     "nothere' of wds/nothere does not exist"),
    ("missing diffusion weights folder as the second run", lambda m: m.others.append(f"diffusion_sd2,{m.tmp}/nope"),
     "does not exist"),
    ("--custom_template_file that does not exist", lambda m: m.extra.extend(["--custom_template_file", "no.json"]),
     "--custom_template_file no.json does not exist"),
    ("--custom_template_file that is not JSON", lambda m: (m.write("t.json", "{c}"),
                                                           m.extra.extend(["--custom_template_file", str(m.wds / "t.json")])),
     "is not a UTF-8 JSON file"),
    ("prompt file without the dataset", lambda m: m.cupl({c: [c] for c in DIGITS}, dataset="other"),
     "cannot be read: Templates not specified"),
    ("--pretrained_model without a comma", lambda m: m.others.append("ViT-B-32"),
     "--pretrained_model 'ViT-B-32' should be MODEL,PRETRAINED"),
    ("--pretrained_model file with no models", lambda m: ((m.tmp / "models.txt").write_text(""),
                                                          setattr(m, "first", str(m.tmp / "models.txt"))),
     "the command plans no run"),
    ("two runs writing one result file", lambda m: (m.others.append(f"diffusion_sd2@fast,{m.model}"),
                                                    m.extra.extend(["--output", "digits.json"])),
     "would both write digits.json"),
    # output and store
    ("--output with an unknown {key}", lambda m: m.extra.extend(["--output", "{datset}.json"]), "names {datset}"),
    ("--output with a lone brace", lambda m: m.extra.extend(["--output", "res{.json"]), "not a valid name template"),
    ("--output under a file", lambda m: ((m.tmp / "afile").write_text("x"), m.extra.extend(["--output", "afile/r.json"])),
     "which is a file"),
    ("--output that is a folder", lambda m: ((m.tmp / "adir").mkdir(), m.extra.extend(["--output", "adir"])),
     "is a folder"),
    ("store damaged past its first page", lambda m: m.damaged_store(), "is damaged"),
    ("store under a file", lambda m: ((m.tmp / "afile").write_text("x"),
                                      m.env.update(CLIP_BENCHMARK_DIFFUSION_STORE=str(m.tmp / "afile" / "s.sqlite"))),
     "cannot be created"),
]


@pytest.fixture(scope="module")
def small_wds(tmp_path_factory) -> Path:
    """10 digits, one per class, in one shard."""
    return write_digits_wds(tmp_path_factory.mktemp("small") / "digits", per_class=1)


@pytest.mark.parametrize("edit, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_mistake_is_one_line_before_any_run(edit, needle, tiny_sd, small_wds, tmp_path, inproc):
    wds = shutil.copytree(small_wds, tmp_path / "data" / "digits")
    case = Mistake(tiny_sd, wds, tmp_path)
    edit(case)
    stores_before = sorted(tmp_path.rglob("*.sqlite"))
    proc = inproc(*case.args, cwd=tmp_path, env=case.env)
    assert_clean_failure(proc, needle, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Running" not in proc.stdout, "a run started before the mistake was found"
    assert sorted(tmp_path.rglob("*.sqlite")) == stores_before, "a refused run left a score store"


def test_the_same_dataset_as_it_ships_passes_every_check(tiny_sd, small_wds, tmp_path, inproc):
    """The rows' baseline: an unspoilt copy runs (so each row fails for its own edit)."""
    wds = shutil.copytree(small_wds, tmp_path / "data" / "digits")
    case = Mistake(tiny_sd, wds, tmp_path)
    case.options(strategy="full", n_samples=[1], batch_size=64)
    proc = inproc(*case.args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [result] = tmp_path.glob("digits_*.json")
    assert json.loads(result.read_text())["metrics"]["denoiser_calls_per_image"] == 10 * 2  # classes x templates


def test_a_byte_order_mark_in_the_text_files_changes_no_prompt(tiny_sd, small_wds, tmp_path, inproc):
    """Notepad's UTF-8 BOM stayed in the first class name and template ('\ufeffzero'): other prompts,
    other scores. Scored with a BOM, every image is found in the store the plain files filled (its
    key holds every prompt), and the numbers are the same."""
    results = {}
    for name in ("plain", "bom"):
        wds = shutil.copytree(small_wds, tmp_path / name / "digits")
        if name == "bom":
            for text in ("classnames.txt", "zeroshot_classification_templates.txt"):
                (wds / text).write_bytes(b"\xef\xbb\xbf" + (wds / text).read_bytes())
        case = Mistake(tiny_sd, wds, tmp_path)
        case.options(strategy="full", n_samples=[1], batch_size=64)
        case.extra += ["--output", f"{name}.json"]
        proc = inproc(*case.args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())["metrics"]
        results[name].pop("seconds_per_image", None)
    assert "10 of 10 images from the score store" in proc.stderr
    assert results["bom"] == results["plain"]


def test_a_byte_order_mark_in_the_json_files_changes_nothing(tiny_sd, small_wds, tmp_path, inproc):
    """A BOM in --custom_template_file, --custom_classname_file or a scoring-options file was refused
    ('Unexpected UTF-8 BOM'); the same files without it fill the store the BOM run reads back."""
    names = json.dumps({"digits": DIGITS}).encode()
    prompts = json.dumps({"digits": ["a photo of the number {c}.", "a handwritten digit {c}."]}).encode()
    options = json.dumps({"strategy": "full", "n_samples": [1], "batch_size": 64}).encode()
    for name, mark in (("plain", b""), ("bom", b"\xef\xbb\xbf")):
        folder = tmp_path / name
        folder.mkdir()
        for file, data in (("names.json", names), ("prompts.json", prompts), ("opts.json", options)):
            (folder / file).write_bytes(mark + data)
        proc = inproc("--model", f"diffusion_sd2@{folder / 'opts.json'}", "--pretrained", str(tiny_sd), "--dataset",
                      "wds/digits", "--dataset_root", str(small_wds), "--output", f"{name}.json",
                      "--custom_classname_file", str(folder / "names.json"),
                      "--custom_template_file", str(folder / "prompts.json"), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert "10 of 10 images from the score store" in proc.stderr
    plain, bom = (json.loads((tmp_path / f"{n}.json").read_text())["metrics"] for n in ("plain", "bom"))
    plain.pop("seconds_per_image"), bom.pop("seconds_per_image")
    assert plain == bom


def test_a_dataset_download_that_fails_is_one_line(tiny_sd, small_wds, tmp_path, inproc, monkeypatch):
    """Online, a set the plan cannot check is downloaded by torchvision when the run builds it; without
    a network that was a urllib traceback. It is built before any image is scored."""
    import urllib.error

    import torchvision.datasets.cifar as cifar

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar, "download_and_extract_archive", no_network)
    case = Mistake(tiny_sd, small_wds, tmp_path)
    case.dataset, case.root = "cifar10", str(tmp_path / "data")
    proc = inproc(*case.args, cwd=tmp_path, env={"HF_HUB_OFFLINE": "0"})
    assert_clean_failure(proc, "dataset cifar10 is not in --dataset_root", "could not be downloaded (URLError",
                         cwd=tmp_path)
    assert proc.returncode == 2 and not list(tmp_path.rglob("*.sqlite"))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _stop_after(monkeypatch, images: int, fault: Callable[[], None]) -> None:
    """Let the store take ``images`` results, then raise ``fault()`` inside the next put."""
    from clip_benchmark_diffusion.results import store as store_module

    real, count = store_module.ScoreStore.put, [0]

    def put(self, key, payload):
        if count[0] == images:
            fault()
        count[0] += 1
        real(self, key, payload)

    monkeypatch.setattr(store_module.ScoreStore, "put", put)


def _disk_full() -> None:
    from clip_benchmark_diffusion.results.store import with_retries

    def full():
        raise sqlite3.OperationalError("database or disk is full")

    with_retries(full, Path(STORE))


def _ctrl_c() -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("fault, needle, code", [
    (_disk_full, "could not be written (database or disk is full); free disk space", 2),
    (_ctrl_c, "interrupted; every image finished so far is kept in the score store", 130),
], ids=["disk full", "Ctrl-C"])
def test_a_run_stopped_mid_way_is_one_line_and_keeps_finished_images(fault, needle, code, tiny_sd, small_wds,
                                                                      tmp_path, inproc, monkeypatch):
    case = Mistake(tiny_sd, small_wds, tmp_path)
    case.options(strategy="full", n_samples=[1], batch_size=64)
    case.extra += ["--batch_size", "2"]
    with monkeypatch.context() as patch:
        _stop_after(patch, 3, fault)
        proc = inproc(*case.args, cwd=tmp_path)
    assert proc.returncode == code
    assert_clean_failure(proc, needle, "run the same command again" if code == 130 else "is not scored again",
                         cwd=tmp_path)
    resumed = inproc(*case.args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "3 of 10 images from the score store" in resumed.stderr
    [result] = tmp_path.glob("digits_*.json")
    first = json.loads(result.read_text())
    again = inproc(*case.args, cwd=tmp_path)                 # a finished run again: free, the same numbers
    assert "10 of 10 images from the score store" in again.stderr and "; 0 denoiser calls run" in again.stderr
    assert json.loads(result.read_text()) == first
    # every run closed its store (WAL folded back), even in a process that goes on: one file, no -wal or -shm
    assert not list(tmp_path.glob("*-wal")) and not list(tmp_path.glob("*-shm"))


def test_stale_partial_files_of_dead_processes_are_removed(tiny_sd, small_wds, tmp_path, inproc):
    import socket

    case = Mistake(tiny_sd, small_wds, tmp_path)
    case.options(strategy="full", n_samples=[1], batch_size=64)
    case.extra += ["--output", "r.json"]
    host = socket.gethostname()
    stale = tmp_path / f".r.json.{host}-{_dead_pid()}.partial"
    live = tmp_path / f".r.json.{host}-1.partial"          # pid 1 is alive: another writer's file stays
    other_host = tmp_path / f".r.json.elsewhere-{_dead_pid()}.partial"
    for path in (stale, live, other_host):
        path.write_text("{}")
    proc = inproc(*case.args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "r.json").is_file() and not stale.exists() and live.exists() and other_host.exists()


def test_a_dataset_clip_benchmark_does_not_know_is_one_line(tiny_sd, small_wds, tmp_path, inproc):
    """Only clip_benchmark's builder knows its dataset names: found when the run builds it, before compute."""
    case = Mistake(tiny_sd, small_wds, tmp_path)
    case.dataset = "nosuchset"
    assert_clean_failure(inproc(*case.args, cwd=tmp_path), "does not know the dataset 'nosuchset'", cwd=tmp_path)
    assert not list(tmp_path.rglob("*.sqlite"))


def test_open_clip_weights_not_in_the_offline_cache_are_one_line(small_wds, tmp_path, inproc):
    proc = inproc("--pretrained_model", "RN50,openai", "--dataset", "wds/digits", "--dataset_root", str(small_wds),
                  "--output", "digits_{model}.json", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert_clean_failure(proc, "open_clip could not fetch the weights 'openai' of RN50", cwd=tmp_path)
