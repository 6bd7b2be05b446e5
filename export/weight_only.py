"""Rewrite a verified fp32 graph into a weight-only int8 / int4 one, quantized by :mod:`.nbits`.

Every ``MatMul`` with a constant ``[K, N]`` weight becomes ONNX Runtime's ``MatMulNBits``:
factor pairs (two MatMuls each), dense Linears and the output head alike. Activations and the KV
cache stay fp32, so only the weights' rounding differs from the fp32 graph.

With calibration windows, each weight is GPTQ-rounded against the Gram of *its own* inputs in the
fp32 graph, taken from one ONNX Runtime pass that also returns every quantized MatMul's input
(inputs shared by several MatMuls, like q/k/v's, give one Gram). Without, blocks are rounded to
the nearest level. A tied head ``MatMul(x, Transpose(table))`` is quantized from the table as it
stands (the table is already ``[N, K]``); the embedding ``Gather`` becomes
``GatherBlockQuantized`` when asked, and shares the head's bytes when both use the same codes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from eigenpatch.quantizer import BlockQuant, quantize_gptq, quantize_rtn

MS_DOMAIN = "com.microsoft"


@dataclass
class Target:
    """One constant-weight MatMul: its node, its weight as ``[N, K]`` and where that came from."""

    node: Any
    weight: np.ndarray  # [N, K]
    source: str  # the initializer read (the table itself for a tied head)
    tied: bool  # read through a Transpose of the table (a tied head)


def targets(graph: Any, initializers: dict[str, np.ndarray]) -> list[Target]:
    """The MatMuls whose second input is a 2-D constant, directly or through a ``Transpose``."""
    producers = {out: n for n in graph.node for out in n.output}
    found = []
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        name = node.input[1]
        if name in initializers and initializers[name].ndim == 2:
            found.append(Target(node, initializers[name].T, name, tied=False))
            continue
        transpose = producers.get(name)
        if (
            transpose is not None
            and transpose.op_type == "Transpose"
            and transpose.input[0] in initializers
            and initializers[transpose.input[0]].ndim == 2
            and list(next((a.ints for a in transpose.attribute if a.name == "perm"), [1, 0])) == [1, 0]
        ):
            found.append(Target(node, initializers[transpose.input[0]], transpose.input[0], tied=True))
    return found


def input_grams(
    folder: Path, model_file: str, graph: Any, names: Iterable[str], windows: np.ndarray
) -> dict[str, np.ndarray]:
    """``X^T X`` (float64) of each tensor in ``names`` over every token of ``windows [n, seq]``.

    Runs the fp32 graph once per window with those tensors as extra outputs. The probe graph is
    written next to the original so that it reads the same external data file (no copy).
    """
    import onnx
    import onnxruntime as ort

    names = list(dict.fromkeys(names))
    probe = onnx.ModelProto()
    probe.CopyFrom(graph)  # ``graph`` is the whole ModelProto, weights left external
    for name in names:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    probe_file = folder / f"{model_file}.probe"
    onnx.save(probe, str(probe_file))
    try:
        session = ort.InferenceSession(str(probe_file), providers=["CPUExecutionProvider"])
        feeds = _empty_cache_feeds(session)
        grams: dict[str, np.ndarray] = {}
        for row in tqdm(windows, desc="calibrating int weights", unit="window", leave=False):
            ids = row[None, :].astype(np.int64)
            feed = {
                "input_ids": ids,
                "attention_mask": np.ones_like(ids),
                "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None, :],
                **feeds,
            }
            outputs = session.run(names, feed)
            for name, x in zip(names, outputs, strict=True):
                x = x.reshape(-1, x.shape[-1]).astype(np.float64)
                grams[name] = grams.get(name, 0.0) + x.T @ x
        return grams
    finally:
        probe_file.unlink(missing_ok=True)


def _empty_cache_feeds(session: Any) -> dict[str, np.ndarray]:
    """Zero-length KV-cache inputs: every window is scored from an empty cache."""
    feeds = {}
    for spec in session.get_inputs():
        if spec.name.startswith("past_key_values"):
            shape = [1 if i == 0 else 0 if i == 2 else d for i, d in enumerate(spec.shape)]
            feeds[spec.name] = np.zeros(shape, dtype=np.float32)
    return feeds


def nbits_node(graph: Any, target: Target, q: BlockQuant, prefix: str) -> Any:
    """Initializers for ``q`` and a ``MatMulNBits`` node computing ``target.node``'s output."""
    from onnx import helper, numpy_helper

    n, k = target.weight.shape
    tensors = [
        numpy_helper.from_array(q.packed_codes(), f"{prefix}.q{q.bits}"),
        numpy_helper.from_array(q.scales, f"{prefix}.scales"),
        numpy_helper.from_array(q.packed_zeros(), f"{prefix}.zeros"),
    ]
    graph.initializer.extend(tensors)
    node = helper.make_node(
        "MatMulNBits",
        [target.node.input[0], *(t.name for t in tensors)],
        list(target.node.output),
        name=f"{target.node.name}_q{q.bits}",
        domain=MS_DOMAIN,
        K=k,
        N=n,
        bits=q.bits,
        block_size=q.block,
    )
    return node


def gather_node(graph: Any, gather: Any, q: BlockQuant, prefix: str) -> Any:
    """``GatherBlockQuantized`` reading ``q`` (the table's codes) in place of ``gather``."""
    from onnx import helper, numpy_helper

    n = q.codes.shape[0]
    data = numpy_helper.from_array(q.packed_codes().reshape(n, -1), f"{prefix}.table_q{q.bits}")
    scales = numpy_helper.from_array(q.scales, f"{prefix}.table_scales")
    zeros = numpy_helper.from_array(q.packed_zeros(), f"{prefix}.table_zeros")
    graph.initializer.extend([data, scales, zeros])
    return helper.make_node(
        "GatherBlockQuantized",
        [data.name, gather.input[1], scales.name, zeros.name],
        list(gather.output),
        name=f"{gather.name}_q{q.bits}",
        domain=MS_DOMAIN,
        bits=q.bits,
        block_size=q.block,
        gather_axis=0,
        quantize_axis=1,
    )


def pairs(graph: Any, found: list[Target]) -> list[tuple[Target, Target]]:
    """``(down, up)`` factor pairs: ``up`` reads ``down``'s output, and nothing else does."""
    by_output = {t.node.output[0]: t for t in found if not t.tied}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    return [
        (by_output[t.node.input[0]], t)
        for t in found
        if not t.tied and t.node.input[0] in by_output and readers[t.node.input[0]] == 1
    ]


def balance_pairs(factor_pairs: list[tuple[Target, Target]], grams: dict[str, np.ndarray]) -> int:
    """Rescale each factor pair so that the columns of its ``up`` factor have equal norms.

    ``up @ down == (up * s) @ (down / s)`` exactly, for any positive ``s`` per rank component.
    The choice matters once both are rounded in blocks: ``down``'s rows each have their own
    grids, so scaling them changes nothing there, while ``up``'s blocks run *across* the rank
    components, and one large column claims a whole block's range, so the others lose their
    levels. Equal norms share the range fairly. (Measured on SmolLM2 at int4 with GPTQ:
    110.5 -> 100.1 perplexity for the pairs alone; scaling to equal code RMS instead, AWQ's
    choice, made it worse: 128.7.) Gram of ``up``'s input rescaled to match.
    Returns the number of pairs rescaled; weights and Grams are updated in place.
    """
    done = 0
    for down, up in factor_pairs:
        norm = np.linalg.norm(up.weight, axis=0)
        if not (norm > 0).all():
            continue
        s = (norm.mean() / norm).astype(np.float32)
        up.weight = up.weight * s[None, :]
        down.weight = down.weight / s[:, None]
        name = up.node.input[0]
        if name in grams:
            grams[name] = grams[name] / np.outer(s, s)
        done += 1
    return done


@dataclass(frozen=True)
class Recipe:
    """How each kind of weight is stored (see :func:`rewrite`)."""

    bits: int
    block: int
    head: bool = True  # quantize the output head (a tied head from the table itself)
    head_bits: int | None = None  # None: ``bits``
    dense_bits: int | None = None  # a compressed model's MatMuls outside pairs; None: ``bits``, 32: fp32
    embedding_bits: int | None = None  # the ``Gather`` table; None: stays fp32
    act_order: bool = True
    search: bool = False  # a searched grid per block: helps rounding to nearest, not GPTQ

    def bits_for(self, kind: str) -> int | None:
        """Bits for a MatMul of ``kind`` ("head", "pair", "dense"); ``None`` leaves it fp32."""
        bits = {"head": self.head_bits, "dense": self.dense_bits}.get(kind) or self.bits
        return None if bits == 32 else bits


def rewrite(folder: Path, model_file: str, recipe: Recipe, windows: np.ndarray | None = None) -> dict[str, Any]:
    """Replace the fp32 graph ``folder / model_file`` by its weight-only version (staged, then swapped).

    With ``windows`` (token ids ``[n, seq]``), GPTQ against each MatMul's own input Gram; without,
    round-to-nearest. Returns what was done, for the export's metadata.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(folder / model_file), load_external_data=False)
    graph = model.graph
    initializers = {t.name: numpy_helper.to_array(t, base_dir=str(folder)) for t in graph.initializer}
    found = targets(graph, initializers)
    if not recipe.head:
        found = [t for t in found if "logits" not in t.node.output]
    names = [t.node.input[0] for t in found]
    grams = input_grams(folder, model_file, model, names, windows) if windows is not None else {}
    factor_pairs = pairs(graph, found)
    paired = {id(t.node) for pair in factor_pairs for t in pair}
    # a model without pairs is not compressed: its Linears are not "kept dense", they are all there is
    kinds = {
        id(t.node): "head" if "logits" in t.node.output else "dense" if paired and id(t.node) not in paired else "pair"
        for t in found
    }
    found = [t for t in found if recipe.bits_for(kinds[id(t.node)]) is not None]
    done: dict[str, Any] = {
        "method": "gptq" if grams else "round-to-nearest",
        "calibration_windows": 0 if windows is None else len(windows),
        "pairs_balanced": balance_pairs(factor_pairs, grams),
        "matmuls": len(found),
        "head": "fp32",
    }
    replaced: dict[int, list[Any]] = {}
    head_target, head_q, head_rounded = None, None, False
    bits_used: dict[int, int] = {}
    for i, target in enumerate(tqdm(found, desc=f"int{recipe.bits} weights", unit="matmul", leave=False)):
        kind = kinds[id(target.node)]
        bits = recipe.bits_for(kind)
        gram = grams.get(target.node.input[0])
        if gram is None:
            q = quantize_rtn(target.weight, bits, recipe.block, recipe.search)
        else:
            q = quantize_gptq(target.weight, gram, bits, recipe.block, recipe.act_order, recipe.search)
        replaced[id(target.node)] = [nbits_node(graph, target, q, f"w{i}")]
        bits_used[bits] = bits_used.get(bits, 0) + 1
        if kind == "head":
            head_target, head_q, head_rounded = target, q, gram is None
            done["head"] = f"int{bits}"
    done["matmuls_by_bits"] = {f"int{b}": n for b, n in sorted(bits_used.items())}
    gather = next((n for n in graph.node if n.op_type == "Gather" and n.input[0] in initializers), None)
    if recipe.embedding_bits and gather is not None:
        table = gather.input[0]
        # a tied head rounded to the nearest level at the same bits holds exactly the table's codes
        shared = (
            head_target is not None and head_target.tied and head_target.source == table and head_rounded
            and head_q.bits == recipe.embedding_bits
        )  # fmt: skip
        q = head_q if shared else quantize_rtn(initializers[table], recipe.embedding_bits, recipe.block)
        replaced[id(gather)] = [gather_node(graph, gather, q, "embed")]
        done["embedding"] = f"int{recipe.embedding_bits}" + (", shared with the head" if shared else "")
        if shared:  # the head's MatMulNBits reads the table's bytes through a Reshape
            node = replaced[id(head_target.node)][0]
            shape = numpy_helper.from_array(np.array(q.packed_codes().shape, dtype=np.int64), "embed.nbits_shape")
            graph.initializer.append(shape)
            reshape = helper.make_node("Reshape", [f"embed.table_q{q.bits}", shape.name], ["embed.head_b"])
            node.input[1:4] = ["embed.head_b", "embed.table_scales", "embed.table_zeros"]
            replaced[id(head_target.node)] = [reshape, node]
    else:
        done["embedding"] = "fp32"
    save_rewritten(model, replaced, initializers, folder, model_file, f"int{recipe.bits}")
    return done


def save_rewritten(
    model: Any,
    replaced: dict[int, list[Any]],
    initializers: dict[str, np.ndarray],
    folder: Path,
    model_file: str,
    stage: str,
) -> None:
    """Put ``replaced[id(node)]`` in place of each such node of ``model``'s graph, drop what nothing
    reads any more, and swap the result in for ``folder / model_file`` (written to ``stage`` first)."""
    import onnx
    from onnx import helper

    from eigenpatch.export.precision import replace_graph

    graph = model.graph
    nodes = [new for node in graph.node for new in replaced.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(prune(nodes, {o.name for o in graph.output}))
    keep_used_initializers(graph, initializers)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    staging = folder / stage
    staging.mkdir()
    onnx.save(model, str(staging / model_file), save_as_external_data=True, location=f"{model_file}.data")
    replace_graph(folder, staging)


def prune(nodes: list[Any], outputs: set[str]) -> list[Any]:
    """``nodes`` without those whose results nothing reads (the tied head's ``Transpose``, once
    the head reads codes): left in, they would keep the fp32 table in the file."""
    while True:
        read = outputs | {name for node in nodes for name in node.input}
        kept = [node for node in nodes if any(out in read for out in node.output)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept


def keep_used_initializers(graph: Any, initializers: dict[str, np.ndarray]) -> None:
    """Drop initializers nothing reads; load the kept external ones so that they are re-saved."""
    from onnx import TensorProto, numpy_helper

    used = {name for node in graph.node for name in node.input}
    kept = []
    for t in graph.initializer:
        if t.name not in used:
            continue
        if t.data_location == TensorProto.EXTERNAL:
            t = numpy_helper.from_array(initializers[t.name], t.name)
        kept.append(t)
    del graph.initializer[:]
    graph.initializer.extend(kept)
