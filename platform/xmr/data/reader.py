"""The training/evaluation reader: manifest + plan -> webdataset pipeline -> DataLoader.

Each (rank, loader worker) builds a ``wds.DataPipeline`` from its slice of the epoch plan
(``xmr.data.plan``): shard jobs -> our opener stage (``storage.open_read``, so s3:// works
in any process without global webdataset openers) -> webdataset's tar expander and key
grouper -> decode + range filter -> seeded shuffle buffer -> batches cut to the planned
sizes -> collate. Bad samples raise ``BadSampleError`` naming shard and key, or, with
``on_bad_sample="skip"``, take their planned slot as a counted skip, so batch counts (and
so DDP step counts) never change because of bad data.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from xmr.data import storage
from xmr.data.collate import collate
from xmr.data.decode import BadSampleError, DecodeSpec, decode, load_meta, unit_count
from xmr.data.manifest import Manifest, load_manifest
from xmr.data.plan import Chunk, RankPlan, ShardJob, WorkerPlan, make_plan

log = logging.getLogger(__name__)
SHUFFLE_BUFFER = 1000


class _Skip:
    """Placeholder for a bad unit in the stream; counted into the batch's ``n_skipped``."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class ShardOpener:
    """Pipeline stage: ``{"url", "job"}`` dicts -> the same with an open ``"stream"``.

    A module-level callable (picklable), so each worker process opens its own streams with
    its own lazily created S3 client.
    """

    def __init__(self, endpoint_url: str | None = None) -> None:
        self.endpoint_url = endpoint_url

    def __call__(self, sources: Iterable[dict]) -> Iterator[dict]:
        for src in sources:
            try:
                stream = storage.open_read(src["url"], endpoint_url=self.endpoint_url)
            except (OSError, storage.StorageError) as e:
                yield dict(src, stream=None, error=f"cannot open shard: {e}")
                continue
            yield dict(src, stream=stream)


class ShardUnits:
    """Pipeline stage: opened shards -> decoded units of each job's range (or ``_Skip``s).

    Every job yields exactly ``hi - lo`` items, so the planned batch sizes always add up;
    a shard that is unreadable or shorter than the manifest says fails (``error``) or fills
    its missing units with counted skips (``skip``).
    """

    def __init__(self, spec: DecodeSpec, on_bad_sample: str) -> None:
        self.spec = spec
        self.skip = on_bad_sample == "skip"

    def _bad(self, message: str) -> _Skip:
        if not self.skip:
            raise BadSampleError(message)
        log.warning("skipping bad data: %s", message)
        return _Skip(message)

    def __call__(self, sources: Iterable[dict]) -> Iterator[Any]:
        for src in sources:
            job: ShardJob = src["job"]
            quota, emitted = job.hi - job.lo, 0
            try:
                if src.get("error"):
                    yield self._bad(f"{src['url']}: {src['error']}")
                    emitted = 1
                else:
                    units = self._units(src, job)
                    for item in units:
                        yield item
                        emitted += 1
                        if emitted == quota:
                            break
                    units.close()
            finally:
                if src.get("stream") is not None:
                    src["stream"].close()
            if emitted < quota and not self.skip:
                raise BadSampleError(f"{src['url']}: read {emitted} of the {quota} planned units")
            for _ in range(quota - emitted):
                yield _Skip(f"{src['url']}: unit lost with the shard's unreadable part")

    def _units(self, src: dict, job: ShardJob) -> Iterator[Any]:
        """Units at positions ``[job.lo, job.hi)`` of the shard, in tar order."""
        url, pos, last_key, n_samples = src["url"], 0, None, 0
        by_query = self.spec.unit == "query"
        # imported where shards are read: the model / loss / evaluation side of the library
        # (bench/gpu_check.py on a machine without webdataset) imports this module too
        from webdataset.tariterators import group_by_keys, tar_file_expander

        samples = group_by_keys(tar_members(src["stream"], url, tar_file_expander))
        try:
            for raw in samples:
                if pos >= job.hi:
                    return
                n_samples += 1
                last_key = raw.get("__key__")
                if not by_query:
                    if pos >= job.lo:  # samples before our range belong to another worker
                        try:
                            yield from decode(raw, self.spec, load_meta(raw))
                        except BadSampleError as e:
                            yield self._bad(str(e))
                    pos += 1
                    continue
                try:
                    meta = load_meta(raw)
                except BadSampleError as e:
                    # Query count unknown: take one slot now; the job's fill covers the rest.
                    yield self._bad(str(e))
                    continue
                n = unit_count(self.spec, meta)
                lo, hi = max(job.lo, pos), min(job.hi, pos + n)
                if lo < hi:
                    try:
                        yield from decode(raw, self.spec, meta)[lo - pos:hi - pos]
                    except BadSampleError as e:
                        yield self._bad(str(e))
                        yield from (_Skip(str(e)) for _ in range(hi - lo - 1))
                pos += n
        except BadSampleError:
            raise
        except Exception as e:  # tarfile / webdataset errors: the shard itself is broken
            msg = e.args[0] if e.args else repr(e)
            yield self._bad(f"{url}: unreadable tar after sample {last_key!r} ({n_samples} samples read): "
                            f"{type(e).__name__}: {msg}")
            return
        if pos < job.hi:
            yield self._bad(f"{url}: shard ended after {n_samples} samples ({pos} units, last key {last_key!r}) "
                            f"but the manifest says {job.total} units: truncated or rewritten shard")


class _Replay:
    """A stream that first gives back ``head`` (bytes already read), then the rest of ``stream``:
    how ``tar_members`` hands a tar it cannot parse itself over to ``tarfile`` mid-way."""

    def __init__(self, head: bytes, stream) -> None:
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n is None or n < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out + (self.stream.read(n - len(out)) if len(out) < n else b"")


def tar_members(stream, url: str, expander) -> Iterator[dict]:
    """webdataset's ``tar_file_expander`` over one shard (``{"fname", "data", "__url__"}`` per
    regular member, then ``{}``), with the plain ustar headers xmr's writer makes parsed here.

    Why: ``tarfile``'s stream mode costs ~0.1 ms of Python per member (three per sample), the
    largest cost of encoding a gallery (``xmr index build``) after the model itself. A header
    this does not handle as ``tarfile`` would (pax or GNU long names, base-256 sizes, a prefix
    field, a checksum that does not add up, a compressed file) hands the rest of the stream,
    that header included, to ``expander`` (webdataset's ``tar_file_expander``), so every tar
    reads as before; a member cut short raises ``tarfile.ReadError`` as ``tarfile`` does, and
    a cut header ends the shard quietly, as ``tarfile`` does too."""
    import re
    import tarfile

    from webdataset.tariterators import meta_prefix, meta_suffix

    first = True
    while True:
        head = stream.read(512)
        if first and (len(head) < 512 or head == bytes(512)):  # an empty or cut file: tarfile says which
            yield from expander([{"url": url, "stream": _Replay(head, stream)}])
            return
        if len(head) < 512 or head == bytes(512):  # end of archive (or a cut header: tarfile stops there too)
            yield {}
            return
        first = False
        kind, size_field = head[156:157], head[124:136]
        try:
            chksum = int(head[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
            size = int(size_field.split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            chksum, size = -1, -1
        if (size < 0 or kind not in (b"0", b"\0", b"7", b"5") or head[345:346] != b"\0"
                or chksum != 256 + sum(head[:148]) + sum(head[156:])):
            yield from expander([{"url": url, "stream": _Replay(head, stream)}])
            return
        data = stream.read(size + (-size % 512))
        if len(data) < size:
            raise tarfile.ReadError("unexpected end of data")
        fname = head[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if kind == b"5" or ("/" not in fname and fname.startswith(meta_prefix) and fname.endswith(meta_suffix)) \
                or re.match(r"__[^/]*__($|/)", fname):
            continue
        yield {"fname": fname, "data": data[:size], "__url__": url}


class Chunker:
    """Pipeline stage: cut the unit stream into the plan's chunks, collate the kept ones."""

    def __init__(self, chunks: list[Chunk], spec: DecodeSpec) -> None:
        self.chunks = chunks
        self.spec = spec

    def __call__(self, items: Iterable[Any]) -> Iterator[dict]:
        it = iter(items)
        last_kept = max((i for i, c in enumerate(self.chunks) if c.keep_hi > c.keep_lo), default=-1)
        for j, c in enumerate(self.chunks[:last_kept + 1]):
            buf = list(itertools.islice(it, c.size))
            if len(buf) != c.size:
                raise RuntimeError(f"unit stream ended in chunk {j} ({len(buf)} of {c.size} units): "
                                   "the shards disagree with the read plan")
            if c.keep_hi == c.keep_lo:
                continue
            rows = buf[c.keep_lo:c.keep_hi]
            good = [u for u in rows if not isinstance(u, _Skip)]
            batch = collate(good, self.spec)
            batch["n_skipped"] = len(rows) - len(good)
            yield batch


class XmrIterable(IterableDataset):
    """The per-rank dataset; builds the webdataset pipeline for the current loader worker."""

    def __init__(self, root: str, split: str, plan: RankPlan, shard_urls: list[str], spec: DecodeSpec,
                 on_bad_sample: str, endpoint_url: str | None, shuffle_buffer: int) -> None:
        super().__init__()
        self.root, self.split, self.plan, self.shard_urls = root, split, plan, shard_urls
        self.spec, self.on_bad_sample, self.endpoint_url = spec, on_bad_sample, endpoint_url
        self.shuffle_buffer = shuffle_buffer

    def worker_plan(self) -> WorkerPlan:
        info = get_worker_info()
        wid, n = (0, 1) if info is None else (info.id, info.num_workers)
        if n != len(self.plan.workers):
            raise RuntimeError(f"{self.root} {self.split}: plan made for {len(self.plan.workers)} loader "
                               f"worker(s) but the DataLoader runs {n}")
        return self.plan.workers[wid]

    def __iter__(self) -> Iterator[dict]:
        import webdataset as wds

        wp = self.worker_plan()
        stages: list[Any] = [
            lambda: iter([{"url": self.shard_urls[j.shard], "job": j} for j in wp.jobs]),
            ShardOpener(self.endpoint_url),
            ShardUnits(self.spec, self.on_bad_sample),
        ]
        if wp.shuffle_seed is not None and self.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=wp.shuffle_seed))
        stages.append(Chunker(wp.chunks, self.spec))
        return iter(wds.DataPipeline(*stages))


class Loader:
    """Iterable over one rank's batches for one epoch; ``steps`` is the same on every rank."""

    def __init__(self, root: str, split: str, manifest: Manifest, *, local_batch_size: int, rank: int,
                 world_size: int, num_workers: int, seed: int, epoch: int, shuffle: bool, mode: str, unit: str,
                 on_bad_sample: str, max_clips: int | None, max_query_tokens: int | None,
                 endpoint_url: str | None, shuffle_buffer: int, label_noise: float = 0.0) -> None:
        self.root, self.split, self.manifest = root, split, manifest
        self.label_noise = label_noise
        self.kw = dict(local_batch_size=local_batch_size, rank=rank, world_size=world_size,
                       num_workers=num_workers, seed=seed, shuffle=shuffle, mode=mode)
        self.unit, self.on_bad_sample, self.endpoint_url = unit, on_bad_sample, endpoint_url
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.spec = DecodeSpec.from_manifest(manifest, unit, max_clips, max_query_tokens)
        info = manifest.split(split)
        self.counts = [int(s.num_queries or 0) if unit == "query" else s.num_samples for s in info.shards]
        self.shard_urls = [storage.join(root, s.path) for s in info.shards]
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Re-plan for ``epoch`` (new shard order and shuffle seeds, possibly a new ``steps``)."""
        self.epoch = epoch
        self.plan = make_plan(self.counts, split=self.split, epoch=epoch, **self.kw)  # type: ignore[arg-type]

    @property
    def steps(self) -> int:
        return self.plan.steps

    @property
    def num_samples(self) -> int:
        """Units in the whole split (queries for vcmr unit='query')."""
        return self.plan.total_units

    @property
    def local_samples(self) -> int:
        """Units this rank reads this epoch."""
        return self.plan.rank_units

    def __len__(self) -> int:
        return self.plan.steps

    def __iter__(self) -> Iterator[dict]:
        ds = XmrIterable(self.root, self.split, self.plan, self.shard_urls, self.spec, self.on_bad_sample,
                         self.endpoint_url, self.shuffle_buffer)
        dl = DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                        persistent_workers=False, prefetch_factor=4 if self.num_workers else None)
        n = 0
        for batch in dl:
            n += 1
            yield corrupt_labels(batch, self.label_noise, self.manifest.labels.num_classes) if self.label_noise else batch
        if n != self.plan.steps:
            raise RuntimeError(f"{self.root} {self.split}: yielded {n} batches, plan says {self.plan.steps}")


def corrupt_labels(batch: dict, fraction: float, num_classes: list[int]) -> dict:
    """``batch`` with the labels of about ``fraction`` of its samples replaced by another
    class. Which samples and which wrong class depend on the sample's index alone (a fixed
    hash), so the same samples are wrong in every epoch and every seed: a dataset with
    corrupted labels, not label-smoothing noise."""
    import torch

    index = batch["index"].to(torch.int64)
    h = (index * 2654435761 + 97) % 4294967296  # Knuth's multiplicative hash: spread, deterministic
    wrong = (h % 100_000).to(torch.float64) < fraction * 100_000
    c = int(num_classes[0])
    shift = 1 + (h // 100_000) % max(1, c - 1)  # another class, never the true one
    label = batch["label"]
    return {**batch, "label": torch.where(wrong, (label + shift) % c, label)}


def make_loader(root: str, split: str, *, local_batch_size: int, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, seed: int = 0, epoch: int = 0, shuffle: bool = True, mode: str = "shard",
                unit: str | None = None, on_bad_sample: str = "error", max_clips: int | None = None,
                max_query_tokens: int | None = None, endpoint_url: str | None = None,
                shuffle_buffer: int = SHUFFLE_BUFFER, manifest: Manifest | None = None,
                label_noise: float = 0.0) -> Loader:
    """A loader over ``<root>`` (local or s3://) split ``split`` for one rank.

    ``unit``: category -> "pair" (default); vcmr -> "query" (default, training) or "video"
    (the gallery side of an index). ``on_bad_sample``: "error" raises BadSampleError naming
    shard and key; "skip" drops the row and counts it in ``batch["n_skipped"]``.
    """
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
    m = manifest or load_manifest(root, endpoint_url=endpoint_url)
    allowed = {"category": ("pair",), "vcmr": ("query", "video")}[m.task]
    unit = unit or allowed[0]
    if unit not in allowed:
        raise ValueError(f"{root}: unit {unit!r} does not fit task {m.task!r} (use one of {allowed})")
    return Loader(root, split, m, local_batch_size=local_batch_size, rank=rank, world_size=world_size,
                  num_workers=num_workers, seed=seed, epoch=epoch, shuffle=shuffle, mode=mode, unit=unit,
                  on_bad_sample=on_bad_sample, max_clips=max_clips, max_query_tokens=max_query_tokens,
                  endpoint_url=endpoint_url, shuffle_buffer=shuffle_buffer, label_noise=label_noise)


def loader_for(cfg, split: str, *, train: bool = False, unit: str | None = None, rank: int = 0,
               world_size: int = 1, manifest: Manifest | None = None) -> Loader:
    """The loader a run's config asks for: training (shuffled, ``data.batch_size`` split over
    the ranks, ``data.split_mode``) or evaluation (in order, ``data.eval_batch_size`` per rank,
    contiguous shares that partition the split)."""
    d = cfg.data
    return make_loader(d.path, split, local_batch_size=max(1, d.batch_size // world_size) if train else d.eval_batch_size,
                       rank=rank, world_size=world_size, num_workers=d.num_workers, seed=cfg.seed, shuffle=train,
                       mode=d.split_mode if train else "shard", unit=unit, on_bad_sample=d.on_bad_sample,
                       max_clips=d.max_clips, max_query_tokens=d.max_query_tokens, endpoint_url=d.endpoint_url,
                       manifest=manifest, label_noise=d.label_noise if train else 0.0)


def to_device(batches: Iterable[dict[str, Any]], device) -> Iterator[dict[str, Any]]:
    """Batches with their tensors moved to ``device`` (other values unchanged)."""
    for batch in batches:
        yield {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
