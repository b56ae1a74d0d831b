"""Teacher output cache: what a frozen teacher gives each example, computed once and reused.

A trial's losses read a few teacher features per example: the logits and, for the mapped layers, hidden
states, Q/K/V projections and attention-sub-layer outputs. The teacher is frozen and (outside mixup) sees
the same token ids every epoch and in every trial of a sweep, so those features are computed once, written
to disk, and later batches read them back instead of running the teacher.

Key: sha256 of (teacher checkpoint identity, token content of the example set, max sequence length, compute
precision, storage dtype, cache format). One entry per key, a folder under
`<KDP_CACHE_DIR>/teacher_outputs/<key>/`:

    meta.json         what the key was made of (for people; the key is the folder name)
    offsets.npy       (N + 1,) int64 token offsets: example i owns rows offsets[i]:offsets[i+1]
    logits.npy        (N, C)              one row per example
    hidden.6.npy      (total_tokens, H)   one row per valid token, unpadded; likewise q.L, k.L, v.L, attn_out.L
    last_used         touched on every open: least-recently-used entries are evicted first

A feature file appears atomically (written aside as a memory-mapped `.partial`, renamed when every example
is filled), so readers see a whole file or none. Unreadable, truncated or mis-shaped files are ignored and
rebuilt. The folder is bounded by `max_bytes`: whole entries are evicted, least recently used first; an entry
that alone would exceed the bound is not written (the run just recomputes). With `root=None` the same object
keeps its arrays in memory only (the eval sets of a run without the disk cache).

>>> cache = TeacherCache.open(examples, features=["logits", "hidden.6"], num_heads=12,      # doctest: +SKIP
...                           identity=teacher_identity(folder), precision="fp32")
>>> t = cache.fetch(batch, lambda: forward_features(teacher, batch, ...))                # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdplatform import paths
from kdplatform.distill.losses import Features

log = logging.getLogger(__name__)

SOURCES = ("auto", "timed", "read", "recompute")  # how a complete cache gives features back: TeacherCache.fetch
TIMED_READS = 4  # batches timed, after one warm-up, before a complete cache picks read or recompute
DEVICE_SHARE = 0.25  # a complete cache moves to the GPU when it needs at most this share of its free memory
CACHE_FORMAT = 1  # bump when the layout or the meaning of a feature changes
STALE_PARTIAL_S = 6 * 3600  # a .partial this old belongs to a dead writer on another host
_STORAGE = {"float32": (np.float32, torch.float32), "float16": (np.float16, torch.float16),
            "bfloat16": (np.int16, torch.bfloat16)}  # numpy has no bfloat16: its bits are kept as int16
_TORCH_BITS = {np.float32: torch.float32, np.float16: torch.float16, np.int16: torch.int16}
_TOKEN_KEYS = ("input_ids", "token_type_ids", "attention_mask")


def default_root() -> Path:
    return paths.teacher_outputs_root()


def teacher_identity(folder: str | os.PathLike | None) -> str | None:
    """What identifies a teacher checkpoint: its `kdp_teacher.json` (teacher hash + the run that trained it),
    else the size and mtime of its weight files and its config. None when `folder` is not a model folder."""
    if folder is None:
        return None
    folder = Path(folder)
    if not folder.is_dir():
        return None
    ident: dict[str, Any] = {"folder": str(folder.resolve())}
    marker = folder / "kdp_teacher.json"
    if marker.is_file():
        try:
            info = json.loads(marker.read_text())
            ident = {"teacher_hash": info.get("teacher_hash"), "run_id": info.get("run_id")}
        except ValueError:
            pass
    if "teacher_hash" not in ident:
        weights = [f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file()]
        if not weights:
            return None
        ident["weights"] = [(f, (folder / f).stat().st_size, (folder / f).stat().st_mtime_ns) for f in weights]
        cfg = folder / "config.json"
        ident["config"] = cfg.read_text() if cfg.is_file() else ""
    return _sha(ident)


def examples_digest(examples: Sequence[dict]) -> str:
    """Content hash of a tokenized example set, in order (labels excluded: they do not reach the teacher)."""
    h = hashlib.sha256()
    lengths = np.fromiter((len(e["input_ids"]) for e in examples), dtype=np.int64, count=len(examples))
    h.update(lengths.tobytes())
    for key in _TOKEN_KEYS:
        if examples and key in examples[0]:
            flat = np.fromiter((t for e in examples for t in e[key]), dtype=np.int64, count=int(lengths.sum()))
            h.update(key.encode())
            h.update(flat.tobytes())
    return h.hexdigest()


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def extract(name: str, feats: Features) -> Tensor:
    """One named feature ('logits', 'hidden.6', 'q.3', ...) of a forward pass."""
    if name == "logits":
        return feats.logits
    kind, layer = name.split(".")
    if kind == "hidden":
        return feats.hidden[int(layer)]
    return getattr(feats, kind)[int(layer)]


# --------------------------------------------------------------------------------------------- eviction
def _entry_bytes(entry: Path) -> int:
    total = 0
    for f in entry.iterdir():
        try:
            total += f.stat().st_size
        except OSError:
            pass
    return total


def _last_used(entry: Path) -> float:
    try:
        return (entry / "last_used").stat().st_mtime
    except OSError:
        try:
            return entry.stat().st_mtime
        except OSError:
            return 0.0


def cache_size(root: str | os.PathLike) -> int:
    """Bytes on disk under a cache root."""
    root = Path(root)
    if not root.is_dir():
        return 0
    return sum(_entry_bytes(e) for e in root.iterdir() if e.is_dir())


def evict(root: str | os.PathLike, max_bytes: int, keep: str | None = None) -> list[str]:
    """Remove whole entries, least recently used first, until the root holds at most `max_bytes`
    (never the entry named `keep`). Returns the removed keys."""
    root = Path(root)
    if not root.is_dir():
        return []
    entries = [(e, _entry_bytes(e), _last_used(e)) for e in root.iterdir() if e.is_dir()]
    total = sum(size for _, size, _ in entries)
    removed = []
    for entry, size, _ in sorted(entries, key=lambda x: x[2]):
        if total <= max_bytes:
            break
        if entry.name == keep:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        total -= size
        removed.append(entry.name)
    if removed:
        log.info("teacher cache: evicted %d entr%s to stay under %.2f GB", len(removed),
                 "y" if len(removed) == 1 else "ies", max_bytes / 1e9)
    return removed


# ------------------------------------------------------------------------------------------------ cache
class TeacherCache:
    """The teacher features of one example set, by example index (`batch["idx"]`).

    `fetch(batch, forward)` gives the batch's Features padded to its width, read back or computed by
    `forward` and stored; underneath, `lookup(batch)` reads (None when an example is missing) and
    `store(batch, feats)` records a fresh forward. Counters: `hits` and `misses` (examples), `bytes` (on
    disk, or in memory without a root); once timed, `source`, `read_s` and `forward_s`.
    """

    def __init__(self, *, lengths: np.ndarray, features: Sequence[str], num_heads: int, key: str,
                 root: Path | None, dtype: str = "float32", max_bytes: int | None = None,
                 meta: dict | None = None, source: str = "auto"):
        if dtype not in _STORAGE:
            raise ValueError(f"teacher cache dtype must be one of {sorted(_STORAGE)}, got {dtype!r}")
        if source not in SOURCES:
            raise ValueError(f"teacher cache source must be one of {SOURCES}, got {source!r}")
        self.key = key
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.n = len(self.lengths)
        self.features = tuple(sorted(set(features)))
        self.num_heads = num_heads
        self.np_dtype, self.torch_dtype = _STORAGE[dtype]
        self.max_bytes = max_bytes
        self.dir = Path(root) / key if root is not None else None
        self.ready: dict[str, np.ndarray] = {}  # complete: read-only memmaps (or RAM arrays)
        self.filling: dict[str, np.ndarray] = {}  # being written this epoch
        self._partials: dict[str, Path] = {}
        self.skipped: set[str] = set()  # features too big for the bound: never cached
        self.filled = np.zeros(self.n, dtype=bool)
        self.hits = self.misses = 0
        self.resident: dict[str, Tensor] = {}  # the ready features in GPU memory, when they fit
        self.placement_decided = False
        self.timings: list[tuple[float, float]] = []  # (read, forward) seconds of the timed batches
        # "read" or "recompute": fixed by the caller, or chosen by timing once complete (None until then)
        self.source = None if source in ("auto", "timed") else source
        self.always_timed = source == "timed"  # auto reads without timing on a CPU
        self.read_s = self.forward_s = math.nan
        if self.dir is not None:
            try:
                self._open(meta or {})
            except OSError as e:  # a read-only or full disk must not stop training
                log.warning("teacher cache %s unusable (%s); keeping it in memory", self.dir, e)
                self.dir = None

    # ---------------------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, examples: Sequence[dict], *, features: Sequence[str], num_heads: int, identity: str | None,
             precision: str, max_seq_length: int, dtype: str = "float32", root: str | os.PathLike | None = None,
             max_bytes: int | None = None, persistent: bool = True, source: str = "auto") -> TeacherCache:
        """The cache entry of `examples` for a teacher (`identity`: see `teacher_identity`). Without an
        identity, or with `persistent=False`, the cache lives in memory for this object only."""
        lengths = np.fromiter((len(e["input_ids"]) for e in examples), dtype=np.int64, count=len(examples))
        meta = {"format": CACHE_FORMAT, "teacher": identity, "examples": examples_digest(examples),
                "n": len(examples), "max_seq_length": int(max_seq_length), "precision": precision, "dtype": dtype}
        key = _sha(meta)[:32]
        use_disk = persistent and identity is not None and source != "recompute"  # recompute never reads it
        where = (Path(root) if root is not None else default_root()) if use_disk else None
        return cls(lengths=lengths, features=features, num_heads=num_heads, key=key, root=where, dtype=dtype,
                   max_bytes=max_bytes, meta=meta, source=source)

    def _open(self, meta: dict) -> None:
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        if not self._valid_offsets():
            self._reset(meta)
        self._remove_stale_partials()
        for name in self.features:
            arr = self._load(name)
            if arr is not None:
                self.ready[name] = arr
        (d / "last_used").touch()

    def _valid_offsets(self) -> bool:
        try:
            offsets = np.load(self.dir / "offsets.npy", allow_pickle=False)
            return offsets.dtype == np.int64 and np.array_equal(offsets, self.offsets)
        except (OSError, ValueError, EOFError):
            return False

    def _reset(self, meta: dict) -> None:
        """A new entry, or one whose offsets are missing or wrong: start it over."""
        for f in self.dir.iterdir():
            if not f.name.endswith(".partial"):
                f.unlink(missing_ok=True)
        self._write_atomic("offsets.npy", lambda fh: np.save(fh, self.offsets))
        self._write_atomic("meta.json", lambda fh: fh.write(json.dumps({**meta, "created": time.time()},
                                                                         indent=1).encode()))

    def _write_atomic(self, name: str, write) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
            os.replace(tmp, self.dir / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _remove_stale_partials(self) -> None:
        host = socket.gethostname()
        for f in self.dir.glob(".*.partial"):
            parts = f.name.split(".")  # .<feature...>.<host>.<pid>.partial
            try:
                pid, same_host = int(parts[-2]), parts[-3] == host
            except (ValueError, IndexError):
                pid, same_host = -1, False
            try:
                old = time.time() - f.stat().st_mtime > STALE_PARTIAL_S
            except OSError:
                continue
            if old or (same_host and not _alive(pid)):
                f.unlink(missing_ok=True)

    def _expected_rows(self, name: str) -> int:
        return self.n if name == "logits" else int(self.offsets[-1])

    def _load(self, name: str) -> np.ndarray | None:
        path = self.dir / f"{name}.npy"
        if not path.is_file():
            return None
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            if arr.dtype != self.np_dtype or arr.ndim != 2 or arr.shape[0] != self._expected_rows(name):
                raise ValueError(f"shape {arr.shape} dtype {arr.dtype}")
            return arr
        except (OSError, ValueError, EOFError) as e:
            log.warning("teacher cache: ignoring unreadable %s (%s); it will be rebuilt", path, e)
            path.unlink(missing_ok=True)
            return None

    # ------------------------------------------------------------------------------------- reading
    def _available(self, name: str, idx: np.ndarray) -> np.ndarray | None:
        if name in self.ready:
            return self.ready[name]
        if name in self.filling and self.filled[idx].all():
            return self.filling[name]
        return None

    @property
    def complete(self) -> bool:
        """Every feature is cached for every example (a skipped feature never is)."""
        return not self.skipped and len(self.ready) == len(self.features)

    def fetch(self, batch: dict[str, Tensor], forward: Callable[[], Features]) -> Features:
        """The batch's teacher features: read back when cached, else `forward()` (then stored).

        Once complete, a cache with `source="timed"` (`"auto"` on a GPU; on a CPU auto means read) times a
        few reads against the forward they replace and keeps whichever is faster for the rest of its life
        (`source` becomes "read" or "recompute"): on a GPU a teacher forward takes milliseconds, and reading
        many per-token features from host memory can take longer. A recomputed batch is given back as a
        read would give it (storage dtype, zero at padding), so the choice changes speed, not results: values
        differ only by the float rounding of a forward over another batch's padding, as they do between a run
        with the cache and one without."""
        if self.source == "recompute":
            self.misses += len(batch["idx"])
            return self._as_read_back(forward(), batch["attention_mask"])
        device = batch["attention_mask"].device
        if self.complete:
            self._place(device)  # a cache found complete at open (once; nothing on a CPU)
            if self.source is None and device.type == "cpu" and not self.always_timed:
                self.source = "read"  # on a CPU a read measured 35-200x faster than the forward it replaces
            elif self.source is None:
                return self._timed(batch, forward)
        hit = self.lookup(batch)
        if hit is not None:
            return hit
        out = self.store(batch, forward())
        if self.complete:
            self._place(device)  # in the batch that completed it, not in the first timed read
        return out

    def _timed(self, batch: dict[str, Tensor], forward: Callable[[], Features]) -> Features:
        sync = _synchronizer(batch["attention_mask"].device)
        t0 = time.perf_counter()
        hit = self.lookup(batch)
        sync()
        t1 = time.perf_counter()
        self._as_read_back(forward(), batch["attention_mask"])
        sync()
        self.timings.append((t1 - t0, time.perf_counter() - t1))
        if len(self.timings) > TIMED_READS:  # the first pair warms up (page cache, kernels) and is dropped
            self.read_s, self.forward_s = np.median(np.array(self.timings[1:]), axis=0).tolist()
            self.source = "recompute" if self.read_s > self.forward_s else "read"
            log.info("teacher cache %s: read %.2f ms vs forward %.2f ms a batch -> %s", self.key[:8],
                     1e3 * self.read_s, 1e3 * self.forward_s, self.source)
        return hit

    def _place(self, device: torch.device) -> None:
        """On a GPU, the complete cache moves into its memory when it fits (reads are then a gather there),
        decided once. On a CPU reads gather from the host arrays: there numpy's gather beat torch's (measured)."""
        if device.type == "cuda" and not self.placement_decided:
            self.placement_decided = True
            self.place(device, free_bytes=torch.cuda.mem_get_info(device)[0])

    def place(self, device: torch.device, free_bytes: int) -> bool:
        """Copy the complete cache onto `device` once, when it takes at most a quarter of `free_bytes` (trials
        packed on one GPU each take their share); later reads gather there. Returns whether it moved."""
        if self.resident:
            return True
        need = sum(a.nbytes for a in self.ready.values())
        if not self.complete or need > free_bytes * DEVICE_SHARE:
            log.info("teacher cache %s: %.2f GB stays on the host (a quarter of the device's free memory is "
                     "%.2f GB)", self.key[:8], need / 1e9, free_bytes * DEVICE_SHARE / 1e9)
            return False
        for name, arr in self.ready.items():
            self.resident[name] = _as_tensor(np.array(arr), self.torch_dtype).to(device)  # a writable copy
        return True

    def lookup(self, batch: dict[str, Tensor]) -> Features | None:
        """The batch's teacher Features from the cache, or None when an example is missing."""
        idx = batch["idx"].numpy()
        arrays = {}
        for name in self.features:
            arr = self._available(name, idx)
            if arr is None:
                return None
            arrays[name] = arr
        mask = batch["attention_mask"]
        device = mask.device
        rows, valid = self._token_rows(idx, mask.shape[1])
        if self.resident:
            out = self._gather_on_device(idx, rows, mask)
        else:
            out = {name: _to_device(self._gather_on_host(arr, name, idx, rows, valid, device), device)
                   for name, arr in arrays.items()}
        self.hits += len(idx)
        return self._features(out, mask)

    def _token_rows(self, idx: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, width) row of each batch token in the per-token arrays (0 at padding) and which are tokens."""
        pos = np.arange(width)
        valid = pos[None, :] < self.lengths[idx][:, None]
        return np.where(valid, self.offsets[idx][:, None] + pos[None, :], 0), valid

    def _gather_on_host(self, arr: np.ndarray, name: str, idx: np.ndarray, rows: np.ndarray,
                        valid: np.ndarray, device: torch.device) -> Tensor:
        """One gather per feature into a fresh buffer; pinned when a GPU receives it, so the copy is
        asynchronous (torch's host allocator keeps the buffer until the copy is done)."""
        take = idx if name == "logits" else rows
        buf = torch.empty((*take.shape, arr.shape[1]), dtype=_TORCH_BITS[self.np_dtype],
                          pin_memory=device.type == "cuda")
        out = buf.numpy()
        np.take(arr, take, axis=0, out=out, mode="clip")  # mode clip: unbuffered (rows are in range)
        if name != "logits":
            out[~valid] = 0
        return buf.view(self.torch_dtype) if self.torch_dtype == torch.bfloat16 else buf

    def _gather_on_device(self, idx: np.ndarray, rows: np.ndarray, mask: Tensor) -> dict[str, Tensor]:
        device = mask.device
        rows_d = torch.from_numpy(rows).to(device, non_blocking=True)
        idx_d = torch.from_numpy(idx).to(device, non_blocking=True)
        valid = mask.bool()[..., None]
        out = {}
        for name, t in self.resident.items():
            if name == "logits":
                out[name] = t[idx_d]
            else:
                out[name] = torch.where(valid, t[rows_d], torch.zeros((), dtype=t.dtype, device=device))
        return out

    def _features(self, out: dict[str, Tensor], mask: Tensor) -> Features:
        feats = Features(logits=out["logits"], attention_mask=mask, num_heads=self.num_heads)
        hidden = {int(n.split(".")[1]): t for n, t in out.items() if n.startswith("hidden.")}
        if hidden:
            feats.hidden = tuple(hidden.get(i) for i in range(max(hidden) + 1))
        for n, t in out.items():
            kind, _, layer = n.partition(".")
            if kind in ("q", "k", "v", "attn_out"):
                getattr(feats, kind)[int(layer)] = t
        return feats

    # ------------------------------------------------------------------------------------- writing
    def store(self, batch: dict[str, Tensor], feats: Features) -> Features:
        """Record a fresh teacher forward for the batch's examples. Returns the features as a later `lookup`
        gives them back (storage dtype, zero at padding), so the trial that fills the cache computes exactly
        what a trial reading it computes: a result must not depend on which trial of a sweep ran first."""
        idx = batch["idx"].numpy()
        self.misses += len(idx)
        todo = [n for n in self.features if n not in self.ready and n not in self.skipped]
        if not todo:
            return self._as_read_back(feats, batch["attention_mask"])
        lens = self.lengths[idx]
        dest = None
        for name in todo:
            t = extract(name, feats).detach()
            arr = self.filling.get(name)
            if arr is None:
                arr = self._allocate(name, t.shape[-1])
                if arr is None:
                    continue
            t = t.to("cpu", self.torch_dtype)
            if self.torch_dtype == torch.float16 and not bool(torch.isfinite(t).all()):
                self._skip(name, "overflows float16 (|x| > 65504); use speed.teacher_cache.dtype: bfloat16")
                continue
            if self.torch_dtype == torch.bfloat16:
                t = t.view(torch.int16)
            src = t.numpy()
            if name == "logits":
                arr[idx] = src
            else:
                if dest is None:
                    dest = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx])
                valid = np.arange(src.shape[1])[None, :] < lens[:, None]
                arr[dest] = src[valid]
        self.filled[idx] = True
        if self.filling and self.filled.all():
            self._commit()
        return self._as_read_back(feats, batch["attention_mask"])

    def _as_read_back(self, feats: Features, mask: Tensor) -> Features:
        """The features `lookup` would give back: each kept one in the storage dtype and zero at padding (a
        feature never cached is passed through as computed: every trial runs the teacher for it)."""
        valid = mask.bool()[..., None]
        out: dict[str, Tensor] = {}
        for name in self.features:
            t = extract(name, feats).detach()
            if name not in self.skipped:
                t = t.to(self.torch_dtype)
                if name != "logits":
                    t = torch.where(valid, t, torch.zeros((), dtype=t.dtype, device=t.device))
            out[name] = t
        return self._features(out, mask)

    def _skip(self, name: str, why: str) -> None:
        """Never cache this feature in this run (batches that need it run the teacher)."""
        log.warning("teacher cache: not caching %s: %s", name, why)
        self.skipped.add(name)
        self.filling.pop(name, None)
        path = self._partials.pop(name, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def _allocate(self, name: str, width: int) -> np.ndarray | None:
        rows = self._expected_rows(name)
        shape = (rows, width)
        need = rows * width * np.dtype(self.np_dtype).itemsize
        if self.dir is None:
            arr = np.zeros(shape, dtype=self.np_dtype)
            self.filling[name] = arr
            return arr
        if self.max_bytes is not None:
            mine = _entry_bytes(self.dir) + need  # this entry's files so far (partials included) + this one
            if mine > self.max_bytes:
                self._skip(name, f"{need / 1e6:.1f} MB would put one entry over the {self.max_bytes / 1e9:.2f} GB "
                                 "bound (raise speed.teacher_cache.max_gb)")
                return None
            evict(self.dir.parent, self.max_bytes - need, keep=self.key)
        path = self.dir / f".{name}.{socket.gethostname()}.{os.getpid()}.partial"
        try:
            arr = np.lib.format.open_memmap(path, mode="w+", dtype=self.np_dtype, shape=shape)
        except OSError as e:
            log.warning("teacher cache: cannot write %s (%s); keeping %s in memory", path, e, name)
            arr = np.zeros(shape, dtype=self.np_dtype)
            path = None
        self.filling[name] = arr
        if path is not None:
            self._partials[name] = path
        return arr

    def _commit(self) -> None:
        """Every example is filled: publish the features (atomic rename) and read them back mapped."""
        for name, arr in list(self.filling.items()):
            path = self._partials.pop(name, None)
            if path is not None:
                try:
                    arr.flush()
                    del arr
                    final = self.dir / f"{name}.npy"
                    os.replace(path, final)
                    self.ready[name] = np.load(final, mmap_mode="r", allow_pickle=False)
                    (self.dir / "last_used").touch()
                except OSError as e:  # evicted meanwhile by another process: keep it for this run only
                    log.warning("teacher cache: could not publish %s (%s)", name, e)
                    self.ready[name] = self.filling[name]
            else:
                self.ready[name] = arr
        self.filling.clear()
        if self.dir is not None and self.max_bytes is not None:
            evict(self.dir.parent, self.max_bytes, keep=self.key)

    @property
    def bytes(self) -> int:
        return sum(a.nbytes for a in self.ready.values()) + sum(a.nbytes for a in self.filling.values())

    def close(self) -> None:
        """Drop an unfinished fill (a stage that ended before seeing every example) and its files, and free
        the GPU copy for the next stage or trial."""
        self.resident.clear()
        for name, path in self._partials.items():
            self.filling.pop(name, None)
            path.unlink(missing_ok=True)
        self._partials.clear()
        self.filling.clear()


def _as_tensor(arr: np.ndarray, dtype: torch.dtype) -> Tensor:
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def _synchronizer(device: torch.device) -> Callable[[], None]:
    """Wait for the device's queued work (timings on a GPU would otherwise measure only the launches)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
