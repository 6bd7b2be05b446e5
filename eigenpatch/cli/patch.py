"""``patch-model`` / ``eigenpatch patch``: build a recipe from the registered pieces' flags, run it, save.

The core owns what every recipe shares (the model, the output folder, calibration text, evaluation);
each room's :class:`~eigenpatch.cli.pieces.CliPiece` adds its flags and builds its config. Stages run
in the pieces' order, whatever order the flags were given in.
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from eigenpatch.cli.pieces import needs_text_error, pieces
from eigenpatch.errors import UsageError
from eigenpatch.recipe import TransformConfig


def patch_examples() -> str:
    """The ``--help`` epilog: the core's examples, then each registered piece's."""
    lines = [
        "examples:",
        "  patch-model --compress 0.5                       # SmolLM2-135M (built offline), half the decoder Linears",
        "  patch-model ./my-llama --compress 0.3 -o out/    # any local HF folder, calibrated on the wiki text",
    ]
    lines += [f"  {example}" for piece in pieces() for example in piece.examples]
    lines.append(
        "  python -c \"import eigenpatch, transformers; transformers.AutoModelForCausalLM.from_pretrained('out/')\""
    )
    return "\n".join(lines) + "\n"


def add_model_args(p: argparse.ArgumentParser, device: bool = False) -> None:
    p.add_argument(
        "--dtype",
        default="float32",
        help="dtype to load, compute and save in: float32, bfloat16, float16, or auto (the checkpoint's own); "
        "decompositions always run in fp32/fp64 (default: float32)",
    )
    if device:
        p.add_argument(
            "--device",
            default="cpu",
            help="where layers compute: cpu, cuda, cuda:N, mps, or auto (the best available) (default: cpu)",
        )
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow architectures with custom code (off by default)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    from eigenpatch.evaluate import DEFAULT_MAX_TOKENS, DEFAULT_SEQ_LEN

    p.add_argument("--text", default="wiki", help="eval text: wiki (held-out articles), wiki:calib, or a .txt file")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="score the first N tokens")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="window length (non-overlapping)")


def add_patch_args(p: argparse.ArgumentParser) -> None:
    from eigenpatch.calibration import DEFAULT_SEED, DEFAULT_WINDOWS
    from eigenpatch.calibration import DEFAULT_SEQ_LEN as CALIB_SEQ_LEN
    from eigenpatch.zoo import DEFAULT_MODEL, MODELS

    zoo = ", ".join(MODELS)
    p.add_argument(
        "model", nargs="?", default=DEFAULT_MODEL, help=f"HF folder, zoo name ({zoo}) or hub id (default: %(default)s)"
    )
    p.add_argument("-o", "--output", help="output folder (default: ./patched/<model>-<what was done>)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--eval", action="store_true", help="measure perplexity before and after")
    c = p.add_argument_group("calibration (for the stages that read text)")
    c.add_argument("--calib", default="wiki", help="calibration text: wiki (its calib split) or a .txt file")
    c.add_argument("--calib-windows", type=int, default=DEFAULT_WINDOWS, help="calibration windows (%(default)s)")
    c.add_argument("--calib-seq-len", type=int, default=CALIB_SEQ_LEN, help="tokens per window (%(default)s)")
    c.add_argument("--seed", type=int, default=DEFAULT_SEED, help="calibration sampling seed (%(default)s)")
    for piece in pieces():
        piece.add_arguments(p)
    add_model_args(p, device=True)
    add_eval_args(p)


def build_recipe(args: argparse.Namespace) -> list[TransformConfig]:
    """The configs the flags ask for, in stage order; refuses a command that asks for nothing."""
    recipe: list[TransformConfig] = []
    for piece in pieces():
        config = piece.build(args, list(recipe))
        if config is not None:
            recipe.append(config)
    if not recipe:
        flags = ", ".join(p.flag for p in pieces() if p.flag)
        raise UsageError(f"nothing to do: give one or more of {flags}")
    return recipe


def default_output(args: argparse.Namespace) -> Path:
    """``patched/<model><each stage's part>``, the parts in the pieces' name order."""
    name = Path(args.model).name or "model"
    for piece in sorted(pieces(), key=lambda p: p.name_order):
        name += piece.output_name(args)
    return Path("patched") / name


@dataclass
class _Job:
    """One ``patch-model`` run, as the two ways of running it need it."""

    args: argparse.Namespace
    recipe: list[TransformConfig]
    folder: Path
    output: Path
    state_dir: Path
    device: Any
    dtype: Any
    calib_text: str | None

    def parts(self) -> tuple[Any, ...]:
        """The fields in order, as they are (``dataclasses.astuple`` would copy the recipe into tuples)."""
        return tuple(getattr(self, f.name) for f in fields(self))


def run_patch(args: argparse.Namespace) -> int:
    """Run the recipe the flags ask for. A recipe whose transforms all run out of core (``--compress``
    alone, by default) never loads the whole model: its layers are read and written one at a time
    (:mod:`eigenpatch.out_of_core`). Anything else, or ``--eval``, loads the model whole."""
    from eigenpatch.cli.summary import summarize_patch
    from eigenpatch.hf_io import check_safetensors, is_patched, resolve_device, resolve_dtype
    from eigenpatch.zoo import resolve_model, resolve_text

    recipe = build_recipe(args)
    device = resolve_device(args.device)  # before anything is loaded
    output = Path(args.output) if args.output else default_output(args)
    if output.exists() and not args.force:
        raise UsageError(f"output {output} already exists; choose another -o/--output or pass --force to replace it")
    needs_data = any(c.needs_data for c in recipe)
    calib_text = resolve_text(args.calib, split="calib") if needs_data else None
    start = time.perf_counter()
    folder = resolve_model(args.model)
    if folder.resolve() == output.resolve():
        raise UsageError("output folder is the input folder; eigenpatch never modifies its input — pick another -o")
    check_safetensors(folder)
    dtype = resolve_dtype(args.dtype, folder)
    check_free_disk(folder, output, dtype)
    state_dir = output.parent / f".{output.name}.state"  # an interrupted resumable run continues from here
    job = _Job(args, recipe, folder, output, state_dir, device, dtype, calib_text)
    out_of_core = all(c.out_of_core for c in recipe) and not args.eval and not is_patched(folder)
    report, out = _patch_out_of_core(job) if out_of_core else _patch_in_memory(job)
    report["seconds"] = round(time.perf_counter() - start, 2)
    print(summarize_patch(report, out))
    return 0


def _patch_out_of_core(job: _Job) -> tuple[dict[str, Any], Path]:
    args, recipe, folder, output, state_dir, device, dtype, calib_text = job.parts()
    from eigenpatch.format.checkpoint import weights_bytes
    from eigenpatch.hf_io import load_tokenizer
    from eigenpatch.out_of_core import patch_checkpoint

    tokenizer = load_tokenizer(folder, args.trust_remote_code)
    if calib_text is not None and tokenizer is None:
        raise needs_text_error(recipe)
    return patch_checkpoint(
        folder,
        recipe,
        output,
        state_dir=state_dir,
        device=device,
        dtype=dtype,
        tokenizer=tokenizer,
        calib_text=calib_text,
        base_model=args.model,
        show_progress=not args.quiet,
        force=args.force,
        trust_remote_code=args.trust_remote_code,
        report_extra={"input_weights_bytes": weights_bytes(folder), "out_of_core": True},
    )


def _patch_in_memory(job: _Job) -> tuple[dict[str, Any], Path]:
    args, recipe, folder, output, state_dir, device, dtype, calib_text = job.parts()
    import eigenpatch
    from eigenpatch.engine.memory import peak_memory
    from eigenpatch.format.checkpoint import weights_bytes
    from eigenpatch.hf_io import load_model

    check_fits_whole(recipe, folder, dtype, device)
    model, tokenizer, folder = load_model(folder, dtype, args.trust_remote_code)
    model.to(device)
    if calib_text is not None and tokenizer is None:
        raise needs_text_error(recipe)
    evals: dict[str, Any] = {}
    ids = eval_ids(args, tokenizer) if args.eval else None
    if ids is not None:
        evals["before"] = perplexity(model, ids, args, "ppl (base)")
    resumable = any(c.resumable for c in recipe)
    report = eigenpatch.patch(
        model,
        recipe,
        tokenizer=tokenizer,
        calib_text=calib_text,
        base_model=args.model,
        show_progress=not args.quiet,
        state_dir=state_dir if resumable else None,
    )
    if ids is not None:
        evals["after"] = perplexity(model, ids, args, "ppl (patched)")
        report["perplexity"] = evals
    report["input_weights_bytes"] = weights_bytes(folder)
    report.update(peak_memory(device))
    out = eigenpatch.save(model, output, tokenizer=tokenizer, report=report, force=args.force)
    shutil.rmtree(state_dir, ignore_errors=True)  # the run finished: nothing left to resume
    report["weights_bytes"] = weights_bytes(out)
    return report, out


def check_fits_whole(recipe: list[TransformConfig], folder: Path, dtype: Any, device: Any) -> None:
    """A recipe that needs the whole model (a stage that does not stream, or ``--eval``) is refused in one line
    when the model's weights in ``dtype`` (twice that with a frozen teacher copy for distillation)
    exceed the memory ``device`` has free; the layer-by-layer stages alone never need it."""
    from eigenpatch.engine.memory import available_bytes
    from eigenpatch.format.checkpoint import weights_bytes
    from eigenpatch.hf_io import resolve_dtype
    from eigenpatch.table import fmt_bytes

    free = available_bytes(device)
    copies = 2 if any(c.needs_teacher for c in recipe) else 1
    need = copies * weights_bytes(folder) * dtype.itemsize // resolve_dtype("auto", folder).itemsize
    if free is not None and need > free:
        what = " (and a frozen copy to distil from)" if copies == 2 else ""
        raise UsageError(
            f"this recipe needs the whole model on {device}{what}: {fmt_bytes(need)} of weights, "
            f"{fmt_bytes(free)} free; --compress alone runs layer by layer (multi-device healing is not built yet)"
        )


def check_free_disk(folder: Path, output: Path, dtype: Any) -> None:
    """Refuse to start when the output's disk cannot hold the input's weights in ``dtype`` (an
    upper bound: compression only shrinks them), so a long run does not die writing its last shard."""
    from eigenpatch.format.checkpoint import weights_bytes
    from eigenpatch.hf_io import resolve_dtype
    from eigenpatch.table import fmt_bytes

    stored = resolve_dtype("auto", folder).itemsize
    need = weights_bytes(folder) * dtype.itemsize // stored
    parent = output.resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < need:
        raise UsageError(
            f"{parent} has {fmt_bytes(free)} free; the output may need up to {fmt_bytes(need)} "
            f"(the input's weights in {str(dtype).removeprefix('torch.')}); free space or pick another -o"
        )


def eval_ids(args: argparse.Namespace, tokenizer: Any) -> Any:
    from eigenpatch.evaluate import tokenize
    from eigenpatch.zoo import resolve_text

    if tokenizer is None:
        raise UsageError("perplexity needs a tokenizer and the model folder has none; add tokenizer files")
    if args.max_tokens < 2 or args.seq_len < 2:
        raise UsageError("--max-tokens and --seq-len must be at least 2")
    try:
        return tokenize(tokenizer, resolve_text(args.text, split="eval"), args.max_tokens)
    except ValueError as exc:
        raise UsageError(f"{exc}; pass a text file with content") from None


def perplexity(model: Any, ids: Any, args: argparse.Namespace, desc: str) -> dict[str, Any]:
    from eigenpatch.evaluate import perplexity as score

    return score(model, ids, seq_len=args.seq_len, show_progress=not args.quiet, desc=desc).as_dict()
