"""Stock webdataset and ray.data.read_webdataset read the same shards, member for member."""

import pytest

from serialgen.dataset.loader import resolve_shards
from serialgen.dataset.shards import MEMBERS
from test_loader_synth import write_synthetic_shards

pytestmark = pytest.mark.ray


def test_stock_webdataset_and_ray_read_the_same_samples(tmp_path):
    import webdataset as wds

    write_synthetic_shards(tmp_path, n_shards=2, per_shard=3, size=(64, 96))
    urls = resolve_shards(tmp_path)
    stock = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}
    assert len(stock) == 6 and all(set(MEMBERS) <= set(s) for s in stock.values())

    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        rows = ray.data.read_webdataset(urls, decoder=None).take_all()
    finally:
        ray.shutdown()
    by_key = {r["__key__"]: r for r in rows}
    assert set(by_key) == set(stock)
    for key, sample in stock.items():
        for member in MEMBERS:
            assert bytes(by_key[key][member]) == sample[member], (key, member)
