"""Resumable outputs (convert-hf --remote --resume): the finished tensors of an interrupted run are kept.

Without resuming, an output is written to a random hidden temp file that is removed whatever ends the
run (format/atomic.py). With it, each output file is written to a fixed hidden name beside it,
`.NAME.resume.part`, and a journal `.NAME.resume.json` beside the first output records

- on its first line, a fingerprint of everything that decides the output bytes (given by the caller:
  source commit, ETags, sizes, options, gguforge version; added here: the SHA-256 of each file's GGUF
  header, which holds the metadata, tensor names, types, shapes and the split plan);
- then one line per finished output tensor, in writing order: its SHA-256 in every output.

The journal only *claims*; a later run re-reads the kept bytes (locally, no network), checks each tensor
against its hash in writing order, truncates after the last tensor that matches and continues from
there. So nothing about durability needs to be trusted (no fsync per tensor): bytes a crash lost, or a
part file changed by hand, simply fail their hash and are written again. A journal whose fingerprint
differs (the hub's files changed, other options) is refused with one line unless `restart` (--force),
which discards it. The final move into place is the all-or-nothing commit of format/atomic.py; the
journal is removed after it. On any failure or signal the part files and journal stay for the next run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import UserError
from ..signals import termination_as_exception
from .atomic import commit, expect, temp_prefix, unlink_quietly
from .writer import OutputFiles, _pad, _umask, encode_header, synced

PART_SUFFIX = "resume.part"
JOURNAL_SUFFIX = "resume.json"
PIECE = 16 << 20

# fingerprint keys -> why a journal whose key differs cannot be resumed from (the one-line refusal)
CHANGED = {"repo": "it was written for another repository",
           "commit": "the repository has moved to another commit since",
           "files": "the source files have changed on the hub since (other ETags or sizes)",
           "options": "it was written with other conversion options",
           "imatrix": "it was written with another importance matrix",
           "gguforge": "it was written by another gguforge version",
           "headers": "it was written for another output (metadata, tensors, types or split plan)",
           "targets": "it was written for other output files"}


def part_path(target: Path) -> Path:
    return target.parent / (temp_prefix(target) + PART_SUFFIX)


def journal_path(target: Path) -> Path:
    return target.parent / (temp_prefix(target) + JOURNAL_SUFFIX)


def _sha256(fd: int, start: int, end: int) -> str | None:
    """SHA-256 of bytes [start, end) of the file; None when the file is shorter."""
    h = hashlib.sha256()
    pos = start
    while pos < end:
        piece = os.pread(fd, min(PIECE, end - pos), pos)
        if not piece:
            return None
        h.update(piece)
        pos += len(piece)
    return h.hexdigest()


class Resume:
    """The kept state of one run's outputs; `first`: the tensors before it are kept and verified."""

    def __init__(self, outputs: list[OutputFiles], fingerprint: dict, restart: bool = False, say=None):
        self.outputs = outputs
        self.targets = [Path(t) for o in outputs for t in o.targets]
        self.parts = [part_path(t) for t in self.targets]
        self.journal = journal_path(self.targets[0])
        self.headers = [encode_header(md, o.tensors[a:b]) for o in outputs for md, (a, b) in zip(o.metadatas, o.groups)]
        self.fingerprint = {**fingerprint, "headers": [hashlib.sha256(h).hexdigest() for h in self.headers],
                            "targets": [t.name for t in self.targets]}
        self.say = say or (lambda line: sys.stderr.write(line + "\n"))
        # per output tensor i: per output, (file index, start, end with padding)
        self.places: list[list[tuple[int, int, int]]] = [[] for _ in outputs[0].tensors]
        at = 0
        for o in outputs:
            for k, (a, b) in enumerate(o.groups):
                offset = len(self.headers[at + k])
                for i in range(a, b):
                    end = offset + o.tensors[i].nbytes + _pad(o.tensors[i].nbytes)
                    self.places[i].append((at + k, offset, end))
                    offset = end
            at += len(o.targets)
        self.fds: list[int] = []
        self.first = 0
        self.log = None
        self._open(restart)

    # -- opening: lock, check the journal, verify the kept tensors ----------------------------------
    def _open(self, restart: bool) -> None:
        created = []  # removed again if this run is refused before writing
        try:
            for part, target in zip(self.parts, self.targets):
                flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
                try:
                    fd = os.open(part, flags | os.O_CREAT | os.O_EXCL, 0o666 & ~_umask())
                    created.append(part)
                except FileExistsError:
                    fd = os.open(part, flags)
                self.fds.append(fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    raise UserError(f"another run is writing {target} (its resume file {part} is locked)") from None
            claims = self._read_journal(restart)
            self.first = self._verify(claims)
            self._truncate()
            self._write_journal()
        except BaseException as e:
            self.close()
            for part in created:
                unlink_quietly(part)
            if isinstance(e, OSError):
                raise UserError(f"cannot resume {e.filename or self.targets[0]}: {e.strerror}") from None
            raise

    def _read_journal(self, restart: bool) -> list[list[str]]:
        try:
            lines = self.journal.read_text().splitlines()
        except FileNotFoundError:
            return []
        try:
            kept = json.loads(lines[0]) if lines else None
        except ValueError:
            kept = None
        if kept != self.fingerprint:
            if restart:
                self.say(f"resume: discarding {self.journal.name} ({self._why(kept)}); starting over (--force)")
                return []
            raise UserError(f"cannot resume from {self.journal}: {self._why(kept)}",
                            hint="run the same command as before, or pass --force to discard it and start over")
        claims = []
        for line in lines[1:]:
            try:
                claims.append(json.loads(line)["sha256"])
            except (ValueError, KeyError, TypeError):  # a line cut short by a crash ends the claims
                break
        return claims

    def _why(self, kept) -> str:
        if not isinstance(kept, dict):
            return "it cannot be read"
        differ = [key for key in CHANGED if kept.get(key) != self.fingerprint.get(key)]
        return CHANGED[differ[0]] if differ else "it was written by another run"

    def _verify(self, claims: list[list[str]]) -> int:
        """The number of leading tensors whose kept bytes (and their files' headers) match the journal."""
        good_header: dict[int, bool] = {}
        kept = 0
        self.kept_hashes = []
        for i, hashes in enumerate(claims[:len(self.places)]):
            places = self.places[i]
            if not isinstance(hashes, list) or len(hashes) != len(places):
                break
            ok = True
            for (f, start, end), h in zip(places, hashes):
                if f not in good_header:
                    header = self.headers[f]
                    good_header[f] = os.pread(self.fds[f], len(header), 0) == header
                if not good_header[f] or _sha256(self.fds[f], start, end) != h:
                    ok = False
                    break
            if not ok:
                self.say(f"resume: {self.outputs[0].tensors[i].name} does not match its hash in {self.journal.name}; "
                         f"writing it and the tensors after it again")
                break
            kept = i + 1
        self.kept_hashes = claims[:kept]
        if kept:
            size = sum(end - start for places in self.places[:kept] for _, start, end in places)
            self.say(f"resume: kept {kept} of {len(self.places)} tensors ({size / 1e6:.1f} MB, verified by SHA-256)")
        return kept

    def _truncate(self) -> None:
        """Every file cut after its kept tensors (or to its header alone), positioned for writing."""
        ends = [len(h) for h in self.headers]
        for places in self.places[:self.first]:
            for f, _, end in places:
                ends[f] = end
        self.ends = ends
        for fd, header, end in zip(self.fds, self.headers, ends):
            os.ftruncate(fd, end)
            if end == len(header):
                os.pwrite(fd, header, 0)

    def _write_journal(self) -> None:
        """The journal rewritten for the kept tensors (their hashes checked just now), kept open for appending."""
        temp = self.journal.with_name(self.journal.name + ".new")
        with open(temp, "w") as f:
            f.write(json.dumps(self.fingerprint) + "\n")
            for hashes in self.kept_hashes:
                f.write(json.dumps({"sha256": hashes}) + "\n")
        os.replace(temp, self.journal)
        self.log = open(self.journal, "a")

    # -- writing ------------------------------------------------------------------------------------
    @contextmanager
    def files(self) -> Iterator[list[Any]]:
        """The part files, positioned after their kept bytes; moved onto the targets when all are
        complete, kept with the journal when anything ends the run early."""
        files: list[Any] = []
        with termination_as_exception():
            try:
                expected = [expect(t) for t in self.targets]
                for fd, end in zip(self.fds, self.ends):
                    f = os.fdopen(os.dup(fd), "r+b", buffering=8 << 20)
                    f.seek(end)
                    files.append(f)
                self.files_open = files
                with synced(files, self.targets[0]):
                    yield files
                try:
                    commit([str(p) for p in self.parts], self.targets, expected)
                except OSError as e:
                    raise UserError(f"cannot write {e.filename or self.targets[0]}: {e.strerror}") from None
                unlink_quietly(self.journal)
            finally:
                self.close()

    def written(self, i: int) -> None:
        """Output tensor i is written in every output: its hashes join the journal."""
        hashes = []
        for f, start, end in self.places[i]:
            self.files_open[f].flush()
            hashes.append(_sha256(self.fds[f], start, end))
        self.log.write(json.dumps({"sha256": hashes}) + "\n")
        self.log.flush()

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None
        for fd in self.fds:
            os.close(fd)
        self.fds = []
