"""A manifest's chunk references (csvfs/backup/manifest.py), without a repository:
the items file_chunks accepts and refuses, to_item, chunk_needs, and slice_refs."""

import itertools

import pytest

from csvfs.backup.errors import CorruptManifest
from csvfs.backup.manifest import ChunkRef, chunk_needs, file_chunks, slice_refs, to_item
from csvfs.volume.errors import ExitCode

A, B, C = (bytes([seed]) * 32 for seed in (1, 2, 3))  # chunk ids


def entry(size: int, *items) -> dict:
    return {"path": "/f", "size": size, "chunks": [list(item) for item in items]}


# file_chunks and to_item


def test_three_and_four_element_items_are_read_as_refs():
    refs = file_chunks(entry(1000, [0, 100, A], [100, 50, B, 10], [300, 20, A, 0],
                             [400, 600, C, 4000]))
    assert refs == [ChunkRef(0, 100, A), ChunkRef(100, 50, B, 10), ChunkRef(300, 20, A),
                    ChunkRef(400, 600, C, 4000)]
    assert [ref.needed for ref in refs] == [100, 60, 20, 4600]
    assert [ref.end for ref in refs] == [100, 150, 320, 1000]
    assert file_chunks(entry(10)) == []


def test_to_item_writes_four_elements_only_for_a_skip():
    assert to_item(ChunkRef(0, 100, A)) == [0, 100, A]
    assert to_item(ChunkRef(0, 100, A, 0)) == [0, 100, A]
    assert to_item(ChunkRef(64, 100, A, 5)) == [64, 100, A, 5]
    items = [to_item(ChunkRef(0, 10, A)), to_item(ChunkRef(10, 10, A, 10))]
    assert [to_item(ref) for ref in file_chunks(entry(20, *items))] == items


def test_piece_is_the_referenced_bytes_of_the_chunk():
    data = bytes(range(100))
    assert ChunkRef(0, 100, A).piece(data) is data  # all of it: no copy
    assert ChunkRef(0, 10, A).piece(data) == data[:10]
    assert ChunkRef(500, 20, A, 30).piece(data) == data[30:50]


@pytest.mark.parametrize("item", [
    [0, 10, A, -1],  # negative skip
    [0, 10, A, "5"],  # a string, even of a number
    [0, 10, A, 1.0],
    [0, 10, A, True],
    [0, 10, A, None],
    [0, 10, A, 0, 0],  # five elements
    [0, 10],
    ["0", 10, A],
    [0, 0, A],  # empty
    [0, 10, A[:16]],  # a short id
    [0, 10, list(A)],
    [0, 10, 32],  # bytes(32) would make an id of it
    "not an item",
])
def test_a_malformed_item_is_a_corrupt_manifest(item):
    with pytest.raises(CorruptManifest, match="/f") as caught:
        file_chunks(entry(100, item))
    assert caught.value.exit_code == ExitCode.REPO_CORRUPT
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("items, why", [
    ([[0, 10, A], [5, 10, B]], "begins before 10"),
    ([[10, 10, A], [0, 5, B]], "begins before 20"),
    ([[-1, 10, A]], "begins before 0"),
    ([[90, 20, A, 3]], "past the file's size 100"),
    ([[0, 10, A, -4]], "skip is -4"),
])
def test_a_misplaced_item_is_a_corrupt_manifest(items, why):
    with pytest.raises(CorruptManifest, match=why):
        file_chunks(entry(100, *items))


def test_an_entry_without_its_fields_is_a_corrupt_manifest():
    with pytest.raises(CorruptManifest, match="malformed"):
        file_chunks({"path": "/f", "chunks": []})
    with pytest.raises(CorruptManifest, match="size"):
        file_chunks({"path": "/f", "size": "100", "chunks": []})
    with pytest.raises(CorruptManifest, match="/f"):
        file_chunks({"path": "/f", "size": 100, "chunks": 7})


def test_chunk_needs_is_the_most_any_reference_takes():
    first = {"id": "one", "files": [entry(300, [0, 100, A], [100, 50, A, 100]),
                                    entry(64, [0, 64, B])]}
    second = {"id": "two", "files": [entry(1000, [0, 10, A, 500], [10, 32, B])]}
    assert chunk_needs([first]) == {A: 150, B: 64}
    assert chunk_needs([first, second]) == {A: 510, B: 64}
    assert chunk_needs([]) == {}
    with pytest.raises(CorruptManifest):
        chunk_needs([{"id": "broken", "files": [entry(10, [0, 10, A, -1])]}])


# slice_refs

# A file of 1000 bytes: a hole [0, 100), all of A [100, 200), bytes [50, 150) of B at
# [200, 300), a hole [300, 500), bytes [0, 100) of C at [500, 600), a hole to the end.
REFS = [ChunkRef(100, 100, A), ChunkRef(200, 100, B, 50), ChunkRef(500, 100, C)]


def test_the_whole_range_gives_the_refs_unchanged():
    assert slice_refs(REFS, 0, 1000) == REFS
    assert slice_refs(REFS, 100, 600) == REFS


def test_trimming_at_both_ends_moves_skip_by_what_was_cut():
    assert slice_refs(REFS, 150, 250) == [ChunkRef(150, 50, A, 50), ChunkRef(200, 50, B, 50)]
    assert slice_refs(REFS, 120, 180) == [ChunkRef(120, 60, A, 20)]  # inside one ref
    assert slice_refs(REFS, 250, 550) == [ChunkRef(250, 50, B, 100), ChunkRef(500, 50, C)]
    assert slice_refs(REFS, 299, 501) == [ChunkRef(299, 1, B, 149), ChunkRef(500, 1, C)]


def test_ranges_in_holes_give_nothing():
    assert slice_refs(REFS, 0, 100) == []
    assert slice_refs(REFS, 300, 500) == []
    assert slice_refs(REFS, 350, 400) == []
    assert slice_refs(REFS, 600, 1000) == []
    assert slice_refs(REFS, 5000, 6000) == []  # past the end of the file
    assert slice_refs([], 0, 1000) == []


def test_an_empty_or_reversed_range_gives_nothing():
    assert slice_refs(REFS, 150, 150) == []
    assert slice_refs(REFS, 250, 150) == []
    assert slice_refs(REFS, 200, 200) == []


def test_holes_stay_absent_around_what_is_kept():
    assert slice_refs(REFS, 50, 520) == [ChunkRef(100, 100, A), ChunkRef(200, 100, B, 50),
                                         ChunkRef(500, 20, C)]


def test_a_slice_of_a_slice_is_a_slice_of_the_chunk():
    once = slice_refs(REFS, 220, 290)
    assert once == [ChunkRef(220, 70, B, 70)]
    twice = slice_refs(once, 230, 240)
    assert twice == [ChunkRef(230, 10, B, 80)]
    assert twice == slice_refs(REFS, 230, 240)
    chunk_b = bytes(range(200))
    file_bytes = chunk_b[50:150]  # what the file holds at [200, 300)
    assert twice[0].piece(chunk_b) == file_bytes[30:40]


def test_slices_put_back_together_are_the_refs():
    """Cutting a file's refs at any points and joining the parts reads the same bytes."""
    chunks = {A: bytes(range(100)), B: bytes(range(100, 250)), C: bytes(range(50, 250))}

    def read(refs: list[ChunkRef]) -> bytes:
        out = bytearray(1000)
        for ref in refs:
            out[ref.offset:ref.end] = ref.piece(chunks[ref.chunk_id])
        return bytes(out)

    whole = read(REFS)
    for cuts in ([0, 1000], [0, 150, 1000], [0, 199, 200, 201, 555, 1000],
                 list(range(0, 1001, 7)) + [1000]):
        parts = [ref for start, end in itertools.pairwise(cuts)
                 for ref in slice_refs(REFS, start, end)]
        assert read(parts) == whole, cuts
        assert sum(ref.length for ref in parts) == sum(ref.length for ref in REFS)
        file_chunks(entry(1000, *map(to_item, parts)))  # still a valid entry
