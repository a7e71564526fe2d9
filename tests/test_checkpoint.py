import json

import pytest
import torch
from conftest import make_model, save_model, state_dict_of
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_soup.checkpoint import (
    CheckpointReader,
    TensorInfo,
    parse_dtype,
    parse_size,
    weight_files,
)
from hf_soup.errors import SoupError
from hf_soup.writer import CheckpointWriter, plan_shards


def sample_tensors():
    generator = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=generator),
        "b.bf16": torch.randn(3, 4, generator=generator).to(torch.bfloat16),
        "c.fp16": torch.randn(9, generator=generator).to(torch.float16),
        "d.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.mask": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(3.5),
        "g.empty": torch.zeros(0, 4),
        "h.big": torch.randn(64, 64, generator=generator),
    }


@pytest.mark.parametrize("max_shard_size", ["5GB", 200, "1KB"])
def test_writer_round_trip(tmp_path, max_shard_size):
    tensors = sample_tensors()
    infos = [TensorInfo(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    with CheckpointWriter(tmp_path, infos, max_shard_size=max_shard_size) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    files = sorted(tmp_path.glob("*.safetensors"))
    loaded = {}
    for file in files:
        loaded.update(load_file(file))
        with safe_open(str(file), "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
    if len(files) > 1:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        assert files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
        # the reader understands what the writer wrote
        with CheckpointReader(tmp_path) as reader:
            assert set(reader.names()) == set(tensors)
            assert torch.equal(reader.get("h.big"), tensors["h.big"])
    else:
        assert files[0].name == "model.safetensors"


def test_plan_shards_gives_oversized_tensor_its_own_shard():
    infos = [
        TensorInfo("a", (10,), torch.float32),
        TensorInfo("b", (100,), torch.float32),
        TensorInfo("c", (1,), torch.float32),
    ]
    shards = plan_shards(infos, 100)
    assert [[i.name for i in shard] for shard in shards] == [["a"], ["b"], ["c"]]


def test_writer_rejects_out_of_plan_tensors(tmp_path):
    infos = [TensorInfo("a", (2,), torch.float32), TensorInfo("b", (2,), torch.float32)]
    writer = CheckpointWriter(tmp_path, infos)
    with pytest.raises(SoupError, match="expected a"):
        writer.write("b", torch.zeros(2))
    with pytest.raises(SoupError, match=r"expected a \[2\] torch.float32"):
        writer.write("a", torch.zeros(3))
    writer.write("a", torch.zeros(2))
    with pytest.raises(SoupError, match="before every planned tensor"):
        writer.close()


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_reader_reads_single_and_sharded(tmp_path, shard):
    folder = save_model(make_model("llama", 1), tmp_path / "m", max_shard_size=shard)
    expected = state_dict_of(folder)
    with CheckpointReader(folder) as reader:
        assert set(reader.names()) == set(expected)
        assert len(reader.files) == (1 if shard is None else len(list(folder.glob("*.safetensors"))))
        for info in reader.infos():
            assert info.shape == tuple(expected[info.name].shape)
            assert torch.equal(reader.get(info.name), expected[info.name])


def test_truncated_and_junk_safetensors_are_refused(tmp_path):
    folder = save_model(make_model("llama", 1), tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(SoupError, match=r"model.safetensors is not a valid safetensors file.*truncated or corrupt"):
        CheckpointReader(folder, label="m")
    (folder / "model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(SoupError, match="not a valid safetensors file"):
        CheckpointReader(folder)


def test_missing_shard_and_bad_index(tmp_path):
    folder = save_model(make_model("llama", 1), tmp_path / "m", max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    moved = (folder / shard).read_bytes()
    (folder / shard).unlink()
    with pytest.raises(SoupError, match=f"shard {shard} named in .* is missing"):
        weight_files(folder)
    (folder / shard).write_bytes(moved)
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = (
        shard if index["weight_map"][name] != shard else sorted(set(index["weight_map"].values()))[0]
    )
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SoupError, match=f"maps tensor {name}"):
        CheckpointReader(folder)
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(SoupError, match="shard index .* is not valid JSON"):
        weight_files(folder)


def test_pickle_is_refused_unless_opted_in(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    state = {"w": torch.randn(3, 3)}
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(SoupError, match="pickle checkpoint.*allow_pickle=True"):
        CheckpointReader(folder)
    with CheckpointReader(folder, allow_pickle=True) as reader:
        assert torch.equal(reader.get("w"), state["w"])
    # weights_only=True: a pickle that is not plain tensors is refused, not executed
    torch.save({"w": torch.zeros(1), "f": print}, folder / "pytorch_model.bin")
    with pytest.raises(SoupError, match="weights_only=True"):
        CheckpointReader(folder, allow_pickle=True)


def test_folder_without_weights(tmp_path):
    with pytest.raises(SoupError, match="does not exist"):
        weight_files(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SoupError, match=r"no weights in .*found: config.json"):
        weight_files(tmp_path)


def test_adapter_folder_is_read(tmp_path):
    save_file({"base_model.model.q.lora_A.weight": torch.ones(2, 4)}, str(tmp_path / "adapter_model.safetensors"))
    with CheckpointReader(tmp_path) as reader:
        assert reader.names() == ["base_model.model.q.lora_A.weight"]


def test_parse_size_and_dtype():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500 MB") == 500 * 10**6
    assert parse_size(123) == 123
    for bad in ("lots", -1, 0, True, "5XB"):
        with pytest.raises(SoupError):
            parse_size(bad)
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("torch.float16") is torch.float16
    with pytest.raises(SoupError, match="unknown dtype 'int8'"):
        parse_dtype("int8")
    with pytest.raises(SoupError, match="unknown dtype"):
        parse_dtype("float33")
