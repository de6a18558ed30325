"""Dataset sources: everything that produces xmr shards from something else.

- ``synth_category`` / ``synth_vcmr``: seeded synthetic data with a planted ground truth;
- ``tvr``: the public TVR release layout (jsonl + HDF5 features) -> vcmr shards;
- ``features``: paired feature matrices (.npz / .mat / .h5) -> category shards;
- ``avdigits`` (+ ``audio``): sklearn digit images paired with espeak-ng spoken digits;
- ``digits_views``: sklearn's real digit images cut into two views (a same-modality proxy);
- ``cli``: the ``xmr data synth|convert|avdigits|digits-views`` subcommands.

Import the submodules directly; nothing is imported here so ``xmr --help`` stays fast.
"""
