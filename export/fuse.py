"""Fuse each traced RMSNorm (and the residual ``Add`` before it) into one ONNX Runtime node.

Why: at batch-1 decode a 135M model's step is ~2,600 small nodes, and the seven nodes of every
traced RMSNorm (``Pow → ReduceMean → Add(eps) → Sqrt → Reciprocal → Mul → Mul(weight)``) plus the
residual ``Add`` feeding it read no weights at all. That fixed per-step work is what keeps a
compressed model from its bytes limit: fusing them made batch-1 decode 1.4 % faster on dense SmolLM2
and 5.3 % on the default ``--compress 0.5`` checkpoint (docs/benchmarks.md, fused norms).

The fused ops are ONNX Runtime's ``SimplifiedLayerNormalization`` (which it registers in the default
domain) and ``SkipSimplifiedLayerNormalization`` (``com.microsoft``); both have CPU and CUDA kernels and
are the ops
ONNX Runtime's own transformer optimizer emits. A graph for another ONNX runtime is exported with
``--portable``, which skips this pass. The rewrite reads only the graph, never the weights (the
norm's scale is referenced by name), so it costs milliseconds on a model of any size.

Only the exact fp32 pattern the exporter writes is matched; anything else (Gemma's ``1 + weight``,
an fp16 graph's casts) is left as traced, which is slower but still exact.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

CONTRIB = "com.microsoft"
#: largest epsilon taken for an RMSNorm's (a larger constant Add is something else)
MAX_EPS = 1e-3


def fuse_norms(model_file: Path) -> dict[str, int]:
    """Rewrite ``model_file`` in place (graph only; its external data is untouched)."""
    import onnx

    model = onnx.load(str(model_file), load_external_data=False)
    counts = fuse_graph(model.graph)
    if any(counts.values()):
        if not any(o.domain == CONTRIB for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid(CONTRIB, 1))
        onnx.save(model, str(model_file))
    return counts


def fuse_graph(graph: Any) -> dict[str, int]:
    """Fuse every matched RMSNorm in ``graph`` (in place); return how many of each fused op it made."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = list(graph.node)  # one wrapper per node, so id() names a node for the whole pass
    order = {id(node): i for i, node in enumerate(nodes)}
    consts = {t.name: t for t in graph.initializer}
    producer = {out: node for node in nodes for out in node.output}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in nodes:
        for name in node.input:
            consumers[name].append(node)
    graph_outputs = {o.name for o in graph.output}
    shapes = {v.name: _dims(v) for v in (*graph.value_info, *graph.input, *graph.output)}

    def value(name: str) -> np.ndarray | None:
        tensor = consts.get(name)
        if tensor is None or tensor.data_location == TensorProto.EXTERNAL:
            return None
        return numpy_helper.to_array(tensor)

    def only_consumer(node: Any, op: str) -> Any:
        out = node.output[0]
        users = consumers.get(out, [])
        if out in graph_outputs or len(users) != 1 or users[0].op_type != op:
            return None
        return users[0]

    removed: set[int] = set()
    replacements: dict[int, Any] = {}  # id(first node of a norm, in graph order) -> its fused node
    counts = {"SimplifiedLayerNormalization": 0, "SkipSimplifiedLayerNormalization": 0}
    for pow_node in [n for n in nodes if n.op_type == "Pow"]:
        x = pow_node.input[0]
        exponent = value(pow_node.input[1])
        if exponent is None or exponent.size != 1 or float(exponent) != 2.0:
            continue
        mean = only_consumer(pow_node, "ReduceMean")
        if mean is None or not _last_axis_mean(mean, value):
            continue
        add_eps = only_consumer(mean, "Add")
        eps = value(add_eps.input[1]) if add_eps is not None else None
        if eps is None or eps.size != 1 or not 0 < float(eps) <= MAX_EPS:
            continue
        sqrt = only_consumer(add_eps, "Sqrt")
        recip = only_consumer(sqrt, "Reciprocal") if sqrt is not None else None
        scaled = only_consumer(recip, "Mul") if recip is not None else None
        if scaled is None or set(scaled.input) != {x, recip.output[0]}:
            continue
        out_mul = only_consumer(scaled, "Mul")
        if out_mul is None:
            continue
        weight = next((i for i in out_mul.input if i != scaled.output[0]), None)
        if weight not in consts or len(consts[weight].dims) != 1:
            continue
        chain = [pow_node, mean, add_eps, sqrt, recip, scaled, out_mul]
        eps_attr = {"epsilon": float(eps)}
        residual = producer.get(x)
        if _is_residual_add(residual, consts, shapes, removed):
            fused = helper.make_node(
                "SkipSimplifiedLayerNormalization",
                [residual.input[0], residual.input[1], weight],
                [out_mul.output[0], "", "", x],  # the 4th output is the sum: the residual stream goes on
                name=f"{out_mul.name or x}_skip_rms_norm",
                domain=CONTRIB,
                **eps_attr,  # normalizes over the last axis, in fp32
            )
            chain.append(residual)
            counts["SkipSimplifiedLayerNormalization"] += 1
        else:
            fused = helper.make_node(
                "SimplifiedLayerNormalization",
                [x, weight],
                [out_mul.output[0]],
                name=f"{out_mul.name or x}_rms_norm",  # ONNX Runtime registers this one in the default domain
                axis=-1,
                stash_type=1,  # fp32 statistics
                **eps_attr,
            )
            counts["SimplifiedLayerNormalization"] += 1
        removed.update(id(n) for n in chain)
        # the fused node takes the place of the norm's first node: what it reads is produced before
        # that node, and whatever reads its outputs (the residual sum too) comes after it
        replacements[id(min(chain, key=lambda n: order[id(n)]))] = fused
    if replacements:
        kept = [replacements.get(id(n), n) for n in nodes if id(n) not in removed or id(n) in replacements]
        del graph.node[:]
        graph.node.extend(kept)
        # the constants only the removed nodes read (2.0, the epsilon, the axes) go too: ONNX Runtime
        # warns about every unused initializer at load
        read = {name for node in kept for name in node.input}
        dropped = {name for node in nodes if id(node) in removed for name in node.input} - read
        stale = [t for t in graph.initializer if t.name in dropped]
        for tensor in stale:
            graph.initializer.remove(tensor)
    return {op: n for op, n in counts.items() if n}


def _dims(value_info: Any) -> tuple[Any, ...] | None:
    tensor = value_info.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return tuple(d.dim_param or d.dim_value or None for d in tensor.shape.dim)


def _last_axis_mean(mean: Any, value: Any) -> bool:
    attrs = {a.name: a for a in mean.attribute}
    if "keepdims" in attrs and attrs["keepdims"].i != 1:
        return False
    if "axes" in attrs:
        axes = list(attrs["axes"].ints)
    elif len(mean.input) > 1:
        found = value(mean.input[1])
        axes = [] if found is None else found.reshape(-1).tolist()
    else:
        return False
    return axes == [-1]


def _is_residual_add(node: Any, consts: dict[str, Any], shapes: dict[str, Any], removed: set[int]) -> bool:
    """An ``Add`` of two computed tensors of one known, identical rank-3 shape (no broadcasting):
    the only form ``SkipSimplifiedLayerNormalization`` is given here."""
    if node is None or node.op_type != "Add" or id(node) in removed:
        return False
    a, b = node.input
    if a in consts or b in consts:
        return False
    shape_a, shape_b = shapes.get(a), shapes.get(b)
    return shape_a is not None and shape_a == shape_b and len(shape_a) == 3 and None not in shape_a
