"""Enumeration and reading of folders, archives and list files (``aigid.data.sources``)."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest
from adversarial_corpus import build_corpus, build_list_file, jpeg_bytes, nonutf8_supported

from aigid.data import sources
from aigid.data.sources import (Archive, Item, ItemError, content_hash, iter_items, iter_units,
                                read_items)


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    return root, build_corpus(root)


def _ids(got):
    return [g.id for g in got]


def _tree(path: Path) -> list[str]:
    return sorted(os.path.join(d, n) for d, dirs, files in os.walk(path) for n in dirs + files)


def test_corpus_enumerates_every_expected_id_once_and_stably(corpus):
    root, expected = corpus
    first, second = list(iter_items([root])), list(iter_items([str(root)]))
    assert _ids(first) == _ids(second)  # same ids, same order on every run
    assert len(set(_ids(first))) == len(first)
    assert set(_ids(first)) == set(expected)
    for got in first:
        if isinstance(got, ItemError):
            assert expected[got.id] == "error" and got.reason
        else:
            assert os.path.isabs(got.source)
            assert got.id == (got.source if got.member is None else f"{got.source}::{got.member}")
    reasons = {g.id: g.reason for g in first if isinstance(g, ItemError)}
    assert reasons[str(root / "nested" / "loop")] == "directory symlink loop"
    assert reasons[str(root / "dangling.jpg")] == "dangling symlink"
    assert reasons[f"{root}/shards/evil.tar::link.jpg"] == "archive link member skipped"
    assert "not a tar file" in reasons[str(root / "shards" / "broken.tar")]
    assert "not a zip file" in reasons[str(root / "shards" / "broken.zip")]
    assert "unexpected end of data" in reasons[str(root / "shards" / "truncated.tgz")]


def test_reading_returns_the_bytes_and_writes_nothing(corpus, tmp_path):
    root, expected = corpus
    before_tree, before_parent = _tree(tmp_path), sorted(os.listdir(tmp_path.parent))
    abs_existed = os.path.exists("/abs")
    items = [g for g in iter_items([root]) if isinstance(g, Item)]
    results = {item.id: (data, reason) for item, data, reason in read_items(items)}
    assert set(results) == {i.id for i in items}  # each item exactly once
    assert _tree(tmp_path) == before_tree  # "../escape.jpg" and friends were never extracted
    assert sorted(os.listdir(tmp_path.parent)) == before_parent
    assert os.path.exists("/abs") == abs_existed

    good = results[str(root / "good.jpg")][0]
    assert good == (root / "good.jpg").read_bytes()
    with tarfile.open(root / "shards" / "evil.tar") as tf:  # the escaping member, read by name
        escape = tf.extractfile("../escape.jpg").read()
    assert results[f"{root}/shards/evil.tar::../escape.jpg"] == (escape, None)
    assert results[f"{root}/shards/pack.zip::good.jpg"][0][:3] == b"\xff\xd8\xff"
    data, reason = results[f"{root}/shards/pack.zip::corrupt.jpg"]
    assert data is None and "CRC" in reason
    data, reason = results[f"{root}/shards/truncated.tgz::second.jpg"]
    assert data is None and "unexpected end of data" in reason
    assert results[f"{root}/shards/truncated.tgz::first.jpg"][0] is not None


def test_archive_members_are_read_in_one_pass(corpus, monkeypatch):
    root, _ = corpus
    opens: list[str] = []
    real_open = tarfile.open

    def counting_open(name=None, *args, **kwargs):
        opens.append(str(name))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(tarfile, "open", counting_open)
    members = [g for g in iter_items([root / "shards" / "pack.tar.gz"]) if isinstance(g, Item)]
    assert len(members) == 2 and len(opens) == 1  # enumeration: one pass
    opens.clear()
    got = list(read_items(list(reversed(members))))  # any order within the run
    assert len(opens) == 1 and {i.id for i, d, r in got} == {m.id for m in members}
    assert all(d is not None and r is None for _, d, r in got)


def test_non_utf8_name_round_trips(corpus):
    root, expected = corpus
    if not nonutf8_supported(root):
        pytest.skip("the filesystem refuses non-UTF-8 file names")
    (item,) = [g for g in iter_items([root]) if isinstance(g, Item) and "caf" in g.id]
    assert item.id == os.fsdecode(os.path.join(os.fsencode(root), b"caf\xe9.jpg"))
    with open(item.id, "rb") as fh:  # the id opens the file
        assert fh.read()[:3] == b"\xff\xd8\xff"
    ((_, data, reason),) = list(read_items([item]))
    assert reason is None and data[:3] == b"\xff\xd8\xff"


def test_list_file(corpus):
    root, _ = corpus
    lst, expected = build_list_file(root)
    got = list(iter_items([lst]))
    assert set(_ids(got)) == set(expected) and len(got) == len(expected)
    errors = {g.id: g.reason for g in got if isinstance(g, ItemError)}
    assert errors == {str(root / "does-not-exist.jpg"): "path not found"}
    # list files met while walking a folder are data, not lists: scanning the folder ignores them
    assert str(root / "lists" / "files.lst") not in set(_ids(iter_items([root])))


def test_overlapping_paths_count_each_file_once(corpus):
    root, expected = corpus
    (root / "alias").symlink_to("nested")  # a second way into a folder, not a loop
    got = list(iter_items([root / "good.jpg", root, root / "nested", root / "good.jpg"]))
    ids = _ids(got)
    assert len(ids) == len(set(ids))
    errors = {g.id: g.reason for g in got if isinstance(g, ItemError)}
    assert errors[str(root / "alias")] == "directory already scanned via another path"
    assert set(ids) - {str(root / "alias")} == set(expected)  # walked under its real name


def test_units_keep_archives_whole_and_options(corpus):
    root, _ = corpus
    units = list(iter_units([root]))
    archives = [u.id for u in units if isinstance(u, Archive)]
    assert sorted(os.path.basename(a) for a in archives) == sorted(
        ["evil.tar", "pack.tar.gz", "truncated.tgz", "pack.zip", "broken.tar", "broken.zip"])
    top = {g.id for g in iter_items([root], recursive=False)}
    assert str(root / "good.jpg") in top and not any("/nested/" in i or "::" in i for i in top)
    everything = {g.id for g in iter_items([root], extensions=None)}
    assert str(root / "notes.txt") in everything
    assert f"{root}/shards/evil.tar::normal/caption.txt" in everything
    only_png = {g.id for g in iter_items([root], extensions={"PNG"}) if isinstance(g, Item)}
    assert only_png and all(i.lower().endswith(".png") for i in only_png)
    missing = list(iter_items([root / "nope"]))
    assert missing == [ItemError(str(root / "nope"), "path not found")]


def test_duplicate_member_names_get_distinct_ids(tmp_path):
    path = tmp_path / "dup.tar"
    blobs = [jpeg_bytes(seed=s) for s in (1, 2, 3)]
    with tarfile.open(path, "w") as tf:
        for blob in blobs:
            info = tarfile.TarInfo("same.jpg")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    items = list(iter_items([path]))
    assert _ids(items) == [f"{path}::same.jpg", f"{path}::same.jpg#2", f"{path}::same.jpg#3"]
    got = {item.id: data for item, data, _ in read_items(items)}
    assert [got[i.id] for i in items] == blobs


def test_size_limit_and_hash(tmp_path, monkeypatch):
    (tmp_path / "a.jpg").write_bytes(b"x" * 100)
    monkeypatch.setattr(sources, "MAX_ITEM_BYTES", 10)
    ((item, data, reason),) = list(read_items(list(iter_items([tmp_path]))))
    assert data is None and reason.startswith("too large")
    assert content_hash(b"abc") == hashlib.blake2b(b"abc", digest_size=16).hexdigest()
