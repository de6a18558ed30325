"""Dataset sources: everything that produces xmr shards from something else.

- ``synth_category`` / ``synth_vcmr``: seeded synthetic data with a planted ground truth;
- ``tvr``: the public TVR release layout (jsonl + HDF5 features) -> vcmr shards;
- ``features``: paired feature matrices (.npz / .mat / .h5) -> category shards;
- ``avdigits`` (+ ``audio``): sklearn digit images paired with espeak-ng spoken digits;
- ``cli``: the ``xmr data synth|convert|avdigits`` subcommands.

Import the submodules directly; nothing is imported here so ``xmr --help`` stays fast.
"""
