"""Tensor parallelism on a ("data", "model") mesh: which dimension of each weight "model" splits, the
mesh checks, and the per-chip memory of a layout.

Megatron's split, the one `nnx.py` annotates: the q/k/v, gate and up projections split their output
columns (heads, intermediate) over "model", the o and down projections their input rows, so a layer
needs one all-reduce after attention and one after the MLP; the embedding splits its vocabulary rows and
the lm_head its vocabulary columns; norms, q/k norms and the o bias are replicated. Nothing is split over
"data", which holds whole rows of the batch.

A dimension that does not divide by the model axis is replicated. For KV heads (8 KV heads on 16 chips)
that is the usual GQA practice: every device then projects and keeps all KV heads, so the KV buffer is
not split over "model" either (`per_chip_bytes` counts it whole).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .config import CompressionConfig, ModelConfig
from .kv_cache import KVCache, quantized_fields
from .model import param_shapes

DATA, MODEL = "data", "model"

# param name -> (the dimension split over "model", the ModelConfig size that must divide by the axis)
_SPLIT = {
    "wq": (1, "num_heads"),
    "bq": (0, "num_heads"),
    "wo": (0, "num_heads"),
    "wk": (1, "num_kv_heads"),
    "wv": (1, "num_kv_heads"),
    "bk": (0, "num_kv_heads"),
    "bv": (0, "num_kv_heads"),
    "w_gate": (1, "intermediate_size"),
    "w_up": (1, "intermediate_size"),
    "w_down": (0, "intermediate_size"),
    "embed": (0, "vocab_size"),
    "lm_head": (1, "vocab_size"),
}


def param_spec(name: str, ndim: int, config: ModelConfig, model_size: int) -> P:
    """The PartitionSpec of the weight `name` (a key of `model.py`'s params, `ndim` dimensions) for a
    "model" axis of model_size devices: Megatron's split, replicated where it does not divide."""
    split = _SPLIT.get(name)
    if split is None or getattr(config, split[1]) % model_size:
        return P(*(None,) * ndim)
    return P(*(MODEL if i == split[0] else None for i in range(ndim)))


def param_partition_specs(config: ModelConfig, model_size: int) -> dict:
    """The params pytree (`param_shapes`' layout) of PartitionSpecs for a "model" axis of model_size
    devices: Megatron's split, each dimension that does not divide by model_size replicated."""
    if not (isinstance(model_size, int) and model_size >= 1):
        raise ValueError(f"model_size must be a positive int, got {model_size!r}")

    def spec(path, shape):
        found = param_spec(path[-1].key, len(shape.shape), config, model_size)
        return found if MODEL in found else P()

    return jax.tree_util.tree_map_with_path(spec, param_shapes(config))


def model_axis_size(mesh: Mesh) -> int:
    """Devices on the mesh's "model" axis (1 for a mesh without one)."""
    return mesh.shape[MODEL] if MODEL in mesh.axis_names else 1


def param_shardings(config: ModelConfig, mesh: Mesh) -> dict:
    """NamedShardings of the params on mesh (`param_partition_specs`); replicated on a mesh with no
    "model" axis. `longflow_jax.load(dir, mesh=mesh)` restores each weight straight into these shards."""
    if MODEL not in mesh.axis_names:
        return jax.tree.map(lambda _: NamedSharding(mesh, P()), param_shapes(config))
    specs = param_partition_specs(config, mesh.shape[MODEL])
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def data_axis(mesh: Mesh, batch: int) -> str:
    """The axis that splits the rows: a 1-D mesh's one axis, or "data" of a ("data", "model") mesh.
    ValueError for any other mesh, or when its rows do not divide the batch."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    names = tuple(mesh.axis_names)
    if len(names) != 1 and names != (DATA, MODEL):
        raise ValueError(f"mesh must be 1-D (rows) or have the axes ({DATA!r}, {MODEL!r}), got {names}")
    axis = names[0]
    if batch % mesh.shape[axis]:
        raise ValueError(f"the mesh's {axis!r} axis ({mesh.shape[axis]} devices) must divide batch {batch}")
    return axis


def parse_mesh_shape(text: str) -> tuple[int, int]:
    """ "data=2,model=4" -> (2, 4); a missing axis is 1, a repeated one an error."""
    sizes, seen = {DATA: 1, MODEL: 1}, set()
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in sizes or name in seen or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(
                f"--mesh must look like data=2,model=4 (positive sizes, each axis once), got {text!r}"
            )
        seen.add(name)
        sizes[name] = int(value)
    return sizes[DATA], sizes[MODEL]


def make_mesh(data: int, model: int, devices=None) -> Mesh:
    """A ("data", "model") mesh over the first data * model of devices (default: this process's)."""
    for name, size in ((DATA, data), (MODEL, model)):
        if not (isinstance(size, int | np.integer) and not isinstance(size, bool) and size >= 1):
            raise ValueError(f"make_mesh: {name} must be a positive int, got {size!r}")
    devices = jax.local_devices() if devices is None else list(devices)
    if data * model > len(devices):
        raise ValueError(
            f"a mesh of data={data}, model={model} needs {data * model} devices, got {len(devices)}"
        )
    return Mesh(np.asarray(devices[: data * model]).reshape(data, model), (DATA, MODEL))


def per_chip_param_bytes(config: ModelConfig, model_size: int) -> int:
    """Bytes of weights each device of a "model" axis of model_size holds (`param_partition_specs`)."""
    specs = jax.tree.leaves(param_partition_specs(config, model_size), is_leaf=lambda x: isinstance(x, P))
    shapes = jax.tree.leaves(param_shapes(config))
    return sum(
        math.prod(x.shape) * x.dtype.itemsize // (model_size if MODEL in spec else 1)
        for x, spec in zip(shapes, specs, strict=True)
    )


def per_chip_bytes(
    config: ModelConfig,
    compression: CompressionConfig,
    *,
    batch: int,
    prompt_len: int,
    max_new_tokens: int,
    data: int,
    model: int,
) -> tuple[int, int]:
    """(weight bytes, cache bytes) on each device of a (data, model) mesh running `generate` on
    [batch, prompt_len] prompts: the cache (`kv_cache_bytes`) of batch / data rows, its K/V split over
    "model" when the KV heads divide by it (whole otherwise), its slot bookkeeping whole."""
    from .generate import buffer_capacity, effective_compression, kv_cache_bytes
    from .kv_cache import kv_bytes_for

    if batch % data:
        raise ValueError(f"data={data} must divide batch {batch}")
    rows = batch // data
    capacity = buffer_capacity(effective_compression(compression, prompt_len, max_new_tokens), prompt_len,
                               max_new_tokens)  # fmt: skip
    kv = kv_bytes_for(
        config.num_layers, rows, config.num_kv_heads, capacity, config.head_dim, config.param_dtype,
        compression.kv_quant, compression.kv_quant_group,
    )  # fmt: skip
    bookkeeping = kv_cache_bytes(config, compression, rows, prompt_len, max_new_tokens) - kv
    kv_split = model if config.num_kv_heads % model == 0 else 1
    return per_chip_param_bytes(config, model), kv // kv_split + bookkeeping


def default_mesh_shape(config: ModelConfig, num_devices: int, device_bytes: int | None) -> tuple[int, int]:
    """(data, model) for num_devices: every device on "data" when the weights fit one device's
    device_bytes (None: unknown, taken as fitting), else the smallest "model" axis dividing num_devices
    whose share of the weights fits. ValueError when none does."""
    for model in (m for m in range(1, num_devices + 1) if num_devices % m == 0):
        if device_bytes is None or per_chip_param_bytes(config, model) < device_bytes:
            return num_devices // model, model
    raise ValueError(
        f"the weights do not fit {num_devices} device(s) of {device_bytes} bytes: even split over all of "
        f"them each holds {per_chip_param_bytes(config, num_devices)} bytes"
    )


def model_shards_in_trace() -> int:
    """Devices on the "model" axis that XLA partitions the function being traced over: `generate`'s
    tensor-parallel program runs under a mesh whose "data" axis is manual (`shard_map`) and whose "model"
    axis is automatic. 1 outside such a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or MODEL not in mesh.axis_names or MODEL in mesh.manual_axes:
        return 1
    return mesh.shape[MODEL]


def split_kv_heads(cache: KVCache) -> KVCache:
    """The cache with its K/V buffers (and their scales) split by KV heads over the traced program's
    "model" axis (`model_shards_in_trace`), so XLA keeps each shard's heads where its kernel reads them;
    unchanged without such an axis or when the KV heads do not divide by it (replicated)."""
    shards = model_shards_in_trace()
    if shards == 1 or cache.layers[0].k.shape[1] % shards:
        return cache
    heads = P(None, MODEL)

    def split(layer):
        names = ("k", "v", *quantized_fields(layer))
        return layer.replace(**{n: jax.lax.with_sharding_constraint(getattr(layer, n), heads) for n in names})

    return KVCache(layers=[split(layer) for layer in cache.layers])
