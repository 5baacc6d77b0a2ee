"""Weights on first run: use a complete, verified set, or download, verify and install one.

Each model's official weights have one entry in OFFICIAL_WEIGHTS: where they come from, where setup()
installs them and how a download is checked. DeepSeek-OCR's are a tar of its Hugging Face repo on
Replicate's CDN, fetched with `pget -x` and installed into `checkpoints/` beside our code; DeepSeek-OCR 2's
are the data files of its Hugging Face repo at a pinned revision, fetched with pget's multifile mode into
`checkpoints/deepseek-ocr-2/`, where our model code is copied beside them. Either way the files land in a
fresh folder beside the target, are verified there, and only then are moved into place, one atomic rename
each. Our code in the target (`*.py`) is never overwritten by a download, and nothing is trusted without
verification: every required file must be there and parse, each safetensors file must be exactly as long
as its header says (a truncated download fails that), holding the tensors the model expects.

Operators can steer it (settings.py reads these from the environment): which model's weights to fetch;
another URL for them (same layout); a folder that already holds weights of either model (may be
read-only: verified, used in place, never downloaded to); offline (never download; fail clearly if the
weights are not already there).
"""

import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

DEFAULT_URL = "https://weights.replicate.delivery/default/deepseek-ai/DeepSeek-OCR/model.tar"
# deepseek-ai/DeepSeek-OCR-2 on Hugging Face, pinned (README, "DeepSeek-OCR 2", says where the hash comes from)
OCR2_REVISION = "aaa02f3811945a91062062994c5c4a3f4c0af2b0"
REQUIRED_JSON = ("config.json", "tokenizer.json", "tokenizer_config.json")
DATA_SUFFIXES = (".json", ".safetensors", ".model", ".tiktoken")
INDEX_FILE = "model.safetensors.index.json"
DISK_MARGIN = 1.1  # pget extracts while downloading: the data plus a little room
CODE_FOLDER = "checkpoints"  # our model code, relative to the repository

ExpectedTensors = Callable[[Path], Mapping[str, tuple]]


class WeightsError(RuntimeError):
    """The weights could not be made available; the message says what failed and what to do."""


@dataclass(frozen=True)
class OfficialWeights:
    """One model's official weights: what setup() fetches when DEEPSEEK_OCR_MODEL names the model, where it
    puts them and how it checks a download."""

    model: str  # DEEPSEEK_OCR_MODEL's value
    title: str  # the model's name in messages
    architecture: str  # the class its config.json names (`architectures`, `auto_map`), in checkpoints/
    folder: str  # where setup() installs them, relative to the repository
    url: str  # a tar of the files when `files` is empty, else the address the files are under
    files: tuple = ()  # the data files fetched one by one from url/<name> (pget's multifile mode)
    reference_tensors: Optional[str] = None  # the official tensors' names and shapes (a TSV in the repository)
    tensor_dtypes: tuple = ()  # the dtypes a downloaded tensor may have; empty: any


OFFICIAL_WEIGHTS = {
    "deepseek-ocr": OfficialWeights("deepseek-ocr", "DeepSeek-OCR", "DeepseekOCRForCausalLM", CODE_FOLDER, DEFAULT_URL),
    "deepseek-ocr-2": OfficialWeights(
        "deepseek-ocr-2", "DeepSeek-OCR 2", "DeepseekOCR2ForCausalLM", f"{CODE_FOLDER}/deepseek-ocr-2",
        f"https://huggingface.co/deepseek-ai/DeepSeek-OCR-2/resolve/{OCR2_REVISION}",
        files=("config.json", "model-00001-of-000001.safetensors", INDEX_FILE, "processor_config.json",
               "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"),
        reference_tensors="scripts/data/deepseek-ocr-2/checkpoint-tensors.tsv",
        # the shard is BF16 throughout as far as public sources tell (scripts/data/README.md); F32 is tolerated
        # because loading casts every tensor to the model's dtype
        tensor_dtypes=("BF16", "F32"),
    ),
}
DEFAULT_MODEL = "deepseek-ocr"


def model_in(folder: Path) -> OfficialWeights:
    """The model whose weights `folder` holds, as its config.json names it (`architectures`, `auto_map`)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise WeightsError(f"{path} is unreadable ({error})") from None
    names = list(config.get("architectures") or [])
    names += [str(v).rsplit(".", 1)[-1] for v in (config.get("auto_map") or {}).values()]
    for official in OFFICIAL_WEIGHTS.values():
        if official.architecture in names:
            return official
    known = ", ".join(f"{o.architecture} ({o.title})" for o in OFFICIAL_WEIGHTS.values())
    raise WeightsError(f"{path} names {', '.join(names) or 'no model'}, none of the models this service serves: "
                       f"{known}. It needs the official weights with their remote-code config (deepseek-ai/..., "
                       "not a copy converted to another format)")


def reference_tensor_shapes(table: Path) -> dict:
    """name → shape from a TSV of `name` and `shape` (`AxB`), as scripts/data keeps the official checkpoints'."""
    rows = Path(table).read_text(encoding="utf-8").splitlines()[1:]
    return {name: tuple(int(d) for d in shape.split("x")) for name, shape in (r.split("\t") for r in rows if r)}


# ---------------------------------------------------------------- verification


def safetensors_header(path: Path) -> tuple:
    """(tensor name → shape, problem or None) from a safetensors file's header, without reading its data."""
    tensors, problem = _tensor_entries(path)
    return {name: tuple(info["shape"]) for name, info in tensors.items()}, problem


def _tensor_entries(path: Path) -> tuple:
    """(tensor name → its header entry: dtype, shape, data_offsets; problem or None)."""
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
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    data_end = max((info["data_offsets"][1] for info in tensors.values()), default=0)
    if size != 8 + length + data_end:
        return tensors, f"{path.name} is {size} bytes but its header describes {8 + length + data_end} (truncated?)"
    return tensors, None


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


def verify_weights(folder: Path, expected_tensors: Optional[ExpectedTensors] = None, tensor_dtypes: tuple = (),
                   model: Optional[OfficialWeights] = None) -> list:
    """Problems that keep `folder` from being a complete set of weights (of `model`, if given, whose tensors
    are of `tensor_dtypes`, if given); empty when it is one."""
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
    if model is not None and not problems:
        try:
            found_model = model_in(folder)
        except WeightsError as error:
            found_model, problems = None, problems + [str(error)]
        if found_model is not None and found_model != model:
            problems.append(f"it holds {found_model.title} weights, not {model.title}'s")
    files, file_problems = weight_files(folder)
    problems += file_problems
    found, dtypes = {}, {}
    for path in files:
        tensors, problem = _tensor_entries(path)
        found.update((name, tuple(info["shape"])) for name, info in tensors.items())
        dtypes.update((name, info.get("dtype")) for name, info in tensors.items())
        if problem:
            problems.append(problem)
    if tensor_dtypes and not problems:
        odd = sorted(name for name, dtype in dtypes.items() if dtype not in tensor_dtypes)
        if odd:
            problems.append(f"{len(odd)} tensor(s) of a dtype other than {' or '.join(tensor_dtypes)}, e.g. "
                            + ", ".join(f"{n} ({dtypes[n]})" for n in odd[:3]))
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
                   offline: bool = False, expected_tensors: Optional[ExpectedTensors] = None, files: tuple = (),
                   tensor_dtypes: tuple = (), model: Optional[OfficialWeights] = None,
                   log: Callable[[str], None] = print, retries: int = 3, backoff_s: float = 2.0) -> Path:
    """The folder to load the weights from: `local_dir` if given, else `target_dir`, downloaded if needed.

    The download is the tar at `url`, or with `files` each of them from url/<name>. `tensor_dtypes` and
    `model` (the model its config.json must name) are checked in `target_dir` only: `local_dir` is whatever
    weights the operator points at."""
    if local_dir:
        folder = Path(local_dir)
        problems = verify_weights(folder, expected_tensors)
        if problems:
            raise WeightsError(f"DEEPSEEK_OCR_WEIGHTS_DIR={folder} is not a complete set of weights: "
                               + "; ".join(problems))
        log(f"using the weights in {folder}")
        return folder
    target_dir = Path(target_dir)
    checks = dict(expected_tensors=expected_tensors, tensor_dtypes=tensor_dtypes, model=model)
    log(f"checking the weights in {target_dir}")
    problems = verify_weights(target_dir, **checks)
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
    urls = [_file_url(url, name) for name in files] or [url]
    _check_disk_space(urls, target_dir, log)
    for attempt in range(1, retries + 1):
        try:
            _download_and_install(url, files, target_dir, checks, log)
            return target_dir
        except _Retriable as error:
            if attempt == retries:
                raise WeightsError(f"could not get the weights after {retries} tries: {error}") from None
            wait = backoff_s * 2 ** (attempt - 1)
            log(f"try {attempt} of {retries} failed: {error}; retrying in {wait:.0f} s")
            time.sleep(wait)
    raise AssertionError("unreachable")


def ensure_model_weights(repository: Path, model: str, *, url: Optional[str] = None, local_dir: Optional[str] = None,
                         offline: bool = False, expected_tensors: Optional[ExpectedTensors] = None,
                         log: Callable[[str], None] = print, **retry) -> Path:
    """setup()'s weights: `local_dir` if given (either model's), else `model`'s official weights in their folder of
    the repository, downloaded from `url` (its official source by default) if they are not there yet.

    The official download is checked against the model's official tensor table where the repository keeps
    one (else `expected_tensors`: the tensors the folder's config builds), its dtypes and the model its config
    names. A model installed in a folder of its own gets our model code copied beside its weights, so that
    `AutoModel.from_pretrained(folder, trust_remote_code=True)` loads it as it loads `checkpoints/`."""
    official = OFFICIAL_WEIGHTS[model]
    repository = Path(repository)
    target = repository / official.folder
    if not local_dir and official.reference_tensors:
        table = repository / official.reference_tensors
        expected_tensors = lambda folder: reference_tensor_shapes(table)  # noqa: E731
    folder = ensure_weights(target, url=url or official.url, local_dir=local_dir, offline=offline,
                            expected_tensors=expected_tensors, files=official.files,
                            tensor_dtypes=official.tensor_dtypes, model=official, log=log, **retry)
    code = repository / CODE_FOLDER
    if folder == target and target.resolve() != code.resolve():
        _place_code(code, target, log)
    return folder


def _place_code(code: Path, target: Path, log) -> None:
    """Our model code beside the weights, replacing any other copy (each file whole, by a rename)."""
    try:
        for source in sorted(code.glob("*.py")):
            placed = target / source.name
            data = source.read_bytes()
            if placed.is_file() and placed.read_bytes() == data:
                continue
            staged = target / f".{source.name}.partial"
            staged.write_bytes(data)
            os.replace(staged, placed)
    except OSError as error:  # the service imports the code from the repository; only remote-code loading needs it
        log(f"could not copy the model code into {target} ({error}); the service does not need it there")


def _file_url(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def _check_disk_space(urls: list, target_dir: Path, log) -> None:
    size = 0
    try:
        for url in urls:
            request = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(request, timeout=10) as response:
                size += int(response.headers.get("Content-Length") or 0)
    except Exception:  # the size is only a courtesy check; the download itself reports real failures
        return
    free = shutil.disk_usage(target_dir).free
    if size and free < size * DISK_MARGIN:
        raise WeightsError(f"not enough disk space in {target_dir}: the weights need about "
                           f"{size * DISK_MARGIN / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
    if size:
        log(f"download size {size / 1e9:.2f} GB, {free / 1e9:.1f} GB free")


def _download_and_install(url: str, files: tuple, target_dir: Path, checks: dict, log) -> None:
    staging = Path(tempfile.mkdtemp(prefix=".weights-", dir=target_dir.parent))
    try:
        extracted = staging / "extracted"
        log(f"downloading {url}{' (' + ', '.join(files) + ')' if files else ''} into {staging}")
        started = time.monotonic()
        if files:
            extracted.mkdir()
            manifest = staging / "manifest.txt"
            lines = [(_file_url(url, name), extracted / name) for name in files]
            if any(len(f"{source} {dest}".split()) != 2 for source, dest in lines):
                raise WeightsError(f"pget's manifest cannot hold a path with spaces: {extracted}")
            manifest.write_text("".join(f"{source} {dest}\n" for source, dest in lines))
            command = ["pget", "multifile", str(manifest)]
        else:
            command = ["pget", "-x", url, str(extracted)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip()[-500:]
            raise _Retriable(f"pget failed (exit {done.returncode}): {tail}")
        log(f"downloaded{'' if files else ' and extracted'} in {time.monotonic() - started:.1f} s")
        root = extracted if files else _archive_root(extracted)
        problems = verify_weights(root, **checks)
        if problems:
            raise _Retriable(f"the downloaded {'files are' if files else 'archive is'} incomplete or corrupt: "
                             + "; ".join(problems))
        moved = _install_data_files(root, target_dir)
        problems = verify_weights(target_dir, **checks)
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
