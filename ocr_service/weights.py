"""Weights on first run: use a complete, verified set, or download, verify and install one.

The tar of the Hugging Face repo is fetched with `pget -x` into a fresh folder beside the target,
verified there, and only then are its data files moved into place, one atomic rename each. Our
code in the target (`*.py`) is never overwritten, and nothing is trusted without verification:
every required file must be there and parse, and each safetensors file must be exactly as long as
its header says (a truncated download fails that), holding the tensors the model expects.

Operators can steer it (settings.py reads these from the environment): another URL for the tar
(same layout); a folder that already holds the weights (may be read-only: verified, used in place,
never downloaded to); offline (never download; fail clearly if the weights are not already there).
"""

import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Mapping, Optional

DEFAULT_URL = "https://weights.replicate.delivery/default/deepseek-ai/DeepSeek-OCR/model.tar"
REQUIRED_JSON = ("config.json", "tokenizer.json", "tokenizer_config.json")
DATA_SUFFIXES = (".json", ".safetensors", ".model", ".tiktoken")
INDEX_FILE = "model.safetensors.index.json"
DISK_MARGIN = 1.1  # pget extracts while downloading: the data plus a little room

ExpectedTensors = Callable[[Path], Mapping[str, tuple]]


class WeightsError(RuntimeError):
    """The weights could not be made available; the message says what failed and what to do."""


# ---------------------------------------------------------------- verification


def safetensors_header(path: Path) -> tuple:
    """(tensor name → shape, problem or None) from a safetensors file's header, without reading its data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            raw_length = handle.read(8)
            if len(raw_length) < 8:
                return {}, f"{path.name} is too short to be a safetensors file"
            (length,) = struct.unpack("<Q", raw_length)
            if length > min(size, 100_000_000):
                return {}, f"{path.name} has an impossible header length"
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as error:
        return {}, f"{path.name} has no readable safetensors header ({error})"
    shapes, data_end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shapes[name] = tuple(info["shape"])
        data_end = max(data_end, info["data_offsets"][1])
    if size != 8 + length + data_end:
        return shapes, f"{path.name} is {size} bytes but its header describes {8 + length + data_end} (truncated?)"
    return shapes, None


def weight_files(folder: Path) -> tuple:
    """(safetensors files, problems): the shards an index names, or the lone safetensors files."""
    index = folder / INDEX_FILE
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as error:
            return [], [f"{INDEX_FILE} is unreadable ({error})"]
        missing = [n for n in names if not (folder / n).is_file()]
        return [folder / n for n in names if n not in missing], [f"missing file {n}" for n in missing]
    files = sorted(folder.glob("*.safetensors"))
    return files, ([] if files else ["missing file model.safetensors (no weights)"])


def verify_weights(folder: Path, expected_tensors: Optional[ExpectedTensors] = None) -> list:
    """Problems that keep `folder` from being a complete set of weights; empty when it is one."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} does not exist"]
    problems = []
    for name in REQUIRED_JSON:
        try:
            json.loads((folder / name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            problems.append(f"missing file {name}")
        except (OSError, ValueError) as error:
            problems.append(f"{name} is not valid JSON ({error})")
    files, file_problems = weight_files(folder)
    problems += file_problems
    found = {}
    for path in files:
        shapes, problem = safetensors_header(path)
        found.update(shapes)
        if problem:
            problems.append(problem)
    if expected_tensors is not None and not problems:
        expected = {name: tuple(shape) for name, shape in expected_tensors(folder).items()}
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        mismatched = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
        if missing:
            problems.append(f"{len(missing)} tensor(s) missing, e.g. {', '.join(missing[:3])}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:3])}")
        if mismatched:
            problems.append("tensor shape mismatch: " + ", ".join(
                f"{n} {found[n]} != {expected[n]}" for n in mismatched[:3]))
    return problems


# ---------------------------------------------------------------- download and install


class _Retriable(WeightsError):
    """A failure another attempt may not repeat (network, truncated or corrupt download)."""


def ensure_weights(target_dir: Path, *, url: str = DEFAULT_URL, local_dir: Optional[str] = None,
                   offline: bool = False, expected_tensors: Optional[ExpectedTensors] = None,
                   log: Callable[[str], None] = print, retries: int = 3, backoff_s: float = 2.0) -> Path:
    """The folder to load the weights from: `local_dir` if given, else `target_dir`, downloaded if needed."""
    if local_dir:
        folder = Path(local_dir)
        problems = verify_weights(folder, expected_tensors)
        if problems:
            raise WeightsError(f"DEEPSEEK_OCR_WEIGHTS_DIR={folder} is not a complete set of weights: "
                               + "; ".join(problems))
        log(f"using the weights in {folder}")
        return folder
    target_dir = Path(target_dir)
    log(f"checking the weights in {target_dir}")
    problems = verify_weights(target_dir, expected_tensors)
    if not problems:
        log("weights present and verified")
        return target_dir
    if offline:
        raise WeightsError(f"offline mode (DEEPSEEK_OCR_OFFLINE) and {target_dir} is not complete: "
                           + "; ".join(problems))
    if shutil.which("pget") is None:
        raise WeightsError("pget is not on PATH: install it (see cog.yaml) or point DEEPSEEK_OCR_WEIGHTS_DIR "
                           "at a folder that holds the weights")
    target_dir.mkdir(parents=True, exist_ok=True)
    _check_disk_space(url, target_dir, log)
    for attempt in range(1, retries + 1):
        try:
            _download_and_install(url, target_dir, expected_tensors, log)
            return target_dir
        except _Retriable as error:
            if attempt == retries:
                raise WeightsError(f"could not get the weights after {retries} tries: {error}") from None
            wait = backoff_s * 2 ** (attempt - 1)
            log(f"try {attempt} of {retries} failed: {error}; retrying in {wait:.0f} s")
            time.sleep(wait)
    raise AssertionError("unreachable")


def _check_disk_space(url: str, target_dir: Path, log) -> None:
    try:
        request = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(request, timeout=10) as response:
            size = int(response.headers.get("Content-Length") or 0)
    except Exception:  # the size is only a courtesy check; the download itself reports real failures
        return
    free = shutil.disk_usage(target_dir).free
    if size and free < size * DISK_MARGIN:
        raise WeightsError(f"not enough disk space in {target_dir}: the weights need about "
                           f"{size * DISK_MARGIN / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
    if size:
        log(f"download size {size / 1e9:.2f} GB, {free / 1e9:.1f} GB free")


def _download_and_install(url: str, target_dir: Path, expected_tensors, log) -> None:
    staging = Path(tempfile.mkdtemp(prefix=".weights-", dir=target_dir.parent))
    try:
        extracted = staging / "extracted"
        log(f"downloading {url} into {staging}")
        started = time.monotonic()
        done = subprocess.run(["pget", "-x", url, str(extracted)], capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip()[-500:]
            raise _Retriable(f"pget failed (exit {done.returncode}): {tail}")
        log(f"downloaded and extracted in {time.monotonic() - started:.1f} s")
        root = _archive_root(extracted)
        problems = verify_weights(root, expected_tensors)
        if problems:
            raise _Retriable("the downloaded archive is incomplete or corrupt: " + "; ".join(problems))
        moved = _install_data_files(root, target_dir)
        problems = verify_weights(target_dir, expected_tensors)
        if problems:
            raise _Retriable("the installed weights do not verify: " + "; ".join(problems))
        log(f"installed {moved} verified file(s) into {target_dir}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _archive_root(extracted: Path) -> Path:
    """The folder of the archive that holds config.json: the top, or its single sub-folder."""
    if (extracted / "config.json").exists() or not extracted.is_dir():
        return extracted
    folders = [p for p in extracted.iterdir() if p.is_dir() and not p.is_symlink()]
    if len(folders) == 1 and (folders[0] / "config.json").exists():
        return folders[0]
    return extracted


def _install_data_files(root: Path, target_dir: Path) -> int:
    """Move the archive's data files into place; our code (*.py) and anything that is not a plain file
    inside the archive (links, folders) stay where they are. config.json goes last."""
    files = [p for p in root.iterdir()
             if p.suffix in DATA_SUFFIXES and p.is_file() and not p.is_symlink()
             and p.resolve().parent == root.resolve()]
    files.sort(key=lambda p: (p.name == "config.json", p.name))
    for path in files:
        os.replace(path, target_dir / path.name)
    return len(files)
