"""The entry point: --version, expected errors at one rank."""
from importlib.metadata import version

import pytest

from mpifc.cli import main


def test_version_comes_from_the_package_metadata(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"mpifc {version('mpifc')}"


def test_expected_error_is_one_line_without_traceback(capsys):
    # an impossible layout at 1 rank: a GridError, status 1, one line on stderr
    assert main(["train", "digits-mlp", "--set", "parallel.tp=2"]) == 1
    err = capsys.readouterr().err
    assert err == "mpifc: tp=2 does not divide the 1 ranks of the job\n"
