"""The command line is built from the family registry: a family's demo section and commands appear
once it is registered, and `lowbit info` lists the families and the backends of every op."""

import pytest
import torch

import lowbit
from lowbit import cli
from lowbit.registry import Family, register, unregister


class _ToyModule(torch.nn.Module):
    pass


@pytest.fixture
def toy_families(monkeypatch):
    """Two throwaway families (the second one's demo fails, and it adds a command `toy`), the only
    ones `lowbit demo` runs; the foundation's bit-packing section is a stub. -> the calls made."""
    calls = []

    def demo_passes(device):
        calls.append(("toy-a demo", device.type))
        print("toy-a section")
        return True

    def demo_fails(device):
        calls.append(("toy-b demo", device.type))
        return False

    def toy_command(args):
        calls.append(("toy", args.input, args.times))
        if args.input == "bad.bin":
            raise RuntimeError("cannot read it")
        return 0

    def add_cli(subparsers):
        p = subparsers.add_parser("toy", help="a toy family's command")
        p.add_argument("input")
        p.add_argument("--times", type=int, default=1)
        p.set_defaults(func=toy_command)

    registered = [
        register(Family("toy-a", _ToyModule, demo=demo_passes, description="first toy family")),
        register(Family("toy-b", _ToyModule, demo=demo_fails, add_cli=add_cli, description="second toy family")),
    ]
    try:
        every = lowbit.registry.families

        def toys_only():
            return tuple(f for f in every() if f.name.startswith("toy-"))

        monkeypatch.setattr(lowbit.registry, "families", toys_only)
        monkeypatch.setattr(cli, "bitpack", lambda device: calls.append(("bit packing", device.type)) or True)
        yield calls
    finally:
        for family in registered:
            unregister(family.name)


def test_demo_runs_the_foundation_then_each_family_in_registration_order(toy_families, capsys):
    assert cli.main(["demo", "--device", "cpu", "--no-model"]) == 1
    assert toy_families == [("bit packing", "cpu"), ("toy-a demo", "cpu"), ("toy-b demo", "cpu")]
    out = capsys.readouterr().out
    assert "toy-a section" in out
    assert out.strip().splitlines()[-1] == "MISMATCH: a backend disagrees with the reference (in toy-b)"


def test_a_family_command_is_in_the_parser_and_runs(toy_families, capsys):
    assert "toy" in cli.build_parser().format_help()
    assert cli.main(["toy", "x.bin", "--times", "3"]) == 0
    assert toy_families == [("toy", "x.bin", 3)]


def test_a_family_command_fails_in_one_line_naming_its_file(toy_families, capsys):
    assert cli.main(["toy", "bad.bin"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("lowbit: error: RuntimeError: cannot read it (while running lowbit toy bad.bin); "
                   "--debug shows the traceback")


def test_a_family_command_takes_debug_after_its_name(toy_families, capsys):
    assert cli.main(["toy", "bad.bin", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("lowbit: error: RuntimeError: cannot read it")


def test_a_family_command_refuses_unknown_arguments(toy_families, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["toy", "x.bin", "--frobnicate"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --frobnicate" in capsys.readouterr().err
    assert toy_families == []


def test_unregistered_families_leave_the_parser():
    register(Family("toy-c", _ToyModule, add_cli=lambda sub: sub.add_parser("toy-c-command"),
                    description="third toy family"))
    try:
        assert "toy-c-command" in cli.build_parser().format_help()
    finally:
        assert unregister("toy-c").name == "toy-c"
    assert "toy-c-command" not in cli.build_parser().format_help()
    with pytest.raises(ValueError, match="toy-c"):
        unregister("toy-c")


def test_info_lists_the_families_and_the_backends_of_every_op(capsys):
    assert cli.main(["info", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for family in lowbit.registry.families():
        assert any(line.split(None, 1) == [family.name, family.description] for line in lines), family.name
    backends = lowbit.backend.BACKENDS[1:]
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["op"])
    assert lines[header].split() == ["op", *backends, "auto"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[header + 1:]}
    assert rows.keys() == lowbit.ops.definitions().keys()
    for name in lowbit.ops.definitions():
        *marks, auto = rows[name]
        assert [b for b, mark in zip(backends, marks) if mark == "yes"] == list(lowbit.ops.implementations(name))
        assert auto == lowbit.ops.resolve(name, "auto", "cpu")


def test_info_notes_a_backend_chosen_by_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("LOWBIT_BACKEND", "reference")
    assert cli.main(["info", "--device", "cpu"]) == 0
    assert "LOWBIT_BACKEND=reference" in capsys.readouterr().out


def test_dfloat_commands_round_trip_bit_for_bit(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    original = {
        "q.weight": (torch.randn(33, 97, generator=g) * 0.02).to(torch.bfloat16),
        "k.weight": torch.randn(17, 97, generator=g).to(torch.float16),
        "v.weight": torch.randn(31, 67, generator=g) * 1e-3,
        "v.bias": torch.randn(31, generator=g),  # below compress_state_dict's min_numel: kept as it is
        "ids": torch.arange(5),
    }
    source, stored, restored = (str(tmp_path / name) for name in ("in.safetensors", "c.safetensors",
                                                                  "out.safetensors"))
    save_file(original, source)
    assert cli.main(["compress", source, stored, "--quiet"]) == 0
    assert cli.main(["inspect", stored]) == 0
    assert "3 dfloat tensors" in capsys.readouterr().out
    assert cli.main(["decompress", stored, restored]) == 0
    back = load_file(restored)
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype
        assert torch.equal(back[name].view(torch.uint8), tensor.view(torch.uint8)), name
