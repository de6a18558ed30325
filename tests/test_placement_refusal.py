"""An index with a shard that fits on no node is refused before anything is deployed, naming
the shard and the sizes (issue 36, item 3), against a real Ray whose one node has 1 GiB of
memory (``ray.cluster_utils.Cluster``): the check reads the live nodes, not a stand-in."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.timeout(180), pytest.mark.ray]


def test_a_shard_that_fits_on_no_node_is_refused_naming_it_and_the_sizes():
    import ray
    from ray.cluster_utils import Cluster

    from xmr.serve.placement import StartError, refuse_unplaceable

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "memory": 2**30,
                                                            "include_dashboard": False})
    try:
        ray.init(address=cluster.address)
        shards = [{"items": 1000, "resident_bytes": int(0.9 * 2**30)}, {"items": 1000, "resident_bytes": 10**6}]
        needs = {"Gateway": {"CPU": 0.25}, "Retriever000": {"CPU": 1.0, "memory": 1.5 * 2**30},
                 "Retriever001": {"CPU": 1.0, "memory": 0.5 * 2**30}}
        with pytest.raises(StartError) as refused:
            refuse_unplaceable(needs, shards)
        said = str(refused.value)
        assert "Retriever000 (shard 000, 1,000 items, 0.90 GiB loaded) needs 1.5 GiB of memory per replica" in said
        assert "the largest node of this cluster has 1.0 GiB of memory" in said
        assert "Retriever001" not in said and "xmr index build --shards" in said
        refuse_unplaceable({k: needs[k] for k in ("Gateway", "Retriever001")}, shards)  # these fit: no error
        with pytest.raises(StartError, match="needs 2 CPUs per replica; the largest node of this cluster has 1 CPU"):
            refuse_unplaceable({"Retriever001": {"CPU": 2.0}}, shards)
    finally:
        ray.shutdown()
        cluster.shutdown()
