"""Evaluation metrics, pure numpy/torch (no Ray).

- ``retrieval``: mAP@all / mAP@k, precision@k, pair Recall@K and ranks (pessimistic ties).
- ``vcmr``: temporal IoU, clip <-> seconds, batched VCMR decoding, VR/SVMR/VCMR recalls.
- ``tvr``: the public TVR prediction/metrics file layout and its exact evaluation.
- ``cli``: the ``xmr metrics`` subcommands.

Submodules are imported explicitly (``from xmr.metrics.retrieval import ...``) so that
importing the package does not pull in torch.
"""
