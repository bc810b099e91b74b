"""Errors of the command line: one `lowbit: error: ...` line on stderr and exit code 2 for usage,
1 for a failure while running, 130 for Ctrl-C; the traceback only with --debug."""

import subprocess
import sys

import pytest
import torch

from lowbit import cli
from lowbit.dfloat import cli as dfloat_cli


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowbit: error: "), err
    return lines[0]


def test_missing_input_is_one_line_and_exit_1(tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    assert cli.main(["compress", str(missing), str(tmp_path / "out.safetensors")]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert str(missing) in line and "No such file" in line


@pytest.mark.parametrize("argv", [["--debug", "compress"], ["compress", "--debug"]], ids=["before", "after"])
def test_debug_shows_the_traceback(tmp_path, capsys, argv):
    missing = str(tmp_path / "missing.safetensors")
    assert cli.main([*argv, missing, str(tmp_path / "out.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("lowbit: error: ")


def test_inspect_of_a_file_that_is_not_safetensors(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("not a safetensors file\n")
    assert cli.main(["inspect", str(path)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "SafetensorError" in line and str(path) in line and "--debug" not in line


def test_inspect_of_a_damaged_dfloat_file_names_the_format_error_and_the_file(tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "damaged.safetensors"
    save_file({"w.header": torch.zeros(8, dtype=torch.int64)}, str(path))
    assert cli.main(["inspect", str(path)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "'w'" in line and "missing codes" in line and str(path) in line


def test_a_missing_package_says_which_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    assert cli.main(["inspect", str(tmp_path / "model.safetensors")]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line == ("lowbit: error: `lowbit inspect` needs the package safetensors, which is not installed "
                    "(pip install safetensors)")


def test_an_unexpected_error_is_one_line_naming_its_type(tmp_path, capsys, monkeypatch):
    def fail(args):
        raise RuntimeError("first line\nsecond line")

    monkeypatch.setattr(dfloat_cli, "cmd_inspect", fail)
    assert cli.main(["inspect", "model.safetensors"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line == ("lowbit: error: RuntimeError: first line second line (while running lowbit inspect "
                    "model.safetensors); --debug shows the traceback")


def test_ctrl_c_exits_130_quietly(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(dfloat_cli, "cmd_inspect", interrupted)
    assert cli.main(["inspect", "model.safetensors"]) == 130
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv", [[], ["compress"], ["frobnicate"], ["inspect", "a", "b"]],
                         ids=["no-command", "missing-argument", "unknown-command", "extra-argument"])
def test_usage_errors_are_one_line_and_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert "--help" in _one_error_line(capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_cuda_asked_for_without_a_device_is_one_line(capsys):
    assert cli.main(["info", "--device", "cuda"]) == 1
    assert _one_error_line(capsys.readouterr().err) == (
        "lowbit: error: --device cuda asked for, but no CUDA device is visible")


def test_a_missing_benchmark_folder_is_one_line(tmp_path, capsys):
    assert cli.main(["bench", "--path", str(tmp_path)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "no benchmark folder found" in line and str(tmp_path) in line


def test_as_a_program(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lowbit.cli", "compress", str(tmp_path / "missing.safetensors"),
                             str(tmp_path / "out.safetensors")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    _one_error_line(result.stderr)
