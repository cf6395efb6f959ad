"""Walking submitted folders: regular files of accepted types only; nothing outside the root is opened."""
import os

from producer.walk import walk


def test_walks_recursively_and_names_files_relative_to_the_root(tmp_path):
    root = tmp_path / "inbox"
    (root / "q3").mkdir(parents=True)
    (root / "a.txt").write_text("a")
    (root / "q3" / "report.PDF").write_bytes(b"%PDF-1.4")
    (root / "notes.docx").write_bytes(b"PK")
    found, skipped = walk([root])
    assert [(f.name, f.media_type) for f in found] == [("inbox/a.txt", "text/plain"),
                                                       ("inbox/q3/report.PDF", "application/pdf")]
    assert [(s.path.name, s.reason) for s in skipped] == [("notes.docx", "unsupported extension '.docx'")]


def test_symlinks_leaving_the_root_are_skipped_and_reported(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    root = tmp_path / "inbox"
    root.mkdir()
    (root / "inside.txt").write_text("fine")
    (root / "escape.txt").symlink_to(secret)
    (root / "alias.txt").symlink_to(root / "inside.txt")
    (root / "up").symlink_to(tmp_path, target_is_directory=True)
    found, skipped = walk([root])
    assert sorted(f.name for f in found) == ["inbox/alias.txt", "inbox/inside.txt"]
    reasons = {s.path.name: s.reason for s in skipped}
    assert reasons["escape.txt"].startswith("symlink leaves the submitted folder")
    assert reasons["up"] == "symlinked folder (not followed)"


def test_fifos_are_never_opened(tmp_path):
    root = tmp_path / "inbox"
    root.mkdir()
    os.mkfifo(root / "pipe.txt")  # opening it for reading would block forever
    found, skipped = walk([root])
    assert found == []
    assert skipped[0].reason == "not a regular file (FIFO, socket or device)"


def test_a_single_file_and_a_missing_path(tmp_path):
    (tmp_path / "one.md").write_text("# hi")
    found, skipped = walk([tmp_path / "one.md", tmp_path / "nope"])
    assert [f.name for f in found] == ["one.md"]
    assert skipped[0].reason == "does not exist"
