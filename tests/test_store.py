import numpy as np
import pytest
import torch

from trajstore import TrajectoryStore, get_preset
from trajstore.layout import ParamLayout

from .helpers import MixedNet, flat, sgd_steps

CODECS = ["lossless", "xor-delta:4", "xor-delta"]


def record(path, codec, steps=13, **kw):
    torch.manual_seed(0)
    model = MixedNet()
    rows = []
    store = TrajectoryStore.create(path, model, codec=codec, chunk_size=64, shard_size=128, **kw)
    rows.append(flat(model))
    store.append(model, step=0, epoch=0)
    for k, loss in enumerate(sgd_steps(model, steps - 1), start=1):
        rows.append(flat(model))
        store.append(model, step=k, epoch=k // 4, metrics={"loss": loss} if k % 2 else {"acc": 0.5})
    store.close()
    return model, np.stack(rows)


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_bit_for_bit(tmp_path, codec):
    model, rows = record(tmp_path / "run.zarr", codec)
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        assert len(store) == len(rows)
        assert store.n_params == rows.shape[1] == sum(p.numel() for p in model.parameters())
        got = store.read(slice(None))
        assert got.dtype == np.float32
        assert np.array_equal(got.view(np.uint32), rows.view(np.uint32))
        for i in (0, 3, 4, 5, len(rows) - 1, -1):  # keyframes and in-between rows decode alone
            assert np.array_equal(store.read(i), rows[i])
        assert np.array_equal(store.read([7, 2, 9]), rows[[7, 2, 9]])
        assert np.array_equal(store.read(slice(1, 12, 3)), rows[1:12:3])
        assert np.array_equal(store.to_dask(row_block=4, col_block=50).compute(), rows)
        assert store.steps.tolist() == list(range(len(rows)))
        assert store.epochs.tolist() == [k // 4 for k in range(len(rows))]
        loss = store.metrics("loss")
        assert np.isnan(loss[0]) and np.isnan(loss[2]) and not np.isnan(loss[1])
        assert store.metric_names() == ["acc", "loss"]


def test_state_dict_and_load_into_restore_shapes_and_dtypes(tmp_path):
    model, rows = record(tmp_path / "run.zarr", "lossless", buffers=True)
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        sd = store.state_dict(len(store) - 1)
        for name, p in model.named_parameters():
            assert sd[name].shape == p.shape and sd[name].dtype == p.dtype
            assert torch.equal(sd[name], p.detach())
        assert torch.equal(sd["bn.running_mean"], model.bn.running_mean)
        assert sd["bn.num_batches_tracked"].dtype == torch.int64
        fresh = MixedNet(width=8)
        store.load_into(fresh, 5)
        assert np.array_equal(flat(fresh), rows[5])
        assert torch.equal(fresh.bn.running_var, store.read_buffers(5)["bn.running_var"])
        with pytest.raises(Exception, match="fc.weight|conv.weight"):
            store.load_into(MixedNet(width=4), 5)


def test_append_flat_vectors_tensors_and_state_dicts(tmp_path):
    layout = ParamLayout.from_module(MixedNet())
    store = TrajectoryStore.create(tmp_path / "v.zarr", layout)
    a = np.arange(layout.n, dtype=np.float32)
    store.append(a, step=0)
    store.append(torch.from_numpy(a * 2), step=1)
    sd = MixedNet().state_dict()
    store.append(sd, step=2)
    store.close()
    with TrajectoryStore.open(tmp_path / "v.zarr") as r:
        assert np.array_equal(r.read(0), a) and np.array_equal(r.read(1), 2 * a)
        assert np.array_equal(r.read(2), np.concatenate([sd[n].reshape(-1).numpy() for n in layout.names]))


def test_reopen_append_resumes_and_truncate(tmp_path):
    path = tmp_path / "run.zarr"
    model, rows = record(path, "xor-delta:4", steps=6)
    with TrajectoryStore.open(path, "a") as store:
        assert len(store) == 6
        more = []
        for k, _ in enumerate(sgd_steps(model, 5, seed=1), start=6):
            more.append(flat(model))
            store.append(model, step=k)
    all_rows = np.concatenate([rows, np.stack(more)])
    with TrajectoryStore.open(path, "a") as store:
        assert np.array_equal(store.read(slice(None)), all_rows)
        assert store.truncate_after_step(7) == 8
        assert len(store) == 8
        store.append(all_rows[3], step=8)  # overwrite the rows beyond the new end
    with TrajectoryStore.open(path) as store:
        assert len(store) == 9
        assert np.array_equal(store.read(slice(0, 8)), all_rows[:8])
        assert np.array_equal(store.read(8), all_rows[3])
        assert store.steps.tolist() == list(range(9))
        assert store.attrs["truncations"] == [8]


@pytest.mark.parametrize("codec,keepbits", [("bitround-delta:8", 8), ("bitround-delta:12", 12), ("float16-delta", 10)])
def test_lossy_presets_respect_their_error_bound(tmp_path, codec, keepbits):
    _, rows = record(tmp_path / "l.zarr", codec)
    with TrajectoryStore.open(tmp_path / "l.zarr") as store:
        assert store.attrs["codec"]["lossless"] is False
        assert "error" not in store.attrs["codec"]["error_bound"] or "2^-" in store.attrs["codec"]["error_bound"]
        got = store.read(slice(None))
    assert np.array_equal(got[0], rows[0])  # the reference is exact
    delta = np.abs(rows - rows[0]).astype(np.float64)
    err = np.abs(got.astype(np.float64) - rows)
    bound = delta * 2.0 ** -(keepbits + 1) + np.abs(rows) * 2.0 ** -23 + 2.0 ** -25
    assert (err <= bound).all()
    assert err.max() > 0  # it really is lossy


def test_codec_parsing_errors():
    from trajstore.errors import InvalidArgumentError

    assert get_preset("xor-delta:8").keyframe_interval == 8
    with pytest.raises(InvalidArgumentError, match="unknown codec"):
        get_preset("gzip")
    with pytest.raises(InvalidArgumentError, match="bad codec parameter"):
        get_preset("bitround-delta:99")


def test_store_files_are_chunked_sharded_and_checksummed(tmp_path):
    record(tmp_path / "run.zarr", "lossless", steps=3)
    import json

    meta = json.loads((tmp_path / "run.zarr" / "params" / "zarr.json").read_text())
    codec = meta["codecs"][0]
    assert codec["name"] == "sharding_indexed"
    names = [c["name"] for c in codec["configuration"]["codecs"]]
    assert names == ["bytes", "blosc", "crc32c"]
    root = json.loads((tmp_path / "run.zarr" / "zarr.json").read_text())["attributes"]["trajstore"]
    assert root["format_version"] == 1 and root["committed"] == 3
    assert [t["name"] for t in root["layout"]] == [name for name, _ in MixedNet().named_parameters()]
