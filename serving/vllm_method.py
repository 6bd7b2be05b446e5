"""eigenpatch checkpoints in vLLM: a quantization method whose linear method runs factor pairs.

Why a quantization method and not patched model classes: vLLM already routes every Linear of
every architecture it knows through ``quant_config.get_quant_method(layer, prefix)``, chosen by
``config.json["quantization_config"]["quant_method"]``. One linear method therefore serves
Llama, Qwen2, Mistral, ... with no per-architecture code, and vLLM keeps its own attention,
KV cache, fused kernels for dense layers, and tensor-parallel communication.

Layouts (``r_s`` = rank of shard ``s``, ``o_s`` = its output rows on this TP rank):

* **Column-parallel** layers (``QKVParallelLinear``, ``MergedColumnParallelLinear``,
  ``ColumnParallelLinear``, ``ReplicatedLinear``), possibly fused from several HF Linears with
  different ranks, some of them left dense:
  ``lowrank_down [Σ r_s, in]`` replicated (every rank needs the whole input projection),
  ``lowrank_up`` one flat buffer holding each shard's ``[o_s, r_s]`` rows for this rank, and
  ``weight [Σ o_s(dense), in]`` for shards that stayed dense. One GEMM computes every shard's
  latent and every dense shard's rows (the two stacked after loading), one small GEMM per
  latent slice expands it; no communication (as a dense column layer).
* **Row-parallel** layers (``RowParallelLinear``: o_proj, down_proj): ``lowrank_down [r, in/tp]``
  split by input columns, ``lowrank_up [out, r]`` replicated; each rank's partial output is
  summed by the layer's own all-reduce, exact by linearity; the bias is added on rank 0 only,
  as vLLM already does for dense layers.

Checkpoint tensors keep their HF names (``…q_proj.lowrank_down``): vLLM's stacked-name mapping
turns them into ``…qkv_proj.lowrank_down`` tagged with shard id ``"q"``, and the loaders below
place each shard. The tensor-parallel placement is plain index arithmetic, kept in
:mod:`eigenpatch.serving.sharding` so it is unit-tested without vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import Parameter
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethodBase,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
from vllm.platforms import current_platform

from eigenpatch.format import (
    BLOCK_KINDS,
    DOWN_NAME,
    FACTOR_KINDS,
    FORMAT_VERSION,
    LAYER_KINDS,
    QUANTIZED_KINDS,
    UP_NAME,
)
from eigenpatch.serving.sharding import column_shard_rows, row_shard_columns

QKV_SHARDS = {"q": 0, "k": 1, "v": 2}


def _shard_index(shard_id: Any) -> int:
    if shard_id is None:
        return 0
    if isinstance(shard_id, str):
        return QKV_SHARDS[shard_id]
    return int(shard_id)


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"eigenpatch: {what} has shape {tuple(src.shape)}; the config implies {tuple(dst.shape)}")
    dst.copy_(src)


@dataclass(frozen=True)
class Shard:
    """One HF Linear inside a (possibly fused) vLLM column layer, as laid out on this TP rank."""

    name: str
    rank: int | None  # None: this shard stayed dense
    rows: int  # output rows on this rank
    latent_offset: int  # where its latent starts in lowrank_down (low-rank shards)
    up_offset: int  # where its [rows, rank] block starts in the flat lowrank_up
    dense_offset: int  # where its rows start in weight (dense shards)


class LowRankLinearMethod(LinearMethodBase):
    """Factor pairs (and dense shards) for one vLLM Linear; see the module docstring for layouts."""

    def __init__(self, shard_names: list[str], ranks: list[int | None], shares: list[int | None] | None = None) -> None:
        self.shard_names = shard_names
        self.ranks = ranks
        #: shares[i] = j: shard i reads shard j's latent (``lowrank_shared``: gate and up, one input factor)
        self.shares = shares or [None] * len(ranks)

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        extra_weight_attrs.pop("weight_loader", None)  # the layer's loaders assume one dense weight
        if isinstance(layer, RowParallelLinear):
            self._create_row(layer, input_size_per_partition, input_size, output_size, params_dtype)
        else:
            self._create_column(layer, input_size_per_partition, output_partition_sizes, params_dtype)

    def _create_row(self, layer: Any, in_local: int, in_full: int, out: int, dtype: torch.dtype) -> None:
        (rank,) = self.ranks
        if rank is None:
            raise ValueError(f"eigenpatch: {self.shard_names[0]} is dense but was given the low-rank method")
        start, length = row_shard_columns(in_full, in_local, layer.tp_rank)
        down = Parameter(torch.empty(rank, in_local, dtype=dtype), requires_grad=False)
        up = Parameter(torch.empty(out, rank, dtype=dtype), requires_grad=False)
        name = self.shard_names[0]

        def load_down(param: Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
            _copy(param.data, loaded.narrow(1, start, length), f"{name}.{DOWN_NAME} (columns {start}:+{length})")

        def load_up(param: Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
            _copy(param.data, loaded, f"{name}.{UP_NAME}")

        down.weight_loader, up.weight_loader = load_down, load_up
        layer.register_parameter(DOWN_NAME, down)
        layer.register_parameter(UP_NAME, up)
        layer.eigenpatch_shards = None

    def _create_column(self, layer: Any, in_size: int, local_rows: list[int], dtype: torch.dtype) -> None:
        if len(local_rows) != len(self.shard_names):
            raise ValueError(f"eigenpatch: {self.shard_names} map to {len(local_rows)} output shards")
        column_parallel = isinstance(layer, ColumnParallelLinear)  # ReplicatedLinear holds every row
        tp_rank = layer.tp_rank if column_parallel else 0
        kv_replicas = getattr(layer, "num_kv_head_replicas", 1) if isinstance(layer, QKVParallelLinear) else 1
        shards, starts = [], []
        latent = up = dense = 0
        for i, (name, rank, rows) in enumerate(zip(self.shard_names, self.ranks, local_rows, strict=True)):
            shard_replicas = kv_replicas if i > 0 else 1  # k and v of a QKV layer may be replicated
            full = rows * (layer.tp_size // shard_replicas if column_parallel else 1)
            starts.append(column_shard_rows(full, rows, tp_rank, shard_replicas)[0])
            owner = self.shares[i]
            shard_latent = latent if owner is None else shards[owner].latent_offset
            shards.append(Shard(name, rank, rows, shard_latent, up, dense))
            if rank is None:
                dense += rows
            else:
                latent += rank if owner is None else 0  # a shared input factor is stored (and run) once
                up += rows * rank
        layer.eigenpatch_shards = tuple(shards)
        params = {DOWN_NAME: (latent, in_size), UP_NAME: (up,), "weight": (dense, in_size)}
        for pname, shape in params.items():
            if shape[0] == 0:
                continue
            param = Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
            param.weight_loader = self._column_loader(pname, shards, starts)
            layer.register_parameter(pname, param)

    @staticmethod
    def _column_loader(pname: str, shards: list[Shard], starts: list[int]) -> Any:
        def load(param: Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
            i = _shard_index(shard_id)
            s, start = shards[i], starts[i]
            if (pname == "weight") != (s.rank is None):
                kind = "dense" if s.rank is None else "low-rank"
                raise ValueError(f"eigenpatch: checkpoint has {s.name}.{pname} but the config says {s.name} is {kind}")
            if pname == DOWN_NAME:
                _copy(param.data[s.latent_offset : s.latent_offset + s.rank], loaded, f"{s.name}.{DOWN_NAME}")
            elif pname == UP_NAME:
                block = param.data[s.up_offset : s.up_offset + s.rows * s.rank].view(s.rows, s.rank)
                _copy(block, loaded.narrow(0, start, s.rows), f"{s.name}.{UP_NAME} (rows {start}:+{s.rows})")
            else:
                rows = param.data[s.dense_offset : s.dense_offset + s.rows]
                _copy(rows, loaded.narrow(0, start, s.rows), f"{s.name}.weight (rows {start}:+{s.rows})")

        return load

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Give every factor the GEMM vLLM gives dense layers (packed oneDNN / sgl kernels on CPU),
        with as few GEMM calls as the layout allows.

        Measured on the 2-core CPU machine: with plain ``F.linear`` in bf16 the patched SmolLM2
        decoded at 0.70x the dense speed; the packed kernels are what the dense layers use.
        A column layer's first stage is **one** GEMM: its stacked ``down`` factors and the rows of
        its dense shards, read from one packed matrix (at batch 1 a packed call costs 7-9 us, as
        much as streaming ~0.4 MB). The second stage is one GEMM per latent slice: a
        block-diagonal single GEMM reads zeros and gave no measurable gain in the server, a
        rank-padded batched one was slower (``docs/serving.md``). The loading buffers are then
        released: the packed copies are what runs.
        """
        shards = layer.eigenpatch_shards
        gemms = nn.ModuleDict()
        if shards is None:
            gemms["down"], gemms["up"] = Gemm(getattr(layer, DOWN_NAME)), Gemm(getattr(layer, UP_NAME))
        else:
            stages = [getattr(layer, n) for n in (DOWN_NAME, "weight") if hasattr(layer, n)]
            gemms["first"] = Gemm(torch.cat(stages) if len(stages) > 1 else stages[0])
            latent = getattr(layer, DOWN_NAME).shape[0] if hasattr(layer, DOWN_NAME) else 0
            up = getattr(layer, UP_NAME, None)
            layer.eigenpatch_segments = _segments(shards, latent)
            for i, (kind, start, length, rows) in enumerate(layer.eigenpatch_segments):
                if kind == "lowrank":  # consecutive shards reading one latent (gate + up) expand in one GEMM
                    offset = next(s.up_offset for s in shards if s.rank is not None and s.latent_offset == start)
                    gemms[f"up{i}"] = Gemm(up[offset : offset + rows * length].view(rows, length))
        layer.eigenpatch_gemms = gemms
        for name in (DOWN_NAME, UP_NAME, "weight"):
            if hasattr(layer, name):
                param = getattr(layer, name)
                setattr(layer, name, Parameter(torch.empty(0, dtype=param.dtype), requires_grad=False))

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        gemms = layer.eigenpatch_gemms
        if layer.eigenpatch_shards is None:  # row-parallel: this rank's partial sum; the layer all-reduces it
            y = gemms["up"](gemms["down"](x))
            return y if bias is None else y + bias
        first = gemms["first"](x)  # [latents of every low-rank shard | outputs of every dense shard]
        outputs = []
        for i, (kind, start, length, _) in enumerate(layer.eigenpatch_segments):  # fixed layout: traced once
            piece = first[..., start : start + length]
            outputs.append(piece if kind == "dense" else gemms[f"up{i}"](piece))
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        return y if bias is None else y + bias


def _segments(shards: tuple[Shard, ...], latent: int) -> tuple[tuple[str, int, int, int], ...]:
    """``(kind, start, length, rows)`` runs of the output, indexing the first-stage GEMM's output
    ``[latents (latent wide) | dense rows]``: dense rows (``start``/``length``: their columns) or a
    low-rank expansion (``start``/``length``: the latent slice it reads, ``rows``: outputs).
    Adjacent dense shards are one slice (their rows are stored in order), and consecutive low-rank
    shards that read the same latent slice expand in one GEMM."""
    segments: list[list[Any]] = []
    for s in shards:
        if s.rank is None and segments and segments[-1][0] == "dense":  # adjacent dense rows: one slice
            segments[-1][2] += s.rows
            segments[-1][3] += s.rows
        elif s.rank is None:
            segments.append(["dense", latent + s.dense_offset, s.rows, s.rows])
        elif segments and segments[-1][0] == "lowrank" and segments[-1][1:3] == [s.latent_offset, s.rank]:
            segments[-1][3] += s.rows
        else:
            segments.append(["lowrank", s.latent_offset, s.rank, s.rows])
    return tuple(tuple(seg) for seg in segments)


class Gemm(nn.Module):
    """One weight matrix behind the GEMM vLLM picks for this platform (packed kernels on CPU)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = Parameter(weight.detach().contiguous().clone(), requires_grad=False)
        self.cpu_linear: Any = None
        if current_platform.is_cpu():
            dispatch_cpu_unquantized_gemm(self, remove_weight=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_linear is not None:
            return self.cpu_linear(x, self.weight, None)
        return F.linear(x, self.weight)


class EigenpatchVllmConfig(QuantizationConfig):
    """vLLM's view of ``quantization_config = {"quant_method": "eigenpatch", ...}`` (docs/FORMAT.md)."""

    def __init__(
        self, layers: dict[str, dict[str, Any]], interventions: dict[str, dict[str, Any]] | None = None
    ) -> None:
        super().__init__()
        unknown = sorted({spec.get("kind") for spec in layers.values()} - set(LAYER_KINDS))
        if unknown:
            raise ValueError(f"eigenpatch: this vLLM plugin cannot serve layer kind(s) {unknown}; upgrade eigenpatch")
        self.layers = layers
        #: hidden-state modules on decoder layers, attached by ``vllm_interventions`` at model creation
        self.interventions = dict(interventions or {})

    def get_name(self) -> str:
        return "eigenpatch"

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # plain GEMMs: any device vLLM runs on

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> EigenpatchVllmConfig:
        version = config.get("version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ValueError(f"eigenpatch checkpoint format {version} is newer than this plugin ({FORMAT_VERSION})")
        return cls(dict(config.get("layers", {})), config.get("interventions"))

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        # vLLM passes a rename-only mapper (stacked names dropped): q_proj stays q_proj here.
        self.layers = hf_to_vllm_mapper.apply_dict(self.layers)
        self.interventions = hf_to_vllm_mapper.apply_dict(self.interventions)

    def shard_names(self, prefix: str) -> list[str]:
        """HF Linear names behind the vLLM layer ``prefix`` (``…qkv_proj`` -> q/k/v_proj)."""
        parent, _, leaf = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(leaf)
        if not parts:
            return [prefix]
        return [f"{parent}.{p}" if parent else p for p in parts]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> LinearMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None  # embeddings, lm_head, attention: vLLM's defaults
        names = self.shard_names(prefix)
        specs = [self.layers.get(n) for n in names]
        if all(spec is None for spec in specs):
            return UnquantizedLinearMethod()
        kinds = {spec["kind"] if spec else "dense" for spec in specs}
        if kinds <= set(BLOCK_KINDS):
            from eigenpatch.serving.vllm_structured import BlockLinearMethod

            return BlockLinearMethod(names, specs)
        if kinds <= set(QUANTIZED_KINDS):
            from eigenpatch.serving.vllm_quantized import QuantizedLinearMethod

            return QuantizedLinearMethod(names, specs)
        if not kinds <= {"dense", *FACTOR_KINDS}:
            raise ValueError(f"eigenpatch: {prefix} fuses {sorted(kinds)} layers; vLLM cannot run them as one layer")
        if any(spec and spec.get("down_from") and spec["down_from"] not in names for spec in specs):
            raise ValueError(f"eigenpatch: {prefix} reads an input factor owned by a Linear outside it")
        ranks = [spec["rank"] if spec else None for spec in specs]
        shares = [names.index(spec["down_from"]) if spec and spec.get("down_from") else None for spec in specs]
        return LowRankLinearMethod(names, ranks, shares)
