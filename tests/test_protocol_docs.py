"""docs/protocols/ holds copies of the project's shared protocol documents
(BENCHMARK.md, PEERS.md), which the README's figures name. Where the
originals sit beside the checkout (../shared/, a development machine), the
copies must say the same; a fresh clone has only the copies."""

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
NAMES = ["BENCHMARK.md", "PEERS.md"]


def _body(path):
    """A copy's text after its first line (the note on where it comes from)
    and the blank line under it."""
    text = path.read_text()
    first, _, rest = text.partition("\n")
    assert first.startswith("<!-- A copy of the project's shared "), path
    return rest[1:] if rest.startswith("\n") else rest


@pytest.mark.parametrize("name", NAMES)
def test_the_copy_is_in_the_repository(name):
    assert _body(REPO / "docs" / "protocols" / name).startswith("# ")


@pytest.mark.parametrize("name", NAMES)
def test_the_copy_matches_the_shared_original(name):
    original = SHARED / name
    if not original.is_file():
        pytest.skip(f"no {original} beside this checkout")
    assert _body(REPO / "docs" / "protocols" / name) == original.read_text(), (
        f"docs/protocols/{name} differs from {original}: copy it again")
