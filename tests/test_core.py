"""Content hashing, artifact references and atomic, content-addressed publishing."""

import hashlib
import json
import os
from pathlib import Path

import pytest

from tasks.artifacts import ArtifactRef, publish, published_problem
from tasks.files import new_workdir, sha256_bytes, sha256_file, sha256_json, write_json
from tasks.layout import MANIFEST

OLD_NS = 1_000_000_000 * 1_000_000_000  # 2001-09-09: an mtime no rewrite could produce by accident


def make_work(parent: Path, files: dict[str, bytes]) -> Path:
    work = new_workdir(parent)
    for name, data in files.items():
        (work / name).write_bytes(data)
    return work


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((".tmp-", ".trash-")))


def file_state(folder: Path) -> dict[str, tuple[int, int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def artifact_files(folder: Path) -> list[str]:
    """Return the names of an artifact's files (its manifest aside)."""
    return sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)


FILES = {"a.bin": b"alpha" * 100, "b.txt": b"bravo\n"}


def test_hashes_match_hashlib_and_json_is_canonical(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * (3 << 20))  # several read chunks
    assert sha256_file(path) == hashlib.sha256(b"x" * (3 << 20)).hexdigest()
    assert sha256_bytes(b"abc") == hashlib.sha256(b"abc").hexdigest()
    assert sha256_json({"b": 1, "a": [1, 2]}) == sha256_json({"a": [1, 2], "b": 1})
    assert sha256_json({"a": 1}) != sha256_json({"a": 2})
    assert sha256_json({"a": 1}) == sha256_bytes(b'{"a":1}')


def test_write_json_is_sorted_and_newline_terminated(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"b": 2, "a": {"d": 1, "c": 0}})
    text = path.read_text()
    assert text.endswith("}\n")
    assert text.index('"a"') < text.index('"b"') and text.index('"c"') < text.index('"d"')
    assert json.loads(text) == {"a": {"c": 0, "d": 1}, "b": 2}


def test_new_workdir_is_a_fresh_hidden_folder_inside_parent(tmp_path):
    parent = tmp_path / "not" / "yet"
    first, second = new_workdir(parent), new_workdir(parent)
    assert first.parent == parent and second.parent == parent
    assert first != second
    assert first.name.startswith(".tmp-") and first.is_dir() and not any(first.iterdir())


def test_publish_moves_work_folder_to_its_digest_name(tmp_path):
    work = make_work(tmp_path, FILES)

    ref = publish("stage-x", work, meta={"k": 1})

    expected_digest = sha256_json({name: sha256_bytes(data) for name, data in FILES.items()})
    final = tmp_path / expected_digest[:16]
    assert ref.stage == "stage-x" and ref.meta == {"k": 1}
    assert ref.digest == expected_digest
    assert not work.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]
    for name, data in FILES.items():
        assert ref.path(name) == final / name
        assert ref.path(name).read_bytes() == data
        assert ref.files[name].sha256 == sha256_bytes(data)
        assert ref.files[name].size == len(data)
        assert Path(ref.files[name].path).is_absolute()
    assert ref.problem() is None
    manifest = json.loads((final / MANIFEST).read_text())
    assert manifest == {name: {"sha256": sha256_bytes(data), "size": len(data)} for name, data in FILES.items()}


def test_publish_uses_a_given_digest_for_the_folder_name(tmp_path):
    digest = "0123456789abcdef" + "f" * 48
    ref = publish("s", make_work(tmp_path, FILES), digest=digest)
    assert ref.digest == digest
    assert ref.path("a.bin").parent == tmp_path / "0123456789abcdef"
    assert leftovers(tmp_path) == []


def test_second_publish_of_identical_content_rewrites_nothing(tmp_path):
    first = publish("s", make_work(tmp_path, FILES))
    final = first.path("a.bin").parent
    for path in final.iterdir():
        os.utime(path, ns=(OLD_NS, OLD_NS))
    before = file_state(final)

    work = make_work(tmp_path, FILES)
    second = publish("s", work)

    assert second.digest == first.digest
    assert {n: (f.path, f.sha256, f.size) for n, f in second.files.items()} == {n: (f.path, f.sha256, f.size) for n, f in first.files.items()}
    assert file_state(final) == before
    assert not work.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]


def test_different_content_gets_a_different_folder(tmp_path):
    first = publish("s", make_work(tmp_path, FILES))
    second = publish("s", make_work(tmp_path, {**FILES, "b.txt": b"charlie\n"}))
    renamed = publish("s", make_work(tmp_path, {"c.bin": FILES["a.bin"], "b.txt": FILES["b.txt"]}))

    folders = {first.digest, second.digest, renamed.digest}
    assert len(folders) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(d[:16] for d in folders)
    assert first.problem() is None and second.problem() is None and renamed.problem() is None
    assert first.path("b.txt").read_bytes() == b"bravo\n"
    assert second.path("b.txt").read_bytes() == b"charlie\n"


@pytest.mark.parametrize("damage", ["flip", "delete", "extra"])
def test_publish_replaces_a_damaged_folder_of_the_same_name(tmp_path, damage):
    first = publish("s", make_work(tmp_path, FILES))
    final = first.path("a.bin").parent
    if damage == "flip":
        first.path("a.bin").write_bytes(b"A" + FILES["a.bin"][1:])
    elif damage == "delete":
        first.path("b.txt").unlink()
    else:
        (final / "stray.txt").write_bytes(b"?")

    second = publish("s", make_work(tmp_path, FILES))

    assert second.digest == first.digest
    assert second.problem() is None
    assert artifact_files(final) == sorted(FILES)
    assert second.path("a.bin").read_bytes() == FILES["a.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]


def test_problem_reports_a_missing_file(tmp_path):
    ref = publish("s", make_work(tmp_path, FILES))
    ref.path("b.txt").unlink()
    problem = ref.problem()
    assert problem is not None and str(ref.path("b.txt")) in problem and "missing" in problem


def test_problem_reports_a_size_change(tmp_path):
    ref = publish("s", make_work(tmp_path, FILES))
    ref.path("a.bin").write_bytes(FILES["a.bin"] + b"!")
    problem = ref.problem()
    assert problem is not None and str(ref.path("a.bin")) in problem
    assert f"size {len(FILES['a.bin']) + 1}, expected {len(FILES['a.bin'])}" in problem


def test_problem_reports_a_same_size_byte_flip(tmp_path):
    ref = publish("s", make_work(tmp_path, FILES))
    data = bytearray(FILES["a.bin"])
    data[len(data) // 2] ^= 0x01
    ref.path("a.bin").write_bytes(bytes(data))
    problem = ref.problem()
    assert problem is not None and str(ref.path("a.bin")) in problem and "digest differs" in problem


def test_reference_survives_a_json_round_trip(tmp_path):
    ref = publish("s", make_work(tmp_path, FILES), meta={"rows": {"train": 3}})
    again = ArtifactRef.model_validate_json(ref.model_dump_json())
    assert again == ref and again.problem() is None



def test_unchanged_files_are_trusted_without_hashing_and_any_change_is_hashed(tmp_path, monkeypatch):
    import tasks.artifacts

    ref = publish("s", make_work(tmp_path, FILES))
    assert all(f.stat == tasks.artifacts.stat_signature(Path(f.path)) for f in ref.files.values())
    hashed = []
    real = tasks.artifacts.sha256_file
    monkeypatch.setattr(tasks.artifacts, "sha256_file", lambda path: hashed.append(Path(path).name) or real(path))

    assert ref.problem(trust_unchanged=True) is None and hashed == []
    assert ref.problem() is None and sorted(hashed) == ["a.bin", "b.txt"]

    # A same-size rewrite with its mtime set back: the change time still moved, so the file is hashed and caught.
    path = ref.path("a.bin")
    before = path.stat()
    data = bytearray(FILES["a.bin"])
    data[0] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    hashed.clear()
    problem = ref.problem(trust_unchanged=True)
    assert problem is not None and "digest differs" in problem and hashed == ["a.bin"]


def test_an_existing_digest_keeps_its_files_even_where_bytes_outside_the_digest_differ(tmp_path):
    # A retrain that reproduces a model has the same digest but other timings and zip dates in its files.
    digest = "ab" * 32
    first = publish("train", make_work(tmp_path, {"model.keras": b"weights, saved at 10:00", "h.json": b"1.5 s"}), digest)
    final = first.path("h.json").parent
    before = file_state(final)

    work = make_work(tmp_path, {"model.keras": b"weights, saved at 11:00", "h.json": b"1.7 s"})
    second = publish("train", work, digest)

    assert file_state(final) == before and not work.exists()
    assert second.path("model.keras").read_bytes() == b"weights, saved at 10:00"
    assert second.files == first.files and second.problem() is None


@pytest.mark.parametrize("damage", ["flip", "manifest"])
def test_a_damaged_folder_with_a_given_digest_is_replaced(tmp_path, damage):
    digest = "cd" * 32
    first = publish("train", make_work(tmp_path, {"model.keras": b"old weights"}), digest)
    final = first.path("model.keras").parent
    if damage == "flip":
        first.path("model.keras").write_bytes(b"OLD weights")
    else:  # a folder published before manifests, or one whose manifest is gone
        (final / MANIFEST).unlink()

    second = publish("train", make_work(tmp_path, {"model.keras": b"new weights"}), digest)

    assert second.path("model.keras").read_bytes() == b"new weights" and second.problem() is None
    assert artifact_files(final) == ["model.keras"] and (final / MANIFEST).exists()
    assert leftovers(tmp_path) == []


def test_published_problem_names_what_differs_from_the_manifest(tmp_path):
    folder = Path(publish("s", make_work(tmp_path, FILES)).files["a.bin"].path).parent
    assert published_problem(folder) is None
    assert published_problem(tmp_path) is None  # no manifest: not a published folder, nothing to hold against it
    data = bytearray((folder / "a.bin").read_bytes())
    data[7] ^= 1
    (folder / "a.bin").write_bytes(bytes(data))
    assert published_problem(folder) == f"{folder / 'a.bin'}: content digest differs from the recorded one"
    (folder / MANIFEST).write_text("[not a manifest")
    assert published_problem(folder).startswith(f"{folder}: unreadable {MANIFEST} (")
