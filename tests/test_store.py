"""The SQLite score store: persistence, refusal of foreign files, concurrent writers, keys."""
from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3
import time
from pathlib import Path

import pytest

from clip_benchmark_diffusion.results import store as store_module
from clip_benchmark_diffusion.errors import UserError
# torch is imported inside the tests that use it: the spawned writers import this module, and
# four interpreters importing torch at once on a small machine take longer than the test.
from clip_benchmark_diffusion.results.keys import image_digest, image_key, run_key, weights_fingerprint
from clip_benchmark_diffusion.results.store import FILENAME, STORE_ENV, ScoreStore, default_store_path

PAYLOAD = {"rank": [1, 0, 2], "mean_error": [0.25, 0.125, float("inf")], "calls": 60, "seed": 12345}


def test_round_trip_and_reopen(tmp_path):
    path = tmp_path / "s.sqlite"
    with ScoreStore(path) as store:
        assert len(store) == 0 and store.get_many(["a"]) == {}
        store.put("a", PAYLOAD)
        store.put("b", {"x": 1})
        store.put("b", {"x": 2})                      # replace, not duplicate
        assert store.get_many(["a", "b", "missing", "a"]) == {"a": PAYLOAD, "b": {"x": 2}}
        assert len(store) == 2
    with ScoreStore(path) as store:
        assert store.get_many(["a", "b"]) == {"a": PAYLOAD, "b": {"x": 2}}
        assert store.get_many([f"k{i}" for i in range(1200)] + ["a"]) == {"a": PAYLOAD}  # > one IN chunk
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_put_is_visible_to_another_connection_at_once(tmp_path):
    with ScoreStore(tmp_path / "s.sqlite") as writer, ScoreStore(tmp_path / "s.sqlite") as reader:
        writer.put("k", {"v": 1})
        assert reader.get_many(["k"]) == {"k": {"v": 1}}


def _assert_refused(path: Path, what: str) -> None:
    before = path.read_bytes()
    with pytest.raises(UserError) as info:
        ScoreStore(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and what in message and STORE_ENV in message and "'off'" in message
    assert path.read_bytes() == before
    assert not Path(f"{path}-wal").exists() and not Path(f"{path}-journal").exists()


def test_garbage_file_is_refused_and_left_intact(tmp_path):
    path = tmp_path / FILENAME
    path.write_bytes(os.urandom(5000))
    _assert_refused(path, "is not an SQLite database")
    path.write_bytes(b"{}")
    _assert_refused(path, "is not an SQLite database")


def test_foreign_or_newer_database_is_refused(tmp_path):
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE photos(id INTEGER)")
    conn.close()
    _assert_refused(path, "another program")

    with ScoreStore(tmp_path / "s.sqlite") as store:
        store.put("k", {"v": 1})
    with sqlite3.connect(tmp_path / "s.sqlite") as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()
    _assert_refused(tmp_path / "s.sqlite", "schema version 99")


def test_directory_and_unreadable_file_are_refused(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="is a directory"):
        ScoreStore(tmp_path)
    path = tmp_path / "locked.sqlite"
    path.write_bytes(b"")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(store_module, "open", denied, raising=False)   # tests may run as root
    with pytest.raises(UserError, match=r"locked.sqlite cannot be read \(Permission denied\); move"):
        ScoreStore(path)


def _writer(path: str, worker: int, barrier) -> None:
    barrier.wait()                                        # all workers open and write at once
    with ScoreStore(path) as store:
        for i in range(200):
            store.put(f"w{worker}/{i}", {"worker": worker, "i": i})


def test_concurrent_writers(tmp_path):
    path = tmp_path / "shared.sqlite"                     # created by the racing workers themselves
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_writer, args=(str(path), w, barrier)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    with ScoreStore(path) as store:
        assert len(store) == 800
        keys = [f"w{w}/{i}" for w in range(4) for i in range(200)]
        got = store.get_many(keys)
        assert all(got[f"w{w}/{i}"] == {"worker": w, "i": i} for w in range(4) for i in range(200))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_keys_are_canonical():
    opts = {"strategy": "ttest", "seed": 0, "n_samples": [50]}
    key = run_key("abc", opts, [["a photo of a cat"], ["a dog", "a puppy"]])
    assert key == run_key("abc", dict(reversed(opts.items())), [["a photo of a cat"], ["a dog", "a puppy"]])
    assert key != run_key("abc", opts, [["a dog", "a puppy"], ["a photo of a cat"]])
    assert key != run_key("abd", opts, [["a photo of a cat"], ["a dog", "a puppy"]])
    assert key != run_key("abc", {**opts, "seed": 1}, [["a photo of a cat"], ["a dog", "a puppy"]])
    assert len(key) == 64 and image_key(key, "ff") == f"{key}/ff"


def test_image_digest():
    import torch

    img = ((torch.arange(3 * 8 * 8) * 341 - 32000) / 32767).reshape(3, 8, 8)  # int16 levels
    assert image_digest(img) == "0efe91f4ed6dd2e313d4f4ee7b795a1f"
    assert image_digest(img) == image_digest(img.double()) == image_digest(img + 1e-6)  # below one level
    assert image_digest(img) != image_digest(img.reshape(3, 4, 16))
    changed = img.clone()
    changed[0, 0, 0] += 1e-3
    assert image_digest(changed) != image_digest(img)


def _tiny_modules() -> dict:
    import torch

    torch.manual_seed(0)
    return {"unet": torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.BatchNorm1d(30)),
            "vae": torch.nn.Conv2d(3, 4, 3)}


def test_weights_fingerprint_sees_every_change():
    import torch

    mods = _tiny_modules()
    base = weights_fingerprint(mods)
    assert base == weights_fingerprint(_tiny_modules())               # stable across loads
    # Every value counts: 600 was between two of the 192 values the key once sampled.
    weight = mods["unet"][0].weight
    original = weight.detach().clone()
    for position in (5, -1, 0, 609, 600):
        with torch.no_grad():
            weight.view(-1)[position] += 1e-3
        assert weights_fingerprint(mods) != base, position
        with torch.no_grad():
            weight.copy_(original)
        assert weights_fingerprint(mods) == base
    mods["unet"][1].running_mean[3] = 7.0                             # buffers count
    assert weights_fingerprint(mods) != base
    assert weights_fingerprint({"other": mods["unet"], "vae": mods["vae"]}) != weights_fingerprint(mods)
    full = weights_fingerprint(mods)
    assert weights_fingerprint({"unet": mods["unet"].half(), "vae": mods["vae"]}) != full      # the loaded dtype


def test_weights_of_a_folder_are_hashed_once_per_file_version(tmp_path, monkeypatch):
    """Loaded modules are hashed through their files, each read once while it is unchanged."""
    import os

    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from clip_benchmark_diffusion.results import file_digests

    monkeypatch.setenv(file_digests.CACHE_ENV, str(tmp_path / "cache"))
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1,
                                 vocab_size=1000, max_position_embeddings=8)).save_pretrained(tmp_path / "enc")
    hashed = []
    real = file_digests._hash_file
    monkeypatch.setattr(file_digests, "_hash_file", lambda p: (hashed.append(os.path.basename(p)), real(p))[1])
    load = lambda: CLIPTextModel.from_pretrained(tmp_path / "enc")     # noqa: E731
    base = weights_fingerprint({"text_encoder": load()})
    assert sorted(hashed) == ["config.json", "model.safetensors"]
    assert weights_fingerprint({"text_encoder": load()}) == base and len(hashed) == 2   # from the cache
    model = load()
    with torch.no_grad():
        model.get_input_embeddings().weight[123] += 1e-3          # one embedding row
    model.save_pretrained(tmp_path / "enc")
    assert weights_fingerprint({"text_encoder": load()}) != base
    assert hashed.count("model.safetensors") == 2


def test_default_store_path(tmp_path):
    out = str(tmp_path / "results" / "cifar10_sd2.json")
    assert default_store_path(out, {}) == tmp_path / "results" / FILENAME
    assert default_store_path("result.json", {}) == Path(FILENAME)
    assert default_store_path(out, {STORE_ENV: ""}) == tmp_path / "results" / FILENAME
    for off in ("off", "OFF", " off "):
        assert default_store_path(out, {STORE_ENV: off}) is None
    assert default_store_path(out, {STORE_ENV: str(tmp_path / "x.sqlite")}) == tmp_path / "x.sqlite"
    assert default_store_path(out, {STORE_ENV: str(tmp_path)}) == tmp_path / FILENAME


def test_a_store_path_ending_in_a_slash_is_a_folder_created_with_the_store(tmp_path):
    """``CLIP_BENCHMARK_DIFFUSION_STORE=newdir/`` once made a file named newdir."""
    path = default_store_path("r.json", {STORE_ENV: f"{tmp_path / 'newdir'}/"})
    assert path == tmp_path / "newdir" / FILENAME
    ScoreStore.check(path)                      # creates nothing before the run computes
    assert not (tmp_path / "newdir").exists()
    with ScoreStore(path) as store:
        store.put("k", {"v": 1})
    assert (tmp_path / "newdir").is_dir() and path.is_file()


def test_a_second_store_in_one_process_keeps_the_first_ones_locks(tmp_path):
    """POSIX locks belong to the process and any close() of the file drops them all: reading the header
    of a store this process has open (the lease thread's second ScoreStore) once let another process
    believe it was the last user and delete the -wal and -shm files under a live run (seen as "disk
    I/O error" and a malformed store with two identical commands on one store)."""
    import subprocess
    import sys

    path = tmp_path / FILENAME
    other = ("import sys; from clip_benchmark_diffusion.results.store import ScoreStore\n"
             "with ScoreStore(sys.argv[1]) as s: assert s.get_many(['k']) == {'k': {'v': 1}}")
    with ScoreStore(path) as first:
        first.put("k", {"v": 1})
        ScoreStore(path).close()
        subprocess.run([sys.executable, "-c", other, str(path)], check=True)
        assert Path(f"{path}-wal").exists() and Path(f"{path}-shm").exists()   # we still hold them
        first.put("k2", {"v": 2})
    with ScoreStore(path) as again:
        again._verify()
        assert len(again) == 2


def test_a_store_opened_beside_live_claims_keeps_their_locks(tmp_path):
    """The same for the leases' own connection (results/leases.py): it counts as this process holding the file."""
    import subprocess
    import sys

    from clip_benchmark_diffusion.results.leases import Claims

    path = tmp_path / FILENAME
    claims = Claims(path)
    try:
        assert claims.claim(["a", "b"], 1) == ["a"]
        ScoreStore(path).get_many(["a"])                 # the model's store, opened after the leases
        subprocess.run([sys.executable, "-c", "import sys; from clip_benchmark_diffusion.results.store import ScoreStore\n"
                        "with ScoreStore(sys.argv[1]) as s: s.get_many(['a'])", str(path)], check=True)
        assert Path(f"{path}-wal").exists() and Path(f"{path}-shm").exists()
        assert claims.claim(["b"], 1) == ["b"]
    finally:
        claims.close()
    with ScoreStore(path) as again:
        again._verify()


def test_a_checkpoint_with_one_edited_embedding_row_is_scored_again(tmp_path, digits_wds, inproc):
    """The key once sampled 192 values per tensor: an edited row of the text embedding was not among
    them, so the edited checkpoint reused the original's scores with 0 denoiser calls."""
    import json

    from safetensors.torch import load_file, save_file

    from cli_helpers import quick_options
    from clip_benchmark_diffusion.tokenizers import clip_bpe_tokenizer
    from tiny_models import save_tiny_sd

    model = save_tiny_sd(tmp_path / "model")
    opts = quick_options(tmp_path, strategy="full", n_samples=[2])
    env = {"CLIP_BENCHMARK_DIFFUSION_CACHE": str(tmp_path / "cache")}
    args = ["--pretrained_model", f"diffusion_sd2@{opts},{model}", "--dataset", "wds/digits", "--dataset_root",
            str(digits_wds), "--output", "r.json"]
    first = inproc(*args, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    before = json.loads((tmp_path / "r.json").read_text())
    with ScoreStore(tmp_path / FILENAME) as store:
        assert len(store) == 20

    path = model / "text_encoder" / "model.safetensors"
    state = load_file(path)
    row = clip_bpe_tokenizer(16)("photo")["input_ids"][1]               # a word of every "a photo of" prompt
    key = next(k for k in state if k.endswith("token_embedding.weight"))
    state[key][row] += 0.5
    save_file(state, path, metadata={"format": "pt"})
    second = inproc(*args, cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "0 of 20 images from the score store" in second.stderr and "; 0 denoiser calls" not in second.stderr
    with ScoreStore(tmp_path / FILENAME) as store:
        assert len(store) == 40                                          # a new key for every image
        payloads = store.get_many([k for k, in store._db.execute("SELECT key FROM scores")])
    by_image: dict[str, list] = {}
    for k, p in payloads.items():
        by_image.setdefault(k.split("/")[1], []).append(p["mean_error"])
    # Scored again, not copied: the edited row changes the text conditioning of every prompt (a few
    # images of this tiny random UNet barely feel it, so most, not all, of their numbers move).
    assert all(len(pair) == 2 for pair in by_image.values())
    assert sum(pair[0] != pair[1] for pair in by_image.values()) >= 15
    assert json.loads((tmp_path / "r.json").read_text())["metrics"]["denoiser_calls_per_image"] == \
        before["metrics"]["denoiser_calls_per_image"]


class _FullDiskOnStore:
    """A connection whose result insert hits a full disk: SQLite rolls the transaction back by itself
    (SQLITE_FULL) before the error reaches Python, as in claims' test of the same case."""

    def __init__(self, conn) -> None:
        self.conn = conn

    def execute(self, sql, *args):
        if sql.startswith("INSERT OR REPLACE INTO scores"):
            self.conn.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction


def test_a_full_disk_while_storing_a_result_is_the_one_line_not_a_rollback_error(tmp_path):
    store = ScoreStore(tmp_path / "s.sqlite")
    store.put("k0", {"v": 0})
    store._conn = _FullDiskOnStore(store._db)
    with pytest.raises(UserError) as err:
        store.put("k1", {"v": 1})
    assert "could not be written (database or disk is full); free disk space" in str(err.value)
    store._conn = store._conn.conn
    store.put("k1", {"v": 1})                             # the connection is usable again
    assert store.get_many(["k0", "k1", "k0"]) == {"k0": {"v": 0}, "k1": {"v": 1}}
    store.close()
