"""Hub checkpoints read over HTTP, without a local copy (`convert-hf HUB_ID --remote`).

The small files (config, tokenizer, model card) are fetched into a temporary folder that is removed
afterwards; safetensors headers are read with two range requests each (the 8-byte length, then the
header). Tensor data is never stored on disk: a `RemoteSource` serves the conversion's reads from
blocks it fetches ahead of them.

- Reads are planned, not per tensor: once the conversion is planned, `schedule()` is given the source
  tensors in the order the writer will use them; ranges that follow each other in a file are coalesced
  and cut into blocks, which `connections` worker threads fetch in that order while the fetched,
  not yet used blocks stay within `window` bytes. A block is dropped as soon as the conversion has read
  it as often as the plan says (or when the reads have moved past it by more than a window); a read
  the schedule did not foresee is fetched on demand, so nothing can wait for the window forever.
- Faults: dropped connections, timeouts, HTTP 429 (honouring Retry-After) and 5xx, short or truncated
  bodies are retried with exponential backoff, continuing from the last byte received; after
  `retries` failures in a row the run stops with one line. The revision is resolved to a commit once,
  and every URL names that commit; a response whose commit, ETag or file size differs from the ones
  seen when the run began is an error (the file changed), never mixed into the output.
- Endpoint, token and revision handling are huggingface_hub's (HF_ENDPOINT, HF_TOKEN and the token
  store; `hf_hub_url`, `get_hf_file_metadata`, `HfApi.model_info`), and requests go through its HTTP
  session (`get_session`), so proxies and certificates configured for it apply here too.
"""

from __future__ import annotations

import bisect
import fnmatch
import random
import shutil
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import UserError
from .read import HUB_ID, HUB_PATTERNS, Checkpoint, Shard, _index_shards, header_length, load_config, shard_tensors

MAX_BACKOFF = 30.0  # seconds: the longest wait between two tries (Retry-After included)
MAX_BLOCK = 16 << 20  # bytes per range request at most
MIN_BLOCK = 4 << 10


@dataclass
class RemoteOptions:
    revision: str | None = None  # branch, tag or commit; resolved to a commit once, used for every request
    connections: int = 8  # range requests in flight
    retries: int = 5  # failures in a row before giving up on a request
    window: int = 256 << 20  # bytes fetched ahead of the conversion at most
    timeout: float = 30.0  # seconds without a byte before a connection counts as dropped
    backoff: float = 1.0  # seconds before the first retry; doubles with each failure
    endpoint: str | None = None  # default: huggingface_hub's (HF_ENDPOINT)
    token: str | bool | None = None  # default: huggingface_hub's (HF_TOKEN, then the token store)
    resume: bool = False  # keep the finished tensors of an interrupted run, continue from them (format/resume.py)

    @property
    def block(self) -> int:
        """Bytes per range request: a window holds two blocks per connection."""
        return max(MIN_BLOCK, min(MAX_BLOCK, self.window // (2 * max(1, self.connections))))


class Transient(Exception):
    """A failure worth retrying (connection dropped, timeout, 429, 5xx, short body); `got`: bytes stored
    before it happened."""

    def __init__(self, message: str, retry_after: float | None = None, got: int = 0):
        super().__init__(message)
        self.retry_after, self.got = retry_after, got


@dataclass
class RemoteFile:
    name: str  # path in the repository
    url: str
    size: int
    etag: str | None
    commit: str
    repo: str

    def __str__(self) -> str:
        return f"{self.repo}/{self.name}"


# -- HTTP ------------------------------------------------------------------------------------------


def _session():
    from huggingface_hub.utils import get_session
    return get_session()


def _normalise_etag(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip()
    return value[2:].strip('"') if value.startswith("W/") else value.strip('"')


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: use the backoff


@contextmanager
def _get(url: str, headers: dict, timeout: float):
    """(status, headers of the first response (before redirects), final headers, chunk iterator) of a
    GET through huggingface_hub's session: httpx-style clients (huggingface_hub >= 1) or requests."""
    session = _session()
    if hasattr(session, "stream"):
        with session.stream("GET", url, headers=headers, timeout=timeout, follow_redirects=True) as r:
            first = r.history[0].headers if r.history else r.headers
            yield r.status_code, first, r.headers, r.iter_raw()
    else:  # requests.Session (huggingface_hub < 1)
        r = session.get(url, headers=headers, timeout=timeout, stream=True, allow_redirects=True)
        try:
            first = r.history[0].headers if r.history else r.headers
            yield r.status_code, first, r.headers, r.raw.stream(1 << 16, decode_content=False)
        finally:
            r.close()


class Http:
    """Range reads of one repository's files at one commit, with retries and consistency checks."""

    def __init__(self, repo: str, commit: str, options: RemoteOptions, headers: dict,
                 progress: Callable[[int], None] | None = None):
        self.repo, self.commit, self.options = repo, commit, options
        self.headers = {**headers, "Accept-Encoding": "identity"}
        self.progress = progress
        self.failed: BaseException | None = None  # a fatal error: later requests stop at once

    def read(self, file: RemoteFile, start: int, out: memoryview) -> None:
        """Fill `out` with bytes [start, start + len(out)) of `file`, retrying transient failures and
        continuing from the last byte received."""
        done = failures = 0
        while done < len(out):
            try:
                done += self._request(file, out[done:], start + done)
            except Transient as e:
                done += e.got
                failures = 0 if e.got else failures + 1
                self._wait(file, e, failures)

    def fetch(self, file: RemoteFile, limit: int) -> bytes:
        """The whole of a small file (at most `limit` bytes)."""
        failures = 0
        while True:
            try:
                return self._request(file, None, limit)
            except Transient as e:
                failures += 1
                self._wait(file, e, failures)

    def _wait(self, file: RemoteFile, e: Transient, failures: int) -> None:
        if self.failed is not None:
            raise self.failed
        if failures > self.options.retries:
            raise UserError(f"{file}: giving up after {self.options.retries} retries ({e})",
                            hint="the hub or the network failed repeatedly; try again later, or raise --remote-retries")
        if e.retry_after is not None:
            time.sleep(min(MAX_BACKOFF, e.retry_after))
        elif failures:
            time.sleep(min(MAX_BACKOFF, self.options.backoff * 2 ** (failures - 1)) * random.uniform(0.5, 1))

    def _request(self, file: RemoteFile, out: memoryview | None, start: int):
        """One GET: a range into `out` (returns the bytes stored) or, with `out` None, the whole file
        of at most `start` bytes (returns them). Raises Transient, with the bytes stored, to retry."""
        if self.failed is not None:
            raise self.failed
        headers = dict(self.headers)
        if out is not None:
            headers["Range"] = f"bytes={start}-{start + len(out) - 1}"
        got = 0
        body = bytearray()
        try:
            with _get(file.url, headers, self.options.timeout) as (status, first, final, chunks):
                self._check_status(file, status, final, 200 if out is None else 206)
                self._check_same(file, first)
                if out is not None:
                    self._check_range(file, final.get("Content-Range"), start, start + len(out))
                for chunk in chunks:
                    n = len(chunk)
                    if out is None:
                        body += chunk
                        if len(body) > start:
                            raise UserError(f"{file}: larger than {start} bytes, too large for a config or "
                                            "tokenizer file")
                        continue
                    if got + n > len(out):
                        raise UserError(f"{file}: the server sent more bytes than the range asked for")
                    out[got:got + n] = chunk
                    got += n
                    if self.progress is not None:
                        self.progress(n)
        except UserError as e:
            self.failed = e
            raise
        except Transient as e:
            e.got = got
            raise
        except Exception as e:  # the HTTP library's connection, timeout and protocol errors
            raise Transient(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__, got=got) from None
        if out is None:
            return bytes(body)
        if got < len(out):
            raise Transient(f"short body: {got} of {len(out)} bytes", got=got)
        return got

    def _check_status(self, file: RemoteFile, status: int, headers, expected: int) -> None:
        if status in (408, 429) or 500 <= status < 600:
            raise Transient(f"HTTP {status}", _retry_after(headers))
        if status in (401, 403):
            raise UserError(f"{file}: access denied (HTTP {status})",
                            hint="gated or private models need a token: HF_TOKEN or `hf auth login`")
        if status == 404:
            raise UserError(f"{file}: not found on the hub at commit {self.commit[:12]} (HTTP 404)")
        if status == 416:
            raise UserError(f"{file} changed on the hub during the conversion (it is shorter now); nothing was "
                            "written", hint="run the conversion again")
        if status != expected:
            raise UserError(f"{file}: the hub answered HTTP {status} (expected {expected})",
                            hint="the endpoint does not serve range requests" if expected == 206 else None)

    def _check_same(self, file: RemoteFile, first) -> None:
        """The response (its first hop, before a redirect to a CDN) is the file the run began with."""
        commit = first.get("X-Repo-Commit")
        etag = _normalise_etag(first.get("X-Linked-Etag") or first.get("ETag"))
        changed = None
        if commit and commit != file.commit:
            changed = f"the repository moved to commit {commit[:12]}"
        elif etag and file.etag and etag != file.etag:
            changed = f"its ETag changed from {file.etag} to {etag}"
        if changed:
            raise UserError(f"{file} changed on the hub during the conversion ({changed}); nothing was written",
                            hint="run the conversion again (it reads one commit throughout)")

    def _check_range(self, file: RemoteFile, content_range: str | None, start: int, end: int) -> None:
        try:
            _, spec = content_range.split(" ", 1)
            span, total = spec.split("/")
            first, last = (int(x) for x in span.split("-"))
        except (AttributeError, ValueError):
            raise UserError(f"{file}: the server's Content-Range {content_range!r} cannot be read") from None
        if total != "*" and int(total) != file.size:
            raise UserError(f"{file} changed on the hub during the conversion (its size is now {total} bytes, "
                            f"was {file.size}); nothing was written", hint="run the conversion again")
        if first != start or last != end - 1:
            raise UserError(f"{file}: asked for bytes {start}-{end - 1}, the server sent {first}-{last}")


# -- read-ahead ---------------------------------------------------------------------------------

PENDING, FETCHING, READY, RELEASED = range(4)


@dataclass(eq=False)
class Block:
    index: int
    file: int
    start: int
    end: int
    expected: int  # bytes the plan will read from it (a byte read twice counts twice)
    last: int  # the last output tensor reading from it
    consumed: int = 0
    state: int = PENDING
    data: np.ndarray | None = None
    readers: int = 0  # threads copying out of `data` right now
    orphan: np.ndarray | None = None  # the buffer of a block dropped while being copied from
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def size(self) -> int:
        return self.end - self.start


class RemoteSource:
    """Where the bytes of a remote checkpoint come from: reads served from blocks fetched ahead of them."""

    def __init__(self, http: Http, files: list[RemoteFile]):
        self.http, self.files = http, files
        self.options = http.options
        self.lock = threading.Lock()
        self.blocks: list[Block] = []
        self.by_file: list[tuple[list[int], list[Block]]] = [([], []) for _ in files]
        self.next = 0  # the next block to prefetch
        self.in_flight = 0  # prefetches running
        self.live = 0  # bytes of blocks fetched or being fetched and not yet dropped
        self.peak_live = 0
        self.done_through = -1  # output tensors finished so far
        self.live_blocks: deque[Block] = deque()
        self.free: list[np.ndarray] = []  # block buffers to reuse
        self.block = http.options.block  # bytes per range request
        self.queue: deque[Block] = deque()
        self.wake = threading.Condition(self.lock)
        self.closed = False
        self.workers: list[threading.Thread] = []
        self.total = 0  # bytes scheduled
        self.direct = 0  # bytes fetched outside the schedule

    # -- planning --------------------------------------------------------------------------------
    def schedule(self, uses: list[tuple[int, int, int, int, int]]) -> None:
        """`uses`: (file, start, end, reads, last output tensor) in the order the conversion will read them."""
        # at least 8 blocks per connection, so the last round of requests (fewer than all connections) is short
        planned = sum(max(0, end - start) for _, start, end, _, _ in uses)
        block = min(self.options.block, max(MIN_BLOCK, -(-planned // (8 * max(1, self.options.connections)))))
        self.block = block
        ranges: list[list] = []  # [file, start, end, [(start, end, reads, last), ...]]
        for f, start, end, reads, last in uses:
            if end <= start:
                continue
            prev = ranges[-1] if ranges else None
            if prev is not None and prev[0] == f and prev[2] == start:
                prev[2] = end
                prev[3].append((start, end, reads, last))
            else:
                ranges.append([f, start, end, [(start, end, reads, last)]])
        for f, start, end, segments in ranges:
            k = 0  # the first segment that may overlap the block (both advance through the range)
            for lo in range(start, end, block):
                hi = min(end, lo + block)
                while segments[k][1] <= lo:
                    k += 1
                expected, last, j = 0, -1, k
                while j < len(segments) and segments[j][0] < hi:
                    s, e, reads, t = segments[j]
                    expected += (min(hi, e) - max(lo, s)) * reads
                    last = max(last, t)
                    j += 1
                self.blocks.append(Block(len(self.blocks), f, lo, hi, expected, last))
                self.total += hi - lo
        for b in sorted(self.blocks, key=lambda b: (b.file, b.start, b.index)):
            starts, blocks = self.by_file[b.file]
            starts.append(b.start)
            blocks.append(b)
        for i in range(max(1, self.options.connections)):
            t = threading.Thread(target=self._worker, name=f"gguforge-remote-{i}", daemon=True)
            t.start()
            self.workers.append(t)
        with self.lock:
            self._kick()

    def _kick(self) -> None:
        """Start prefetches (lock held): in schedule order, within the window and the connection count."""
        window = self.options.window
        while self.next < len(self.blocks) and self.in_flight < self.options.connections:
            b = self.blocks[self.next]
            if b.state != PENDING or b.last <= self.done_through:  # taken by a reader, or no longer needed
                if b.state == PENDING:
                    b.state = RELEASED
                self.next += 1
                continue
            if self.live and self.live + b.size > window:
                break
            self.next += 1
            b.state = FETCHING
            self.in_flight += 1
            self._hold(b)
            self.queue.append(b)
            self.wake.notify()

    def _hold(self, b: Block) -> None:
        self.live += b.size
        self.peak_live = max(self.peak_live, self.live)
        self.live_blocks.append(b)

    def _drop(self, b: Block) -> None:
        if b.state in (READY, FETCHING) or b.data is not None:
            self.live -= b.size
        if b.data is not None:
            if b.readers:
                b.orphan = b.data  # the last reader gives it back
            else:
                self._give(b.data)
        b.state, b.data = RELEASED, None

    def _take(self, size: int) -> np.ndarray:
        """A block buffer (lock held): reused ones keep the heap from growing with the bytes fetched
        (buffers freed by one thread and allocated by another fragment malloc's arenas)."""
        if size == self.block and self.free:
            return self.free.pop()
        return np.empty(size, np.uint8)

    def _give(self, buffer: np.ndarray) -> None:
        if buffer.size == self.block and len(self.free) < self.options.window // self.block + 2:
            self.free.append(buffer)

    def _worker(self) -> None:
        while True:
            with self.lock:
                while not self.queue and not self.closed:
                    self.wake.wait()
                if self.closed:
                    return
                b = self.queue.popleft()
            self._fetch(b)
            with self.lock:
                self.in_flight -= 1
                self._kick()

    def _fetch(self, b: Block) -> None:
        with self.lock:
            data = self._take(b.size)
        try:
            self.http.read(self.files[b.file], b.start, memoryview(data))
        except BaseException as e:  # kept for the reader (a worker thread must not die silently)
            with self.lock:
                b.error = e
                b.done.set()
            return
        with self.lock:
            if b.state == FETCHING:
                b.data, b.state = data, READY
                if b.last <= self.done_through:  # its tensors were finished meanwhile
                    self._drop(b)
            b.done.set()

    # -- reading -----------------------------------------------------------------------------------
    def _find(self, f: int, offset: int) -> Block | None:
        """The first block in schedule order holding byte `offset` of file `f` that is not dropped."""
        starts, blocks = self.by_file[f]
        i = bisect.bisect_right(starts, offset) - 1
        best = None
        while i >= 0 and starts[i] > offset - MAX_BLOCK:
            b = blocks[i]
            if b.start <= offset < b.end and b.state != RELEASED and (best is None or b.index < best.index):
                best = b
            i -= 1
        return best

    def read(self, f: int, offset: int, out: memoryview) -> None:
        """Bytes [offset, offset + len(out)) of file `f` into `out`."""
        pos = 0
        while pos < len(out):
            at = offset + pos
            with self.lock:
                b = self._find(f, at)
                mine = b is not None and b.state == PENDING
                if mine:  # not prefetched yet: fetch it here, whatever the window
                    b.state = FETCHING
                    self._hold(b)
            if b is None:  # not planned (or dropped already): read just what is asked for
                self.http.read(self.files[f], at, out[pos:])
                with self.lock:
                    self.direct += len(out) - pos
                return
            if mine:
                self._fetch(b)
            b.done.wait()
            if b.error is not None:
                raise b.error
            with self.lock:
                data = b.data
                if data is None:
                    continue  # dropped meanwhile: look again
                n = min(b.end, offset + len(out)) - at
                b.consumed += n
                b.readers += 1
                if b.consumed >= b.expected:
                    self._drop(b)
                    self._kick()
            out[pos:pos + n] = data[at - b.start:at - b.start + n]
            with self.lock:
                b.readers -= 1
                if not b.readers and b.orphan is not None:
                    self._give(b.orphan)
                    b.orphan = None
            pos += n

    def finished(self, i: int) -> None:
        """Output tensor i (and all before it) is written: blocks no later tensor reads are dropped, even
        if read less often than planned (a transform may use only part of a tensor)."""
        with self.lock:
            self.done_through = i
            kept: deque[Block] = deque()
            for b in self.live_blocks:
                if b.state == READY and b.last <= i:
                    self._drop(b)
                elif b.state != RELEASED:
                    kept.append(b)
            self.live_blocks = kept
            self._kick()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.http.failed = self.http.failed or UserError("the remote reads were closed")
            for b in self.blocks:
                if b.state != RELEASED:
                    b.data = None
            self.wake.notify_all()


class RemoteShard(Shard):
    """A safetensors file of a hub repository: header read with two range requests, data through the source."""

    local = False

    def __init__(self, file: RemoteFile, index: int, source: RemoteSource):
        self.file, self.index, self.source = file, index, source
        super().__init__(Path(str(file)))

    def header_bytes(self) -> tuple[bytes, int]:
        head = bytearray(min(8, self.file.size))
        self.source.http.read(self.file, 0, memoryview(head))
        n = header_length(self.path, bytes(head), self.file.size)
        raw = bytearray(n)
        self.source.http.read(self.file, 8, memoryview(raw))
        return bytes(raw), self.file.size

    def fileno(self) -> int:  # pragma: no cover - span() never asks a remote shard
        raise TypeError("a remote file has no descriptor")

    def read_into(self, buffer: np.ndarray, offset: int) -> None:
        self.source.read(self.index, offset, memoryview(buffer).cast("B"))


# -- opening ------------------------------------------------------------------------------------


@dataclass
class RemoteCheckpoint(Checkpoint):
    """A hub checkpoint: `root` holds its small files only; tensors are read through `source`."""

    source: RemoteSource | None = None
    repo: str = ""
    commit: str = ""


def _hub_call(what: str, options: RemoteOptions, fn):
    """A huggingface_hub call, retried like range reads; its errors as one clear line."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    failures = 0
    while True:
        try:
            return fn()
        except GatedRepoError:
            raise UserError(f"{what}: the model is gated", hint="accept its terms on the hub and set HF_TOKEN "
                            "(or `hf auth login`)") from None
        except RepositoryNotFoundError:
            raise UserError(f"{what}: no such model on the Hugging Face hub (or it is private)",
                            hint="set HF_TOKEN for private or gated models") from None
        except RevisionNotFoundError:
            raise UserError(f"{what}: no revision {options.revision!r} in this repository") from None
        except EntryNotFoundError:
            raise UserError(f"{what}: not found in the repository") from None
        except (TypeError, AttributeError, KeyError):
            raise  # a bug, not the network
        except Exception as e:  # the hub's HTTP errors, the HTTP library's connection errors, bad ids
            status = getattr(getattr(e, "response", None), "status_code", None)
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            if status is None and isinstance(e, ValueError):  # HFValidationError: not a valid repo id
                raise UserError(f"{what}: {first}") from None
            if status is not None and status not in (408, 429) and status < 500:
                raise UserError(f"{what}: HTTP {status} from the hub ({first})") from None
            failures += 1
            if failures > options.retries:
                raise UserError(f"{what}: the hub cannot be reached ({first})",
                                hint="check the network and HF_ENDPOINT, or raise --remote-retries") from None
            time.sleep(min(MAX_BACKOFF, options.backoff * 2 ** (failures - 1)))


@contextmanager
def open_remote(model: str, options: RemoteOptions) -> Iterator[RemoteCheckpoint]:
    """The checkpoint of hub repository `model`, read without a local copy; the temporary folder of its
    small files is removed, and the reads are stopped, when the block ends."""
    if not HUB_ID.match(model):
        raise UserError(f"--remote: {model!r} is not a hub model id (Org/Name)")
    from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"--remote reads {model} over the network, but HF_HUB_OFFLINE is set",
                        hint="unset HF_HUB_OFFLINE, or convert a downloaded copy without --remote")

    token = options.token
    if token is None:
        from huggingface_hub import get_token
        token = get_token()
    api = HfApi(endpoint=options.endpoint, token=token)
    where = f"{model}" + (f"@{options.revision}" if options.revision else "")
    info = _hub_call(where, options, lambda: api.model_info(model, revision=options.revision))
    commit = info.sha
    if not commit:
        raise UserError(f"{where}: the hub did not name the commit of this revision")
    listing = {s.rfilename for s in info.siblings or ()}
    http = Http(model, commit, options, build_hf_headers(token=token))

    def url(name: str) -> str:
        return hf_hub_url(model, name, revision=commit, endpoint=options.endpoint)

    temp = Path(tempfile.mkdtemp(prefix="gguforge-remote-"))
    source = None
    try:
        root = temp / model
        root.mkdir(parents=True)
        for name in sorted(listing):
            if "/" in name or name.endswith(".safetensors") or not any(fnmatch.fnmatch(name, p) for p in HUB_PATTERNS):
                continue
            data = http.fetch(RemoteFile(name, url(name), 0, None, commit, model), SMALL_FILE_LIMIT)
            (root / name).write_bytes(data)
        if "config.json" not in listing:
            raise UserError(f"{where}: no config.json in the repository",
                            hint="pass a Hugging Face model repository")
        config = load_config(root)
        shards = _index_shards(root, listing)

        def describe(path: Path) -> RemoteFile:
            name = path.relative_to(root).as_posix()
            meta = _hub_call(f"{model}/{name}", options,
                             lambda: get_hf_file_metadata(url(name), token=token, timeout=options.timeout))
            if meta.commit_hash and meta.commit_hash != commit:
                raise UserError(f"{model}/{name}: the repository moved from commit {commit[:12]} to "
                                f"{meta.commit_hash[:12]} while the run began", hint="run the conversion again")
            if meta.size is None:
                raise UserError(f"{model}/{name}: the hub did not say the size of the file")
            return RemoteFile(name, url(name), int(meta.size), _normalise_etag(meta.etag), commit, model)

        with ThreadPoolExecutor(max(1, options.connections)) as pool:  # a round trip or three per shard
            files = list(pool.map(describe, [path for path, _ in shards]))
            source = RemoteSource(http, files)
            opened = list(pool.map(lambda i: RemoteShard(files[i], i, source), range(len(files))))
        tensors = shard_tensors(zip(opened, [expected for _, expected in shards]))
        yield RemoteCheckpoint(root, config, tensors, source=source, repo=model, commit=commit)
    finally:
        if source is not None:
            source.close()
        shutil.rmtree(temp, ignore_errors=True)


SMALL_FILE_LIMIT = 256 << 20  # a config or tokenizer file larger than this is not one


# -- the conversion's read order ----------------------------------------------------------------


def read_order(checkpoint: Checkpoint, tensor_sources) -> list[tuple[int, int, int, int, int]]:
    """(file, start, end, reads, last output tensor) of the source tensors in the order a conversion uses them:
    `tensor_sources` gives, per output tensor in writing order, its source tensor names and how often
    each is read. A source used again by the next output tensor stays in one visit (fetched once)."""
    uses: list[list[int]] = []
    last: dict[str, tuple[int, list[int]]] = {}  # name -> (output index, its visit)
    for i, (names, reads) in enumerate(tensor_sources):
        for name in names:
            t = checkpoint.tensors.get(name)
            shard = getattr(t, "_shard", None)
            if not isinstance(shard, RemoteShard):
                continue
            seen = last.get(name)
            if seen is not None and seen[0] >= i - 1:
                seen[1][3] += reads
                seen[1][4] = i
                last[name] = (i, seen[1])
                continue
            visit = [shard.index, t.start, t.end, reads, i]
            uses.append(visit)
            last[name] = (i, visit)
    return [tuple(u) for u in uses]
