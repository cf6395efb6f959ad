"""Walking submitted folders: every regular file; nothing outside the root is opened."""
import os

from producer.intake.walk import walk
from schemas.states import ErrorCode


def test_walks_recursively_and_names_files_relative_to_the_root(tmp_path):
    root = tmp_path / "inbox"
    (root / "q3").mkdir(parents=True)
    (root / "a.txt").write_text("a")
    (root / "q3" / "report.PDF").write_bytes(b"%PDF-1.4")
    (root / "scan-without-extension").write_bytes(b"\x89PNG\r\n\x1a\n")
    (root / ".DS_Store").write_bytes(b"\x00\x00")
    result = walk([root])
    assert [f.name for f in result.found] == ["inbox/a.txt", "inbox/scan-without-extension", "inbox/q3/report.PDF"]
    assert result.rejects == [] and result.skipped == [root / ".DS_Store"]


def test_symlinks_leaving_the_root_are_rejected_without_being_opened(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    root = tmp_path / "inbox"
    root.mkdir()
    (root / "inside.txt").write_text("fine")
    (root / "escape.txt").symlink_to(secret)
    (root / "alias.txt").symlink_to(root / "inside.txt")
    (root / "up").symlink_to(tmp_path, target_is_directory=True)
    result = walk([root])
    assert sorted(f.name for f in result.found) == ["inbox/alias.txt", "inbox/inside.txt"]
    (reject,) = result.rejects
    assert (reject.name, reject.code) == ("inbox/escape.txt", ErrorCode.SYMLINK_ESCAPE)
    assert result.skipped == [root / "up"]


def test_fifos_are_rejected_and_never_opened(tmp_path):
    root = tmp_path / "inbox"
    root.mkdir()
    os.mkfifo(root / "pipe.txt")  # opening it for reading would block forever
    result = walk([root])
    assert result.found == []
    assert [(r.name, r.code) for r in result.rejects] == [("inbox/pipe.txt", ErrorCode.NOT_REGULAR_FILE)]


def test_a_single_file_and_a_missing_path(tmp_path):
    (tmp_path / "one.md").write_text("# hi")
    result = walk([tmp_path / "one.md", tmp_path / "nope"])
    assert [f.name for f in result.found] == ["one.md"]
    assert [r.code for r in result.rejects] == [ErrorCode.UNREADABLE]
