import pytest

from gigassl_fast.cohort import collect_slides, parse_shard, take_shard
from gigassl_fast.errors import GigasslError


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_folders_globs_files_and_manifest(tmp_path):
    a = _touch(tmp_path / "a" / "s1.svs")
    _touch(tmp_path / "a" / "sub" / "s2.ndpi")
    _touch(tmp_path / "a" / "readme.txt")
    b = _touch(tmp_path / "b" / "s3.tif")
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,path,mpp\ncase9,b/s3.tif,0.25\n")
    got = collect_slides([str(tmp_path / "a"), str(tmp_path / "b" / "*.tif")])
    assert [e.slide_id for e in got] == ["s1", "s2", "s3"]
    assert got[0].path == str(a)
    got = collect_slides([str(manifest)], default_mpp=0.5)
    assert got[0].slide_id == "case9" and got[0].path == str(b) and got[0].mpp == 0.25
    got = collect_slides([str(b), str(b)], default_mpp=0.5)  # the same file twice counts once
    assert len(got) == 1 and got[0].mpp == 0.5


def test_duplicate_ids_fail_before_any_work(tmp_path):
    _touch(tmp_path / "x" / "s1.svs")
    _touch(tmp_path / "y" / "s1.svs")
    with pytest.raises(GigasslError, match="duplicate slide id 's1'"):
        collect_slides([str(tmp_path / "x"), str(tmp_path / "y")])


@pytest.mark.parametrize("content,words", [
    ("slide,file\na,b\n", "needs a header"),
    ("path,mpp\nx.svs,abc\n", "mpp must be a number"),
    ("path,mpp\nx.svs,-1\n", "mpp must be > 0"),
    ("slide_id,path,mpp\n", "has no slides"),
    ("slide_id,path\na/b,x.svs\n", "m.csv:2: slide_id 'a/b' is not a plain file name"),
    ("slide_id,path\n.hidden,x.svs\n", "m.csv:2: slide_id '.hidden' is not a plain file name"),
    ("slide_id,path\n" + "x" * 201 + ",x.svs\n", "at most 200 bytes"),
])
def test_bad_manifests(tmp_path, content, words):
    m = tmp_path / "m.csv"
    m.write_text(content)
    with pytest.raises(GigasslError, match=words):
        collect_slides([str(m)])


def test_hidden_files_in_folders_are_not_slides(tmp_path):
    _touch(tmp_path / "a" / "s1.svs")
    _touch(tmp_path / "a" / "._s1.svs")  # a macOS resource fork beside it
    assert [e.slide_id for e in collect_slides([str(tmp_path / "a")])] == ["s1"]
    with pytest.raises(GigasslError, match="'._s1' is not a plain file name"):
        collect_slides([str(tmp_path / "a" / "._s1.svs")])


def test_missing_inputs(tmp_path):
    # a missing path is one slide that will fail (as a bad manifest row), not the end of the cohort
    assert [(e.slide_id, e.path) for e in collect_slides([str(tmp_path / "nope.svs")])] == [("nope", str(tmp_path / "nope.svs"))]
    with pytest.raises(GigasslError, match="matches no file"):
        collect_slides([str(tmp_path / "*.svs")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(GigasslError, match="no slide files found"):
        collect_slides([str(tmp_path / "empty")])


def test_shards_cover_each_slide_exactly_once(tmp_path):
    for i in range(23):
        _touch(tmp_path / f"s{i:02d}.svs")
    entries = collect_slides([str(tmp_path)])
    for n in (1, 2, 5, 30):
        parts = [take_shard(entries, (i, n)) for i in range(n)]
        ids = sorted(e.slide_id for part in parts for e in part)
        assert ids == sorted(e.slide_id for e in entries)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert take_shard(entries, (1, 4)) == take_shard(list(reversed(entries)), (1, 4))  # deterministic


@pytest.mark.parametrize("spec", ["4/4", "-1/3", "1", "a/b", "0/0"])
def test_bad_shard_specs(spec):
    with pytest.raises(GigasslError, match="--shard"):
        parse_shard(spec)
