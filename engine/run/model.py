"""A loaded model: hyperparameters, weights as memory-mapped views in their GGUF encoding, and
`eval_logits` over a KV cache.

Nothing here knows a family. The family module (`engine.arch.family(arch)`) provides

    forward_layer(model, il, x, batch) -> x     one block (required)
    embed(model, tokens) -> x                   optional; default: token_embd rows
    output(model, x) -> logits                  optional; default: output_norm, then output

and reads its tensors through `model.layers[il]` and `model.tensor(name)`; `model.ops` is the
op set, routed to each weight's device (engine.backends.dispatch).

Every layer has a home device: the device of its attention (the placement's
`layer_home_device`). Its KV cache, its 1-D tensors (norms, biases) and its rope tables live
there, and the activation moves there before the layer runs; the logits come back to the host.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np

from engine import arch
from engine.arch.plausible import checked_hyperparams
from engine.run.bus_guard import install_bus_guard
from engine.backends import Weight
from engine.backends.cpu import CpuBackend, dequantize_rows, q8_0_rounded
from engine.gguf.model_file import ModelFile, ModelFileError
from engine.run.kv_cache import KVCache
from engine.run.recurrent_state import HybridCache
from engine.arch.kv_rotation import is_quantized, rotation_for
from engine.arch.layers import RopeScaling, apply_rope, namespace, rope_cos_sin
from engine.backends.dispatch import PlacedOps, make_backends, place_weight
from engine.run_config import RunConfig

OUTPUT_FALLBACK = "token_embd.weight"   # llama.cpp's tied output when output.weight is absent


class UnsupportedTensorTypeError(ValueError):
    pass


class NonFiniteError(FloatingPointError):
    """A layer produced NaN or infinity; the message names the first one."""


class LayerTensors:
    """The tensors of one block, by GGUF name without `blk.N.` and `.weight`: `lw.attn_q`,
    `lw.get("attn_q.bias")`. Matrices are `Weight`s; 1-D tensors are float32 arrays."""

    def __init__(self, il: int, tensors: dict[str, Weight | np.ndarray]):
        self.il = il
        self.tensors = tensors

    def __getattr__(self, name: str):
        try:
            return self.__dict__["tensors"][name]
        except KeyError:
            raise AttributeError(f"layer {self.__dict__.get('il')} has no tensor {name!r}") from None

    def get(self, name: str, default=None):
        return self.tensors.get(name, default)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors


def _short_name(name: str) -> tuple[int, str] | None:
    """("blk.3.attn_q.weight") -> (3, "attn_q"); ("blk.3.attn_q.bias") -> (3, "attn_q.bias")."""
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != "blk" or not parts[1].isdigit():
        return None
    short = ".".join(parts[2:])
    return int(parts[1]), short[: -len(".weight")] if short.endswith(".weight") else short


class Model:
    def __init__(self, model_file: ModelFile, run_config: RunConfig | None = None, backend=None, placement=None):
        self.file = model_file
        install_bus_guard()     # a file truncated mid-run gives an error, not a SIGBUS (engine.run.bus_guard)
        self.metadata = model_file.metadata
        self.family = arch.family(model_file.architecture)
        self._check_types()
        self.hparams = checked_hyperparams(self.family, self.metadata,
                                           {name: t.shape for name, t in model_file.tensors.items()})
        self._check_tensors()
        self.run_config = run_config or RunConfig()
        n_layer = self.hparams.n_layer
        # a placement with everything on the CPU runs straight from the memory map
        if placement is not None and not any(n for d, n in placement.weight_bytes().items() if d != "CPU"):
            placement = None
        self.placement = placement
        if placement is None:
            self.ops = PlacedOps({"CPU": backend or CpuBackend(self.run_config.activations)})
            tensor_devices, self.homes, self.output_home = {}, ["CPU"] * n_layer, "CPU"
        else:
            self.ops = PlacedOps(make_backends(placement.devices, self.run_config.activations))
            tensor_devices = placement.tensor_devices()
            self.homes = [placement.layer_home_device(il) for il in range(n_layer)]
            self.output_home = placement.output_device()
        self.globals: dict[str, Weight | np.ndarray] = {}      # 1-D globals stay host arrays (see vector_here)
        self.layers = [LayerTensors(il, {}) for il in range(n_layer)]
        self._vectors: dict = {}
        for name, info in model_file.tensors.items():
            tensor = self._load_tensor(name, info)
            where = _short_name(name)
            in_layer = where is not None and where[0] < n_layer
            if isinstance(tensor, Weight):
                tensor = place_weight(tensor, tensor_devices.get(name, "CPU"), self.ops.backends)
            elif in_layer:          # norms and biases live on the layer's home device
                tensor = self.ops.backends[self.homes[where[0]]].upload_vector(tensor)
            if in_layer:
                self.layers[where[0]].tensors[where[1]] = tensor
            else:
                self.globals[name] = tensor
        scaling = getattr(self.family, "rope_scaling", RopeScaling.from_metadata)
        self.rope_scaling = scaling(self.metadata, self.hparams)      # once per model
        self.expert_counts = np.zeros((self.hparams.n_layer, self.hparams.n_expert), dtype=np.int64)   # router selections

    @classmethod
    def load(cls, source: ModelFile | str | os.PathLike, run_config: RunConfig | None = None, backend=None,
             placement=None) -> Model:
        """A model over memory-mapped weights; with a placement, each weight on its device."""
        model_file = source if isinstance(source, ModelFile) else ModelFile(source)
        return cls(model_file, run_config, backend, placement)

    # --- loading --------------------------------------------------------------------------------

    def _check_types(self) -> None:
        reasons = self.file.unsupported_types()
        if reasons:
            shown = "; ".join(f"{name} {why}" for name, why in list(reasons.items())[:3])
            more = f" (and {len(reasons) - 3} more tensors)" if len(reasons) > 3 else ""
            raise UnsupportedTensorTypeError(f"{self.file.path}: cannot run this model: {shown}{more}")

    def _check_tensors(self) -> None:
        tied = "output.weight" not in self.file.tensors
        for spec in self.family.tensor_specs(self.hparams, tied):
            info = self.file.tensors.get(spec.name)
            if info is None:
                if not spec.optional:
                    raise ModelFileError(self.file.path, f"tensor {spec.name!r} is missing")
            elif not spec.accepts(info.shape):
                raise ModelFileError(self.file.path, f"tensor {spec.name!r} has shape {info.shape}; "
                                                     f"the hyperparameters call for {spec.shape}")

    def _load_tensor(self, name: str, info) -> Weight | np.ndarray:
        data = self.file.tensor_data(name)
        if len(info.shape) == 1:        # norms, biases, rope factors: small, used whole on the host
            return dequantize_rows(data, info.ggml_type, info.shape[0]).reshape(info.shape)
        return Weight(name, data, info.ggml_type, info.shape)

    def tensor(self, name: str) -> Weight | np.ndarray | None:
        """A global tensor: a Weight, or for a 1-D one the host array (see vector_here)."""
        return self.globals.get(name)

    def vector_here(self, name: str):
        """A global 1-D tensor (rope_freqs, output_norm) on the device activations are on now,
        copied there once per device; None when the model has no such tensor."""
        host = self.globals.get(name)
        if host is None:
            return None
        key = (name, self.ops.home)
        cached = self._vectors.get(key)
        if cached is None or cached[0] is not host:
            cached = self._vectors[key] = (host, self.ops.home_backend.upload_vector(host))
        return cached[1]

    @property
    def output_weight(self) -> Weight:
        return self.globals.get("output.weight") or self.globals[OUTPUT_FALLBACK]

    # --- the default embedding and head (families may replace them) -----------------------------

    def embed_tokens(self, tokens: np.ndarray):
        return self.ops.embedding(self.globals["token_embd.weight"], tokens)

    def output_logits(self, x):
        x = self.ops.rms_norm(x, self.vector_here("output_norm.weight"), self.hparams.rms_eps)
        return self.ops.matmul(x, self.output_weight)

    # --- running ----------------------------------------------------------------------------------

    def new_cache(self, n_ctx: int | None = None) -> KVCache:
        config = self.run_config if n_ctx is None else self.run_config.replace(n_ctx=n_ctx)
        hp, homes = self.hparams, [self.ops.backends[device] for device in self.homes]
        if any(hp.is_recurrent(il) for il in range(hp.n_layer)):
            return HybridCache(hp, config, homes)   # KV for the attention layers, recurrent state for the rest
        return KVCache(hp, config, homes)

    def eval_logits(self, tokens, cache: KVCache | None = None, positions=None, *, last_only: bool = False,
                    progress: Callable[[int, int], None] | None = None,
                    check_cancelled: Callable[[], None] | None = None) -> np.ndarray:
        """Logits float32 (n_tokens, n_vocab) for every token (or (1, n_vocab) for the last one with
        last_only), evaluated in ubatches through the cache. Without a cache, a fresh one is used;
        positions default to continuing after the cache's n_past.

        `check_cancelled` is called before every layer and stops the evaluation by raising (the
        caller's own cancellation exception): a long ubatch stops within a layer, not at its end.
        The cache then holds a partly written ubatch; the caller resets it."""
        tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
        if len(tokens) == 0:
            raise ValueError("no tokens to evaluate")
        bad = tokens[(tokens < 0) | (tokens >= self.hparams.n_vocab)]
        if len(bad):
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary of {self.hparams.n_vocab}")
        if cache is None:
            cache = self.new_cache(len(tokens) if positions is None else int(np.max(positions)) + 1)
        positions = (cache.n_past + np.arange(len(tokens))) if positions is None else np.asarray(positions)
        positions = positions.astype(np.int64).reshape(-1)
        if len(positions) != len(tokens):
            raise ValueError(f"{len(tokens)} tokens but {len(positions)} positions")
        cache.check_positions(positions)
        self.ops.set_threads(self.run_config.n_threads)
        step = cache.n_ubatch
        chunks = []
        for start in range(0, len(tokens), step):
            end = min(len(tokens), start + step)
            logits = self._eval_ubatch(tokens[start:end], positions[start:end], cache,
                                       skip_output=last_only and end < len(tokens), last_only=last_only,
                                       check_cancelled=check_cancelled)
            if logits is not None:
                chunks.append(logits)
            if progress is not None:
                progress(end, len(tokens))
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def _eval_ubatch(self, tokens, positions, cache: KVCache, skip_output: bool, last_only: bool,
                     check_cancelled: Callable[[], None] | None = None):
        if len(tokens) == 1 and not skip_output:       # a decode step: CUDA graphs where the placement allows
            from engine.run.graph_decode import graph_decode
            logits = graph_decode(self, tokens, positions, cache, check_cancelled)
            if logits is not None:
                return logits
        ops = self.ops
        batch = UBatch(self.hparams, positions, cache, ops)
        ops.enter(self.homes[0])
        embed = getattr(self.family, "embed", None)
        x = embed(self, tokens) if embed else self.embed_tokens(tokens)
        self.file.check_unchanged()
        for il in range(self.hparams.n_layer):
            if check_cancelled is not None:
                check_cancelled()
            x = self._enter(x, self.homes[il])
            x = self.family.forward_layer(self, il, x, batch)
            # a file truncated under the memory map: the bus guard let the layer read zeros; say so
            self.file.check_unchanged()
            check_finite(ops, x, f"layer {il}", self.kv_hint)
        cache.n_past = max(cache.n_past, int(positions.max()) + 1)
        if skip_output:
            return None
        if last_only:
            x = x[-1:, ...]
        x = self._enter(x, self.output_home)
        output = getattr(self.family, "output", None)
        logits = ops.to_host(output(self, x) if output else self.output_logits(x))
        check_finite(ops, logits, "the output layer", self.kv_hint)
        return logits

    def _enter(self, x, device: str):
        """The activation moved to `device`, which becomes the home of what runs next."""
        x = self.ops.move(x, self.ops.home, device)
        self.ops.enter(device)
        return x

    @property
    def kv_hint(self) -> str:
        """What to try when values blow up: a quantized KV cache is the usual cause."""
        rc = self.run_config
        if {rc.type_k, rc.type_v} <= {"f32", "f16"}:
            return f" (KV cache {rc.type_k}/{rc.type_v})"
        return f" (KV cache {rc.type_k}/{rc.type_v}: try -ctk q8_0 -ctv q8_0, or f16)"

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class UBatch:
    """One ubatch in flight: host positions, the KV cache, and per device the positions and the
    rope tables shared by the layers living there."""

    def __init__(self, hparams, positions: np.ndarray, cache, ops: PlacedOps):
        self.hparams = hparams
        self.positions = positions
        self.cache = cache
        self.ops = ops
        self._device_positions: dict = {}
        self._rope_tables: dict = {}

    @property
    def n_tokens(self) -> int:
        return len(self.positions)

    def device_positions(self):
        """The positions (n_tokens,) int64 on the current layer's home device."""
        home = self.ops.home
        if home not in self._device_positions:
            self._device_positions[home] = self.ops.home_backend.to_device(self.positions)
        return self._device_positions[home]

    def rope_tables(self, n_dims: int, base: float, scaling: RopeScaling, freq_factors=None):
        """(cos, sin) (T, n_dims/2) of these positions on the current home device, built once."""
        key = (self.ops.home, n_dims, base, scaling, None if freq_factors is None else id(freq_factors))
        if key not in self._rope_tables:
            # the factors are part of the key by identity: keep them alive as long as the table
            self._rope_tables[key] = (rope_cos_sin(self.device_positions(), n_dims, base, scaling, freq_factors),
                                      freq_factors)
        return self._rope_tables[key][0]

    def rope(self, x, n_dims: int, base: float, scaling: RopeScaling, neox: bool, freq_factors=None):
        """x (T, n_head, head_dim) rotated by its tokens' positions, tables built on x's device."""
        return apply_rope(x, *self.rope_tables(n_dims, base, scaling, freq_factors), neox)

    def rope_qk(self, q, k, n_dims: int, base: float, scaling: RopeScaling, neox: bool, q_scale: float = 1.0,
                freq_factors=None):
        """q and k rotated in one op of the home device (`rope`), q then times q_scale."""
        return self.ops.rope_qk(q, k, *self.rope_tables(n_dims, base, scaling, freq_factors), neox, q_scale)

    def attend(self, il: int, q, k, v, kq_scale: float, v_from_k: int = 0):
        """Store this ubatch's k/v (T, n_head_kv, d) in layer il's cache and attend over the cache
        on the layer's home device. v None: the values are the first v_from_k entries of each key
        (MLA's latent)."""
        step = self.cache.step(il, self.positions)
        layout = self.cache.layers[il].layout
        # a quantized cache holds Hadamard-rotated heads, as llama.cpp's does (not for MLA's shared latent)
        rotation = None if v is None else rotation_for(q.shape[-1], v.shape[-1], layout.type_k, layout.type_v)
        if rotation:
            q, k = rotation.queries_keys(q, k)
            v = rotation.values(v)
        backend = self.ops.home_backend
        if getattr(backend, "round_inputs", False) and is_quantized(layout.type_k) and type(q) is np.ndarray:
            # llama.cpp dots a quantized key with the query in its vec_dot type (Q8_0), flash attention or not
            q = q8_0_rounded(np.ascontiguousarray(q, dtype=np.float32))
        out = backend.attend(self.cache.layers[il], step, self.device_positions(), q, k, v, kq_scale, v_from_k)
        return rotation.output(out, q.shape[1]) if rotation else out


def check_finite(ops: PlacedOps, x, where: str, hint: str = "") -> None:
    # on the host, the largest and smallest value: a NaN anywhere makes both NaN, an infinity one
    # of them infinite, and two SIMD reductions over a vocabulary's logits cost a quarter of a
    # float64 sum; on a device, one reduction read back: NaN or inf anywhere makes the sum so
    if type(x) is np.ndarray:
        finite = np.isfinite(x.max()) and np.isfinite(x.min())
    else:
        xp = namespace(x)
        finite = np.isfinite(ops.to_host(xp.sum(x, dtype=xp.float64)))
    if not finite:
        raise NonFiniteError(f"{where} produced non-finite values (NaN or inf); the weights, the "
                             f"quantization or the inputs are bad from there on{hint}")
