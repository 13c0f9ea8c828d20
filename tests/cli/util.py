"""Shared pieces of the CLI tests: the one-line-error check and a snapshot of a dir."""

import hashlib

from yunque.cli import main


def fails(capsys, argv, *words, code=1):
    """Run the CLI, expect exit `code` and one stderr line holding `words`; return that line."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err
    return err


def snapshot(directory):
    return {p.relative_to(directory): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}
