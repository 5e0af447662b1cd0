"""Compute buffers as llama.cpp's scheduler sizes them, derived from its graph allocator.

llama.cpp reserves one compute buffer per backend: it builds the worst-case graph (one ubatch of
`min(n_ctx, n_ubatch)` tokens against the whole KV cache, `min(n_tokens, n_batch)` output rows),
splits it by backend and runs `ggml_gallocr` over it without allocating anything; the buffer
size is the allocator's high-water mark. Here the same graph is built symbolically (shapes,
types, sources and views of every tensor, in the order `ggml_build_forward_expand` visits them)
and a port of the allocator's policy is run over it:

- leafs first, then every node in graph order; a node reuses its parent's memory in place when
  the op allows it, the parent has no other consumer and the layouts agree (`ggml_op_can_inplace`);
- a tensor is freed when its last consumer has run, a view's source when its last view has;
  graph outputs (logits, the final norm) are never freed;
- free space is a sorted list of blocks; a request takes the best-fitting block other than the
  last, else the tail, which grows the buffer (`ggml_dyn_tallocr_alloc`).

Nothing here is fitted: the sizes follow from the graph, so they move with ubatch, context,
flash attention, KV types, output rows and the placement exactly as llama.cpp's do. See
docs/memory-model.md for the per-family graphs and the measured comparison.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from engine import arch
from engine.arch.base import AttentionKind, HyperParams
from engine.gguf import ggml_types
from engine.run_config import RunConfig

CPU_NAME = "CPU"
TENSOR_ALIGNMENT = {"cpu": 32, "cuda": 128}      # ggml-cpu TENSOR_ALIGNMENT, ggml-cuda's buffer alignment
SCHED_MAX_COPIES = 4                            # ggml-backend's copies of the inputs with pipeline parallelism
MIN_OFFLOAD_BATCH = 32                          # ggml-cuda offload_op: CPU weights go to the GPU from 32 tokens
SCALAR_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "i32": 4, "i64": 8}
# ops whose result may overwrite a source (ggml_op_can_inplace)
INPLACE_OPS = frozenset({"SCALE", "ADD", "SUB", "MUL", "DIV", "SQR", "SQRT", "LOG", "UNARY", "ROPE",
                         "RMS_NORM", "CLAMP", "SOFT_MAX", "FILL", "ADD1", "ADD_ID"})


# --- symbolic tensors ------------------------------------------------------------------------

def row_bytes(type_name: str, n: int) -> int:
    if type_name in SCALAR_BYTES:
        return SCALAR_BYTES[type_name] * n
    return ggml_types.row_bytes(ggml_types.type_id_by_name(type_name), n)


def is_quantized(type_name: str) -> bool:
    return type_name not in SCALAR_BYTES


def is_contiguous(t: Tensor) -> bool:
    return t.nb == contiguous_strides(t.type, t.ne)


def contiguous_strides(type_name: str, ne: tuple[int, ...]) -> tuple[int, ...]:
    nb0 = SCALAR_BYTES.get(type_name, 1)
    nb1 = row_bytes(type_name, ne[0])
    return (nb0, nb1, nb1 * ne[1], nb1 * ne[1] * ne[2])


class Tensor:
    """One ggml tensor of the graph: shape in ggml's ne order (ne0 = the contiguous dimension)."""
    __slots__ = ("ne", "nb", "type", "op", "src", "view_src", "external", "is_input", "is_output", "device", "name",
                 "stored_bytes", "_size", "n_children", "n_views", "allocated", "offset")

    def __init__(self, ne, type_name, op="NONE", src=(), view_src=None, nb=None, external=False,
                 device=None, name=""):
        ne = tuple(ne) + (1,) * (4 - len(ne))
        self.ne: tuple[int, int, int, int] = ne
        self.type: str = type_name
        self.nb = tuple(nb) if nb is not None else contiguous_strides(type_name, ne)
        self.op = op
        self.src: tuple[Tensor, ...] = tuple(s for s in src if s is not None)
        self.view_src: Tensor | None = view_src.view_src or view_src if view_src is not None else None
        self.external = external            # weights and the KV cache: memory of their own
        self.is_input = False
        self.is_output = False
        self.device = device
        self.name = name
        self.stored_bytes: int | None = None    # a weight's bytes as stored in the file
        self._size: int | None = None
        self.reset_allocation()

    def reset_allocation(self) -> None:
        """The allocator's bookkeeping (ggml-alloc's hash_node), kept on the tensor for speed."""
        self.n_children = 0
        self.n_views = 0
        self.allocated = False
        self.offset = 0

    @property
    def n_bytes(self) -> int:
        if self.stored_bytes is not None:
            return self.stored_bytes
        if self._size is None:
            self._size = row_bytes(self.type, self.ne[0]) * self.ne[1] * self.ne[2] * self.ne[3]
        return self._size

    def same_layout(self, other: Tensor) -> bool:
        return self.type == other.type and self.ne == other.ne and self.nb == other.nb


class Graph:
    """ggml_cgraph: nodes and leafs in the order ggml_visit_parents_graph adds them."""

    def __init__(self):
        self.nodes: list[Tensor] = []
        self.leafs: list[Tensor] = []
        self._visited: set[int] = set()

    def expand(self, tensor: Tensor) -> None:
        """ggml_build_forward_expand: sources depth-first, left to right, then the tensor."""
        stack = [(tensor, 0)]
        while stack:
            t, i = stack.pop()
            if i == 0:
                if id(t) in self._visited:
                    continue
                self._visited.add(id(t))
            if i < len(t.src):
                stack.append((t, i + 1))
                stack.append((t.src[i], 0))
                continue
            (self.leafs if t.op == "NONE" else self.nodes).append(t)


# --- the ops of the graphs (ggml.c's shape rules) ---------------------------------------------

class Ops:
    """ggml's graph-building functions, shapes and views only."""

    def __init__(self, graph: Graph):
        self.graph = graph

    @staticmethod
    def weight(ne, device: str, name: str, type_name: str = "f16") -> Tensor:
        return Tensor(ne, type_name, external=True, device=device, name=name)

    @staticmethod
    def input(ne, type_name: str, name: str) -> Tensor:
        t = Tensor(ne, type_name, name=name)
        t.is_input = True
        return t

    @staticmethod
    def new(ne, type_name, op, *src) -> Tensor:
        return Tensor(ne, type_name, op=op, src=src)

    @staticmethod
    def dup(a: Tensor, op: str, *src) -> Tensor:
        return Tensor(a.ne, a.type, op=op, src=(a,) + src)

    @staticmethod
    def view(a: Tensor, ne, nb=None, op="VIEW") -> Tensor:
        ne = tuple(ne) + (1,) * (4 - len(ne))
        return Tensor(ne, a.type, op=op, src=(a,), view_src=a, nb=nb or contiguous_strides(a.type, ne))

    def reshape(self, a: Tensor, *ne) -> Tensor:
        return self.view(a, ne, op="RESHAPE")

    def permute(self, a: Tensor, *axes) -> Tensor:
        ne, nb = [0] * 4, [0] * 4
        for i, ax in enumerate(axes + tuple(range(len(axes), 4))):
            ne[ax], nb[ax] = a.ne[i], a.nb[i]
        return self.view(a, ne, nb, op="PERMUTE")

    def transpose(self, a: Tensor) -> Tensor:
        return self.permute(a, 1, 0, 2, 3)

    def view_nb(self, a: Tensor, ne, nb_rows) -> Tensor:
        """ggml_view_Nd with explicit row strides (nb1, nb2, ...)."""
        ne = tuple(ne) + (1,) * (4 - len(ne))
        nb = (a.nb[0],) + tuple(nb_rows) + (0,) * (3 - len(nb_rows))
        return self.view(a, ne, nb)

    def mul_mat(self, a: Tensor, b: Tensor) -> Tensor:
        return self.new((a.ne[1], b.ne[1], b.ne[2], b.ne[3]), "f32", "MUL_MAT", a, b)

    def mul_mat_id(self, a: Tensor, b: Tensor, ids: Tensor) -> Tensor:
        return self.new((a.ne[1], ids.ne[0], b.ne[2], 1), "f32", "MUL_MAT_ID", a, b, ids)

    def get_rows(self, a: Tensor, b: Tensor) -> Tensor:
        return self.new((a.ne[0], b.ne[0], b.ne[1], b.ne[2]), "i32" if a.type == "i32" else "f32",
                        "GET_ROWS", a, b)

    def rms_norm(self, a):
        return self.dup(a, "RMS_NORM")

    def mul(self, a, b):
        return self.dup(a, "MUL", b)

    def add(self, a, b):
        return self.dup(a, "ADD", b)

    def div(self, a, b):
        return self.dup(a, "DIV", b)

    def scale(self, a):
        return self.dup(a, "SCALE")

    def clamp(self, a):
        return self.dup(a, "CLAMP")

    def unary(self, a):
        return self.dup(a, "UNARY")

    def rope(self, a, pos, factors=None):
        return self.dup(a, "ROPE", pos, factors)

    def cont(self, a, *ne):
        return self.new(ne or a.ne, a.type, "CONT", a)

    def glu_split(self, a, b):
        return self.new(a.ne, a.type, "GLU", a, b)

    def sum_rows(self, a):
        return self.new((1,) + a.ne[1:], a.type, "SUM_ROWS", a)

    def concat(self, a, b, dim: int):
        ne = list(a.ne)
        ne[dim] += b.ne[dim]
        return self.new(ne, a.type, "CONCAT", a, b)

    def repeat(self, a, *ne):
        return self.new(ne, a.type, "REPEAT", a)

    def argsort_top_k(self, a, k: int):
        order = self.new(a.ne, "i32", "ARGSORT", a)
        return self.view(order, (k,) + a.ne[1:], order.nb, op="VIEW")

    def soft_max(self, a, mask=None):
        return self.dup(a, "SOFT_MAX", mask)

    def set_rows(self, cache: Tensor, b: Tensor, idxs: Tensor) -> Tensor:
        t = Tensor(cache.ne, cache.type, op="SET_ROWS", src=(b, idxs, cache), view_src=cache, nb=cache.nb)
        return t

    def cache_write(self, cache: Tensor, b: Tensor, ne) -> Tensor:
        """ggml_cpy into a view of a cache: the result is the cache's memory."""
        target = self.view(cache, ne, cache.nb)
        return Tensor(target.ne, cache.type, op="CPY", src=(b, target), view_src=cache, nb=cache.nb)

    def flash_attn(self, q, k, v, mask):
        return self.new((v.ne[0], q.ne[2], q.ne[1], q.ne[3]), "f32", "FLASH_ATTN_EXT", q, k, v, mask)


# --- the allocator (ggml-alloc.c) -------------------------------------------------------------

class DynAllocator:
    """ggml_dyn_tallocr with one chunk: sorted free blocks, the last one open-ended."""

    def __init__(self, alignment: int):
        self.alignment = alignment
        self.blocks: list[list[int]] = [[0, 1 << 62]]       # [offset, size], sorted by offset
        self.max_size = 0

    def _aligned(self, size: int) -> int:
        return -(-size // self.alignment) * self.alignment

    def alloc(self, size: int) -> int:
        size = self._aligned(size)
        best, best_size = -1, None
        for i, (offset, block_size) in enumerate(self.blocks[:-1]):
            if block_size >= size and (best_size is None or block_size <= best_size):
                best, best_size = i, block_size
        if best < 0:
            best = len(self.blocks) - 1
        block = self.blocks[best]
        offset = block[0]
        block[0] += size
        block[1] -= size
        if block[1] == 0:
            del self.blocks[best]
        self.max_size = max(self.max_size, offset + size)
        return offset

    def free(self, offset: int, size: int) -> None:
        size = self._aligned(size)
        blocks = self.blocks
        for i, block in enumerate(blocks):
            if block[0] + block[1] == offset:
                block[1] += size
                if i + 1 < len(blocks) and block[0] + block[1] == blocks[i + 1][0]:
                    block[1] += blocks[i + 1][1]
                    del blocks[i + 1]
                return
            if offset + size == block[0]:
                block[0] = offset
                block[1] += size
                if i > 0 and blocks[i - 1][0] + blocks[i - 1][1] == block[0]:
                    blocks[i - 1][1] += block[1]
                    del blocks[i]
                return
        pos = 0
        while pos < len(blocks) and blocks[pos][0] < offset:
            pos += 1
        blocks.insert(pos, [offset, size])


def allocate(graph_nodes: Sequence[Tensor], graph_leafs: Sequence[Tensor],
             alignment_of: Callable[[str], int]) -> dict[str, int]:
    """ggml_gallocr_alloc_graph_impl over a graph whose tensors carry their device: the
    high-water mark of every device's buffer. A tensor's buffer is the device it was allocated
    for (`buffer_of`), which an in-place child inherits."""
    allocators: dict[str, DynAllocator] = {}
    buffer_of: dict[int, str] = {}
    for t in list(graph_leafs) + list(graph_nodes):
        t.reset_allocation()
        for src in t.src:
            src.reset_allocation()

    def allocator(device: str) -> DynAllocator:
        a = allocators.get(device)
        if a is None:
            a = allocators[device] = DynAllocator(alignment_of(device))
        return a

    def allocate_node(node: Tensor, device: str) -> None:
        if node.external or node.allocated or node.view_src is not None:
            return
        node.allocated = True
        if node.op in INPLACE_OPS:
            for parent in node.src:
                # a view is never "own" memory of the allocator, so only whole tensors are reused
                if parent.view_src is not None or not parent.allocated or parent.is_output:
                    continue
                if parent.n_children == 1 and parent.n_views == 0 and node.same_layout(parent):
                    buffer = buffer_of[id(node)] = buffer_of[id(parent)]
                    node.offset = parent.offset
                    parent.allocated = False
                    a = allocator(buffer)       # ggml_gallocr_free_extra_space
                    parent_size, node_size = a._aligned(parent.n_bytes), a._aligned(node.n_bytes)
                    if parent_size > node_size:
                        a.free(parent.offset + node_size, parent_size - node_size)
                    return
        buffer_of[id(node)] = device
        node.offset = allocator(device).alloc(node.n_bytes)

    def free_node(node: Tensor) -> None:
        if node.is_output:
            return
        allocator(buffer_of[id(node)]).free(node.offset, node.n_bytes)
        node.allocated = False

    for leaf in graph_leafs:
        allocate_node(leaf, leaf.device)
    for node in graph_nodes:
        if node.view_src is not None and node.op != "NONE":
            node.view_src.n_views += 1
        if node.is_input:
            allocate_node(node, node.device)
        for src in node.src:
            src.n_children += 1
            if src.is_input:
                allocate_node(src, node.device)
    for node in graph_nodes:
        for parent in node.src:
            allocate_node(parent, node.device)
        allocate_node(node, node.device)
        for parent in node.src:
            parent.n_children -= 1
            if parent.n_children == 0 and parent.n_views == 0:
                view_src = parent.view_src
                if view_src is not None:
                    view_src.n_views -= 1
                    if view_src.n_views == 0 and view_src.n_children == 0 and view_src.allocated:
                        free_node(view_src)
                elif parent.allocated:
                    free_node(parent)
    return {device: a.max_size for device, a in allocators.items()}


# --- the worst-case graph of each family (llama.cpp src/models/*.cpp, src/llama-graph.cpp) --

@dataclass(frozen=True)
class GraphShape:
    """What the reserved graph depends on besides the hyperparameters."""
    n_tokens: int           # min(n_ctx, n_ubatch)
    n_outputs: int          # rows of logits: min(n_tokens, n_batch)
    flash_attn: bool
    type_k: str
    type_v: str
    n_kv: tuple[int, ...]   # cache cells each layer attends over (its cache's size)

    @classmethod
    def of(cls, hp: HyperParams, rc: RunConfig, flash_attn: bool, kv_cells) -> GraphShape:
        n_ctx = rc.context_length(hp.n_ctx_train)
        n_tokens = min(n_ctx, rc.n_ubatch, rc.n_batch)
        return cls(n_tokens=n_tokens, n_outputs=min(n_tokens, rc.n_batch), flash_attn=flash_attn,
                   type_k=rc.type_k, type_v=rc.type_v,
                   n_kv=tuple(kv_cells(hp, il, rc) for il in range(hp.n_layer)))


class GraphBuilder(Ops):
    """llm_graph_context for the families the planner knows, with weights on their devices."""

    def __init__(self, hp: HyperParams, shape: GraphShape, device_of: Callable[[str], str],
                 layer_device: Callable[[int], str], weight_bytes: Callable[[str], int | None] = lambda name: None):
        super().__init__(Graph())
        self.hp = hp
        self.shape = shape
        self.T = shape.n_tokens
        self.device_of = device_of
        self.layer_device = layer_device
        self.weight_bytes = weight_bytes
        family = arch.family(hp.arch)
        specs = family.tensor_specs(hp)
        self.shapes = {s.name: tuple(reversed(s.shape)) for s in specs}     # ggml ne order
        self._weights: dict[str, Tensor] = {}
        self.v_trans = not shape.flash_attn

    # inputs ---------------------------------------------------------------------------------

    def w(self, name: str) -> Tensor | None:
        if name not in self.shapes:
            return None
        if name not in self._weights:
            t = self._weights[name] = self.weight(self.shapes[name], self.device_of(name), name)
            t.stored_bytes = self.weight_bytes(name)
        return self._weights[name]

    def lw(self, il: int, name: str) -> Tensor | None:
        return self.w(f"blk.{il}.{name}.weight")

    def inp_embd(self) -> Tensor:
        tokens = self.input((self.T,), "i32", "inp_tokens")
        embd = self.input((self.hp.n_embd, self.T), "f32", "inp_embd")
        tok_embd = self.w("token_embd.weight")
        cur = self.get_rows(tok_embd, tokens)
        self.graph.expand(cur)
        self.graph.expand(embd)
        return cur

    def attn_inputs(self, swa: bool) -> dict:
        """k/v index and mask inputs of one KV cache (the base one, or the window one)."""
        layers = [il for il in range(self.hp.n_layer)
                  if (self.hp.attention_kind(il) is not AttentionKind.FULL) == swa]
        if not layers:
            return {}
        n_kv = self.shape.n_kv[layers[0]]
        v_rows = self.T * max(self.hp.n_embd_v_gqa(il) for il in range(self.hp.n_layer)) if self.v_trans else self.T
        inputs = {"k_idxs": self.input((self.T,), "i64", "k_idxs"),
                  "v_idxs": self.input((v_rows,), "i64", "v_idxs"),
                  "mask": self.input((n_kv, self.T), "f16" if self.shape.flash_attn else "f32", "kq_mask")}
        # llama_kv_cache's attention rotation: quantized caches store Hadamard-rotated K and V
        if is_quantized(self.shape.type_k) and self.hp.n_embd_head_k % 64 == 0:
            n = 64
            while self.hp.n_embd_head_k % (n * 2) == 0:
                n *= 2
            inputs["k_rot"] = self.input((n, n), "f32", "k_rot")
        if is_quantized(self.shape.type_v) and self.hp.n_embd_head_v % 64 == 0:
            inputs["v_rot"] = self.input((64, 64), "f32", "v_rot")
        return inputs

    def hadamard(self, cur: Tensor, rot: Tensor) -> Tensor:
        """llama_mul_mat_hadamard: rows of rot.ne0 values times the rotation matrix."""
        n = rot.ne[0]
        n_values = cur.ne[0] * cur.ne[1] * cur.ne[2] * cur.ne[3]
        rows = self.reshape(cur, n, n_values // n) if is_contiguous(cur) else self.cont(cur, n, n_values // n)
        return self.reshape(self.mul_mat(rot, rows), *cur.ne)

    # blocks ---------------------------------------------------------------------------------

    def norm(self, x: Tensor, weight: Tensor | None) -> Tensor:
        cur = self.rms_norm(x)
        return self.mul(cur, weight) if weight is not None else cur

    def linear(self, il: int, name: str, x: Tensor) -> Tensor:
        cur = self.mul_mat(self.lw(il, name), x)
        bias = self.w(f"blk.{il}.{name}.bias")
        return self.add(cur, bias) if bias is not None else cur

    def qkv(self, il: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hp = self.hp
        q = self.linear(il, "attn_q", x)
        k = self.linear(il, "attn_k", x)
        v = self.linear(il, "attn_v", x)
        return (self.reshape(q, hp.n_embd_head_k, hp.n_head, self.T),
                self.reshape(k, hp.n_embd_head_k, hp.n_head_kv[il], self.T),
                self.reshape(v, hp.n_embd_head_v, hp.n_head_kv[il], self.T))

    def cache(self, il: int, which: str, n_embd: int) -> Tensor:
        cells = self.shape.n_kv[il]
        type_name = self.shape.type_k if which == "k" else self.shape.type_v
        return self.weight((n_embd, cells), self.layer_device(il), f"cache_{which}_l{il}", type_name)

    def attention(self, il: int, inputs: dict, q: Tensor, k: Tensor, v: Tensor, order: str,
                  v_mla: Tensor | None = None) -> Tensor:
        """build_attn (KV cache) + build_attn_mha; `order` is the expand order of q, k, v. With
        `v_mla` (absorbed MLA) only K is cached and V is a view of its latent part."""
        hp = self.hp
        g = self.graph
        mla = v_mla is not None
        k_rot, v_rot = (None, None) if mla else (inputs.get("k_rot"), inputs.get("v_rot"))
        if k_rot is not None:
            q, k = self.hadamard(q, k_rot), self.hadamard(k, k_rot)
        if v_rot is not None:
            v = self.hadamard(v, v_rot)
        for name in order:
            g.expand({"q": q, "k": k, "v": v}[name])
        cells = self.shape.n_kv[il]
        n_embd_k = hp.n_embd_k_gqa(il)
        k_cache = self.cache(il, "k", n_embd_k)
        g.expand(self.set_rows(k_cache, self.view(k, (n_embd_k, self.T)), inputs["k_idxs"]))
        tk = self.shape.type_k
        head_k = n_embd_k if mla else hp.n_embd_head_k
        n_head_kv = 1 if mla else hp.n_head_kv[il]
        # llama_kv_cache::get_k; the strides matter only to tell a transposed V from a plain one
        k_view = self.view(k_cache, (head_k, n_head_kv, cells),
                           (SCALAR_BYTES.get(tk, 1), row_bytes(tk, head_k), row_bytes(tk, n_embd_k),
                            row_bytes(tk, n_embd_k * cells)))
        if mla:             # V is the latent part of the cached K rows
            v_view = self.view(k_cache, (hp.kv_lora_rank, 1, cells), k_view.nb)
        else:
            n_embd_v = hp.n_embd_v_gqa(il)
            v_cache = self.cache(il, "v", n_embd_v)
            tv = self.shape.type_v
            if not self.v_trans:
                g.expand(self.set_rows(v_cache, self.view(v, (n_embd_v, self.T)), inputs["v_idxs"]))
                v_view = self.view(v_cache, (hp.n_embd_head_v, hp.n_head_kv[il], cells),
                                   (SCALAR_BYTES.get(tv, 1), row_bytes(tv, hp.n_embd_head_v),
                                    row_bytes(tv, n_embd_v), row_bytes(tv, n_embd_v * cells)))
            else:
                flat = self.reshape(v_cache, 1, n_embd_v * cells)
                g.expand(self.set_rows(flat, self.reshape(self.reshape(v, n_embd_v, self.T), 1, n_embd_v * self.T),
                                       inputs["v_idxs"]))
                v_view = self.view(v_cache, (cells, hp.n_head_kv[il], hp.n_embd_head_v),
                                   (SCALAR_BYTES.get(tv, 1), row_bytes(tv, cells * hp.n_embd_head_v),
                                    row_bytes(tv, cells), row_bytes(tv, cells * n_embd_v)))
        cur = self.mha(q, k_view, v_view, inputs["mask"], v_mla)
        return self.hadamard(cur, v_rot) if v_rot is not None else cur

    def mha(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, v_mla: Tensor | None) -> Tensor:
        v_trans = v.nb[1] > v.nb[2]
        q = self.permute(self.view(q, q.ne, q.nb), 0, 2, 1, 3)
        k = self.permute(k, 0, 2, 1, 3)
        v = self.permute(v, 0, 2, 1, 3)
        if self.shape.flash_attn:
            if v_trans:
                v = self.transpose(v)
            cur = self.flash_attn(q, k, v, mask)
            if v_mla is not None:
                cur = self.permute(cur, 0, 2, 1, 3)
                cur = self.mul_mat(v_mla, cur)
                cur = self.permute(cur, 0, 2, 1, 3)
                cur = self.cont(cur)
            cur = self.reshape(cur, cur.ne[0] * cur.ne[1], cur.ne[2] * cur.ne[3])
        else:
            kq = self.mul_mat(k, q)
            kq = self.soft_max(kq, mask)
            if not v_trans:
                v = self.cont(self.transpose(v))
            kqv = self.mul_mat(v, kq)
            if v_mla is not None:
                kqv = self.mul_mat(v_mla, kqv)
            cur = self.permute(kqv, 0, 2, 1, 3)
            cur = self.cont(cur, cur.ne[0] * cur.ne[1], cur.ne[2] * cur.ne[3])
        self.graph.expand(cur)
        return cur

    def ffn(self, il: int, x: Tensor, suffix: str = "") -> Tensor:
        """build_ffn with a parallel gate (SiLU or GELU: the same tensors either way)."""
        up = self.mul_mat(self.lw(il, f"ffn_up{suffix}"), x)
        gate = self.mul_mat(self.lw(il, f"ffn_gate{suffix}"), x)
        cur = self.glu_split(gate, up)
        return self.mul_mat(self.lw(il, f"ffn_down{suffix}"), cur)

    def moe(self, il: int, x: Tensor, gating: str, norm_w: bool, w_scale: float,
            weight_before_ffn: bool = False, groups: tuple[int, int] = (0, 0)) -> Tensor:
        """build_moe_ffn."""
        hp = self.hp
        T, n_expert, n_used = self.T, hp.n_expert, hp.n_expert_used
        logits = self.mul_mat(self.lw(il, "ffn_gate_inp"), x)
        probs = self.soft_max(logits) if gating == "softmax" else self.unary(logits)
        selection = probs
        bias = self.w(f"blk.{il}.exp_probs_b.bias")
        if bias is not None:
            selection = self.add(probs, bias)
        if weight_before_ffn:
            selection = logits
        n_groups, n_group_used = groups
        if n_groups > 1:
            per_group = n_expert // n_groups
            sel_groups = self.reshape(selection, per_group, n_groups, T)
            scores = self.argsort_top_k(sel_groups, 2)
            scores = self.get_rows(self.reshape(sel_groups, 1, per_group, n_groups, T), scores)
            scores = self.sum_rows(self.reshape(scores, scores.ne[1], scores.ne[2], scores.ne[3]))
            scores = self.reshape(scores, scores.ne[1], scores.ne[2])
            expert_groups = self.argsort_top_k(scores, n_group_used)
            picked = self.get_rows(sel_groups, expert_groups)
            filled = self.dup(sel_groups, "FILL")
            selection = self.reshape(self.set_rows(filled, picked, expert_groups), n_expert, T)
        selected = self.argsort_top_k(selection, n_used)
        weights = self.get_rows(self.reshape(probs, 1, n_expert, T), selected)
        if norm_w:
            weights = self.reshape(weights, n_used, T)
            total = self.clamp(self.sum_rows(weights))
            weights = self.reshape(self.div(weights, total), 1, n_used, T)
        if w_scale not in (0.0, 1.0):
            weights = self.scale(weights)
        self.graph.expand(weights)
        cur = self.reshape(x, hp.n_embd, 1, T)
        if weight_before_ffn:
            cur = self.mul(self.repeat(cur, hp.n_embd, n_used, T, 1), weights)
        up = self.mul_mat_id(self.lw(il, "ffn_up_exps"), cur, selected)
        gate = self.mul_mat_id(self.lw(il, "ffn_gate_exps"), cur, selected)
        experts = self.mul_mat_id(self.lw(il, "ffn_down_exps"), self.glu_split(gate, up), selected)
        if not weight_before_ffn:
            experts = self.mul(experts, weights)
        self.graph.expand(experts)
        parts = [self.view_nb(experts, (hp.n_embd, T), (experts.nb[2],)) for _ in range(n_used)]
        for part in parts:
            self.graph.expand(part)
        out = parts[0]
        for part in parts[1:]:
            out = self.add(out, part)
            self.graph.expand(out)
        return self.cont(out) if n_used == 1 else out

    def finish(self, x: Tensor, out_norm: str = "output_norm.weight", softcap: bool = False) -> None:
        embd = self.norm(x, self.w(out_norm))
        embd.is_output = True
        output = self.w("output.weight") or self.weight(self.shapes["token_embd.weight"],
                                                       self.device_of("output.weight"), "output.weight")
        logits = self.mul_mat(output, embd)
        if softcap:
            logits = self.scale(self.unary(self.scale(logits)))
        logits.is_output = True
        self.graph.expand(logits)


def _is_swa(hp: HyperParams, il: int) -> bool:
    return hp.attention_kind(il) is not AttentionKind.FULL


def _last_layer_rows(b: GraphBuilder, il: int, out_ids: Tensor, *tensors: Tensor) -> list[Tensor]:
    """The last layer keeps only the output rows (ggml_get_rows on inp_out_ids)."""
    if il != b.hp.n_layer - 1:
        return list(tensors)
    return [b.get_rows(t, out_ids) for t in tensors]


def _llama_like(b: GraphBuilder) -> None:
    """llama (with Mixtral's routed FFN), qwen2, qwen3, qwen3moe: src/models/llama.cpp, qwen*.cpp."""
    hp = b.hp
    qk_norm = getattr(hp, "qk_norm", False)
    x = b.inp_embd()
    pos = b.input((b.T,), "i32", "inp_pos")
    inputs = b.attn_inputs(swa=False)
    out_ids = b.input((b.shape.n_outputs,), "i32", "out_ids")
    for il in range(hp.n_layer):
        cur = b.norm(x, b.lw(il, "attn_norm"))
        q, k, v = b.qkv(il, cur)
        if qk_norm:
            q = b.norm(q, b.lw(il, "attn_q_norm"))
        q = b.rope(q, pos)
        if qk_norm:
            k = b.norm(k, b.lw(il, "attn_k_norm"))
        k = b.rope(k, pos)
        cur = b.attention(il, inputs, q, k, v, order="qvk")
        cur = b.mul_mat(b.lw(il, "attn_output"), cur)
        cur, residual = _last_layer_rows(b, il, out_ids, cur, x)
        ffn_inp = b.add(cur, residual)
        cur = b.norm(ffn_inp, b.lw(il, "ffn_norm"))
        if b.lw(il, "ffn_gate_inp") is None:
            cur = b.ffn(il, cur)
        else:
            cur = b.moe(il, cur, "softmax", norm_w=hp.arch == "qwen3moe" or hp.arch == "llama",
                        w_scale=0.0)
        x = b.add(cur, ffn_inp)
    b.finish(x)


def _gemma3(b: GraphBuilder) -> None:
    """src/models/gemma3.cpp (the iswa graph when the model has window layers)."""
    hp = b.hp
    x = b.scale(b.inp_embd())
    pos = b.input((b.T,), "i32", "inp_pos")
    base, window = b.attn_inputs(swa=False), b.attn_inputs(swa=True)
    iswa = bool(window)
    out_ids = b.input((b.shape.n_outputs,), "i32", "out_ids")
    for il in range(hp.n_layer):
        cur = b.norm(x, b.lw(il, "attn_norm"))
        q, k, v = b.qkv(il, cur)
        q = b.rope(b.norm(q, b.lw(il, "attn_q_norm")), pos)
        k = b.rope(b.norm(k, b.lw(il, "attn_k_norm")), pos)
        q = b.scale(q)
        cur = b.attention(il, window if _is_swa(hp, il) else base, q, k, v, order="qkv" if iswa else "qvk")
        cur = b.mul_mat(b.lw(il, "attn_output"), cur)
        cur, x = _last_layer_rows(b, il, out_ids, cur, x)
        cur = b.norm(cur, b.lw(il, "post_attention_norm"))
        sa_out = b.add(cur, x)
        cur = b.norm(sa_out, b.lw(il, "ffn_norm"))
        cur = b.ffn(il, cur)
        cur = b.norm(cur, b.lw(il, "post_ffw_norm"))
        x = b.add(cur, sa_out)
    b.finish(x, softcap=bool(getattr(hp, "final_logit_softcapping", 0.0)))


def _llama4(b: GraphBuilder) -> None:
    """src/models/llama4.cpp: chunked layers on the window cache, no-rope layers temperature-scaled."""
    hp = b.hp
    x = b.inp_embd()
    pos = b.input((b.T,), "i32", "inp_pos")
    attn_scale = b.input((1, 1, b.T), "f32", "inp_attn_scale")
    base, window = b.attn_inputs(swa=False), b.attn_inputs(swa=True)
    iswa = bool(window)
    out_ids = b.input((b.shape.n_outputs,), "i32", "out_ids")
    for il in range(hp.n_layer):
        residual = x
        cur = b.norm(x, b.lw(il, "attn_norm"))
        q, k, v = b.qkv(il, cur)
        if hp.uses_rope(il):
            q, k = b.rope(q, pos), b.rope(k, pos)
            if hp.use_kq_norm:
                q, k = b.rms_norm(q), b.rms_norm(k)
        else:
            q = b.mul(q, attn_scale)
        cur = b.attention(il, window if _is_swa(hp, il) else base, q, k, v, order="qkv" if iswa else "qvk")
        cur = b.mul_mat(b.lw(il, "attn_output"), cur)
        cur, residual = _last_layer_rows(b, il, out_ids, cur, residual)
        ffn_inp = b.add(cur, residual)
        normed = b.norm(ffn_inp, b.lw(il, "ffn_norm"))
        if b.lw(il, "ffn_gate_inp") is None:
            cur = b.ffn(il, normed)
        else:
            moe_out = b.moe(il, normed, "sigmoid", norm_w=False, w_scale=0.0, weight_before_ffn=True)
            cur = b.add(moe_out, b.ffn(il, normed, "_shexp"))
        x = b.add(cur, ffn_inp)
    b.finish(x)


def _deepseek2(b: GraphBuilder) -> None:
    """src/models/deepseek2.cpp: MLA (the absorbed form when the GGUF caches the latent)."""
    hp = b.hp
    T = b.T
    n_head = hp.n_head
    head_k, rope_dims = hp.n_embd_head_k_mla, hp.n_rot
    nope = head_k - rope_dims
    rank = hp.kv_lora_rank
    x = b.inp_embd()
    pos = b.input((T,), "i32", "inp_pos")
    inputs = b.attn_inputs(swa=False)
    out_ids = b.input((b.shape.n_outputs,), "i32", "out_ids")
    gating = "softmax" if int(hp.expert_gating_func) == 1 else "sigmoid"
    for il in range(hp.n_layer):
        residual = x
        cur = b.norm(x, b.lw(il, "attn_norm"))
        if b.lw(il, "attn_q") is None:
            q = b.mul_mat(b.lw(il, "attn_q_a"), cur)
            q = b.norm(q, b.lw(il, "attn_q_a_norm"))
            q = b.mul_mat(b.lw(il, "attn_q_b"), q)
        else:
            q = b.mul_mat(b.lw(il, "attn_q"), cur)
        q = b.reshape(q, head_k, n_head, T)
        kv_pe = b.mul_mat(b.lw(il, "attn_kv_a_mqa"), cur)
        row = kv_pe.nb[1]
        kv_cmpr = b.view_nb(kv_pe, (rank, T), (row,))
        k_pe = b.rope(b.view_nb(kv_pe, (rope_dims, 1, T), (row, row)), pos)
        kv_cmpr = b.norm(kv_cmpr, b.lw(il, "attn_kv_a_norm"))
        if hp.is_mla:
            q_nope = b.view_nb(q, (nope, n_head, T), (q.nb[1], q.nb[2]))
            q_pe = b.rope(b.view_nb(q, (rope_dims, n_head, T), (q.nb[1], q.nb[2])), pos)
            absorbed = b.mul_mat(b.lw(il, "attn_k_b"), b.permute(q_nope, 0, 2, 1, 3))
            q_cur = b.concat(b.permute(absorbed, 0, 2, 1, 3), q_pe, 0)
            kv_cmpr = b.reshape(kv_cmpr, rank, 1, T)
            k_cur = b.concat(kv_cmpr, k_pe, 0)
            cur = b.attention(il, inputs, q_cur, k_cur, kv_cmpr, order="qvk", v_mla=b.lw(il, "attn_v_b"))
        else:
            kv = b.mul_mat(b.lw(il, "attn_kv_b"), kv_cmpr)
            width = nope + hp.n_embd_head_v_mla
            k_nope = b.view_nb(kv, (nope, n_head, T), (kv.nb[0] * width, kv.nb[0] * width * n_head))
            v_cur = b.cont(b.view_nb(kv, (hp.n_embd_head_v_mla, n_head, T),
                                     (kv.nb[0] * width, kv.nb[0] * width * n_head)))
            q_cur = b.rope(q, pos)
            k_cur = b.concat(k_nope, b.repeat(k_pe, rope_dims, n_head, T, 1), 0)
            cur = b.attention(il, inputs, q_cur, k_cur, v_cur, order="qvk")
        cur = b.mul_mat(b.lw(il, "attn_output"), cur)
        cur, residual = _last_layer_rows(b, il, out_ids, cur, residual)
        ffn_inp = b.add(cur, residual)
        cur = b.norm(ffn_inp, b.lw(il, "ffn_norm"))
        if not hp.is_moe_layer(il):
            cur = b.ffn(il, cur)
        else:
            moe_out = b.moe(il, cur, gating, norm_w=hp.expert_weights_norm, w_scale=hp.expert_weights_scale,
                            groups=(hp.n_expert_groups, hp.n_group_used))
            cur = b.add(moe_out, b.ffn(il, cur, "_shexp"))
        x = b.add(cur, ffn_inp)
    b.finish(x)


def _state_rows(b: GraphBuilder, il: int, which: str, n_values: int, s_copy: tuple[Tensor, Tensor]
                ) -> tuple[Tensor, Tensor]:
    """build_rs: the state of the ubatch's one sequence, gathered out of the layer's recurrent
    cache (conv or delta-rule state, f32, one row per cell); the zeroing of a fresh cell and the
    copy of the other sequences' rows are views of the cache and take no compute memory."""
    cache = b.weight((n_values, 1), b.layer_device(il), f"cache_{which}_l{il}", "f32")
    states = b.reshape(cache, n_values, 1)
    b.graph.expand(b.view(b.view(states, (n_values,)), (n_values,), op="SCALE"))
    s_copy_main, s_copy_extra = s_copy
    rows = b.get_rows(states, s_copy_main)              # [n_values, 1]
    b.graph.expand(rows)
    extra = b.get_rows(states, s_copy_extra)
    b.graph.expand(b.cache_write(cache, extra, (n_values, 0)))
    return cache, rows


def _delta_net_mixer(b: GraphBuilder, il: int, cur: Tensor, s_copy: tuple[Tensor, Tensor]) -> Tensor:
    """build_layer_attn_linear (qwen35*, qwen3next) with llama.cpp's fused Gated DeltaNet op
    (resolve_fused_ops turns it on for the CPU and CUDA)."""
    hp = b.hp
    T, d, n_k, n_v = b.T, hp.ssm_d_state, hp.ssm_n_group, hp.ssm_dt_rank
    channels, kernel = hp.conv_channels, hp.ssm_d_conv
    qkv_mixed = b.reshape(b.mul_mat(b.lw(il, "attn_qkv"), cur), channels, T, 1)
    z = b.mul_mat(b.lw(il, "attn_gate"), cur)                          # [d_inner, T]
    if hp.joint_beta_alpha:
        ba = b.reshape(b.mul_mat(b.lw(il, "ssm_ba"), cur), 2 * n_v // n_k, n_k, T)
        beta = b.reshape(b.unary(b.cont(b.view(ba, (n_v // n_k, n_k, T), ba.nb))), 1, n_v, T)
        alpha = b.cont(b.view(ba, (n_v // n_k, n_k, T), ba.nb), n_v, T, 1)
    else:
        beta = b.unary(b.reshape(b.mul_mat(b.lw(il, "ssm_beta"), cur), 1, n_v, T))
        alpha = b.reshape(b.mul_mat(b.lw(il, "ssm_alpha"), cur), n_v, T)
    gate = b.mul(b.unary(b.add(alpha, b.w(f"blk.{il}.ssm_dt.bias"))), b.w(f"blk.{il}.ssm_a"))
    gate = b.reshape(gate, 1, n_v, T)
    # build_conv_state: the kernel's last K-1 inputs of the previous ubatch, then this one's
    conv_cache, conv_states = _state_rows(b, il, "r", hp.n_embd_r(), s_copy)
    conv_states = b.reshape(conv_states, kernel - 1, channels, 1)
    conv_input = b.concat(conv_states, b.transpose(qkv_mixed), 0)      # [K-1+T, channels, 1]
    last = b.view(conv_input, (kernel - 1, channels, 1), conv_input.nb)
    b.graph.expand(b.cache_write(conv_cache, last, (hp.n_embd_r(), 1)))
    ssm_cache, state = _state_rows(b, il, "s", hp.n_embd_s(), s_copy)
    state = b.reshape(state, d, d, n_v, 1)
    mixed = b.unary(b.new((channels, T, 1), "f32", "SSM_CONV", conv_input, b.lw(il, "ssm_conv1d")))
    row = mixed.nb[1]
    q = b.scale(b.rms_norm(b.view(mixed, (d, n_k, T), (4, 4 * d, row, row * T))))
    k = b.scale(b.rms_norm(b.view(mixed, (d, n_k, T), (4, 4 * d, row, row * T))))
    v = b.view(mixed, (d, n_v, T), (4, 4 * d, row, row * T))
    if hp.grouped_heads and n_k != n_v:     # qwen3next repeats the key heads even for the fused op
        q = b.reshape(b.repeat(b.reshape(q, d, 1, n_k, T), d, n_v // n_k, n_k, T), d, n_v, T)
        k = b.reshape(b.repeat(b.reshape(k, d, 1, n_k, T), d, n_v // n_k, n_k, T), d, n_v, T)
    result = b.new((d * n_v, T + d), "f32", "GATED_DELTA_NET", q, k, v, gate, beta, state)
    output = b.view(result, (d, n_v, T))
    new_state = b.view(result, (d, d, n_v, 1))
    b.graph.expand(b.cache_write(ssm_cache, new_state, (hp.n_embd_s(), 1)))
    normed = b.mul(b.rms_norm(output), b.w(f"blk.{il}.ssm_norm.weight"))
    out = b.mul(normed, b.unary(b.reshape(z, d, n_v, T, 1)))
    return b.reshape(b.mul_mat(b.lw(il, "ssm_out"), b.reshape(out, d * n_v, T)), hp.n_embd, T)


def _gated_attention(b: GraphBuilder, il: int, cur: Tensor, pos: Tensor, inputs: dict) -> Tensor:
    """build_layer_attn of qwen35* and qwen3next: attn_q gives per head [q | gate]."""
    hp = b.hp
    T, head, n_head = b.T, hp.n_embd_head_k, hp.n_head
    q_full = b.linear(il, "attn_q", cur)
    k = b.linear(il, "attn_k", cur)
    v = b.linear(il, "attn_v", cur)
    if hp.arch == "qwen3next":
        q_full = b.reshape(q_full, 2 * head, n_head, T, 1)
    strides = (4, 4 * 2 * head, 4 * 2 * head * n_head)
    q = b.norm(b.view_nb(q_full, (head, n_head, T), strides[1:]), b.lw(il, "attn_q_norm"))
    k = b.norm(b.reshape(k, head, hp.n_head_kv[il], T), b.lw(il, "attn_k_norm"))
    # the gate's cont enters the graph with its first use, after the attention, in every variant
    gate = b.cont(b.view_nb(q_full, (head, n_head, T), strides[1:]), head * n_head, T)
    v = b.reshape(v, hp.n_embd_head_v, hp.n_head_kv[il], T)
    q, k = b.rope(q, pos), b.rope(k, pos)
    cur = b.attention(il, inputs, q, k, v, order="qvk")
    cur = b.mul(cur, b.unary(gate))
    return b.mul_mat(b.lw(il, "attn_output"), cur)


def _qwen35_hybrid(b: GraphBuilder) -> None:
    """src/models/qwen35moe.cpp, qwen35.cpp, qwen3next.cpp: Gated DeltaNet layers with a recurrent
    state, every fourth layer gated full attention; the output rows are taken after the final norm."""
    hp = b.hp
    x = b.inp_embd()
    s_copy = b.input((1,), "i32", "rs_s_copy")
    s_copy_views = (b.view(s_copy, (1,)), b.view(s_copy, (0,)))     # this ubatch's sequence, the others
    inputs = b.attn_inputs(swa=False)
    # IMROPE (qwen35*) reads four positions per token (llama_hparams::n_pos_per_embd)
    pos = b.input((b.T * (4 if hp.rope_sections else 1),), "i32", "inp_pos")
    out_ids = b.input((b.shape.n_outputs,), "i32", "out_ids")
    for il in range(hp.n_layer):
        residual = x
        cur = b.norm(x, b.lw(il, "attn_norm"))
        b.graph.expand(cur)
        if hp.is_recurrent(il):
            cur = _delta_net_mixer(b, il, cur, s_copy_views)
        else:
            cur = _gated_attention(b, il, cur, pos, inputs)
        cur = b.add(cur, residual)
        ffn_residual = cur
        cur = b.norm(cur, b.lw(il, "post_attention_norm"))
        if not hp.n_expert:
            ffn = b.ffn(il, cur)
        else:
            moe_out = b.moe(il, cur, "softmax", norm_w=True, w_scale=0.0)
            shared = b.ffn(il, cur, "_shexp")
            gate_w = b.w(f"blk.{il}.ffn_gate_inp_shexp.weight")
            shared = b.mul(shared, b.unary(b.mul_mat(gate_w, cur)))
            ffn = b.add(moe_out, shared)
        x = b.add(ffn, ffn_residual)
    norm = b.norm(x, b.w("output_norm.weight"))
    norm.is_output = True
    embd = b.get_rows(norm, out_ids)
    embd.is_output = True
    output = b.w("output.weight") or b.weight(b.shapes["token_embd.weight"], b.device_of("output.weight"),
                                              "output.weight")
    logits = b.mul_mat(output, embd)
    logits.is_output = True
    b.graph.expand(logits)


GRAPHS = {"llama": _llama_like, "qwen2": _llama_like, "qwen3": _llama_like, "qwen3moe": _llama_like,
          "gemma3": _gemma3, "llama4": _llama4, "deepseek2": _deepseek2,
          "qwen35moe": _qwen35_hybrid, "qwen35": _qwen35_hybrid, "qwen3next": _qwen35_hybrid}


def build_graph(hp: HyperParams, shape: GraphShape, device_of: Callable[[str], str] = lambda name: CPU_NAME,
                layer_device: Callable[[int], str] = lambda il: CPU_NAME,
                weight_bytes: Callable[[str], int | None] = lambda name: None) -> Graph:
    b = GraphBuilder(hp, shape, device_of, layer_device, weight_bytes)
    GRAPHS[hp.arch](b)
    return b.graph


def has_graph(arch_name: str) -> bool:
    return arch_name in GRAPHS


# --- the scheduler: which backend runs each node, and the copies between them ---------------

def _weight_source(node: Tensor) -> Tensor | None:
    # ggml_backend_sched_backend_id_from_cur: rope's and flash attention's small extra tensors
    # do not choose the backend
    if node.op in ("ROPE", "FLASH_ATTN_EXT"):
        return None
    for src in node.src:
        if src.external and not src.name.startswith("cache_"):
            return src
    return None


def op_batch_size(node: Tensor) -> int:
    """ggml-cuda's get_op_batch_size: what its offload_op compares with MIN_OFFLOAD_BATCH."""
    if node.op == "GET_ROWS":
        return 0
    if node.op == "MUL_MAT":
        return node.ne[1]
    if node.op in ("MUL_MAT_ID", "ROPE"):
        return node.ne[2]
    return node.ne[1] * node.ne[2] * node.ne[3]


def assign_devices(graph: Graph, gpus: Sequence[str], n_tokens: int) -> None:
    """ggml_backend_sched_split_graph's backend assignment, in its passes: ops on a preallocated
    tensor (a view of the KV cache) or with a weight run where that memory is, except that an
    op on a CPU weight is offloaded to the first GPU when its batch reaches MIN_OFFLOAD_BATCH
    (llama.cpp's default op offload); graph inputs sit on the CPU; the rest take the device of
    their neighbours, GPUs first, down then up."""
    cpu = CPU_NAME
    for leaf in graph.leafs:
        if not leaf.external:
            leaf.device = cpu
    for node in graph.nodes:
        node.device = None
        if node.view_src is not None and node.view_src.external:
            node.device = node.view_src.device
            continue
        weight = _weight_source(node)
        if weight is not None:
            node.device = weight.device
            if weight.device == cpu and gpus and op_batch_size(node) >= MIN_OFFLOAD_BATCH:
                node.device = gpus[0]
    gpu_set = set(gpus)
    for nodes, only_gpu in ((graph.nodes, True), (graph.nodes[::-1], True),
                            (graph.nodes, False), (graph.nodes[::-1], False)):
        current = None
        for node in nodes:
            if node.device is not None:
                current = node.device if (not only_gpu or node.device in gpu_set) else None
            elif current is not None:
                node.device = current
    for node in graph.nodes:
        if node.device is None:
            node.device = cpu


def _copy_of(src: Tensor, device: str) -> Tensor:
    copy = Tensor(src.ne, src.type, op="CPY", src=(src,), nb=src.nb, device=device, name=f"{src.name}#copy")
    copy.stored_bytes = src.stored_bytes        # an offloaded weight travels in its own format
    return copy


def insert_copies(graph: Graph, n_copies: int = 1) -> tuple[list[Tensor], list[Tensor]]:
    """The scheduler's graph copy (nodes, leafs): nodes in splits (runs on one device), a split
    starting with a copy, in its device's buffer, of each input it reads from another device
    that no earlier split copied there (one copy per tensor and device, read by every later
    split). A weight offloaded from the CPU starts a split of its own. Views are no work of
    their own and live with the memory they view.

    With pipeline parallelism (`n_copies` > 1) every copy and every graph input is kept in
    n_copies instances, allocated before everything else and never freed."""
    splits: list[tuple[list[Tensor], list[Tensor]]] = [([], [])]     # (copies, nodes)
    split_device = None
    split_inputs = 0
    copies: dict[tuple[int, str], Tensor] = {}
    kept: list[Tensor] = []             # pipeline copies: leafs that live through the whole graph
    for node in graph.nodes:
        if node.view_src is not None and node.op != "SET_ROWS":
            node.device = node.view_src.device
            splits[-1][1].append(node)
            continue
        offloaded_weight = any(src.external and src.device != node.device for src in node.src)
        if node.device != split_device or (offloaded_weight and split_inputs):
            split_device, split_inputs = node.device, 0
            splits.append(([], []))
        new_src = []
        for src in node.src:
            if (src.view_src or src).device == split_device:
                new_src.append(src)
                continue
            copy = copies.get((id(src), split_device))
            if copy is None:
                copy = copies[(id(src), split_device)] = _copy_of(src, split_device)
                split_inputs += 1
                if n_copies > 1:
                    copy.op, copy.src = "NONE", ()
                    copy.is_input = copy.is_output = True
                    kept += [copy] + [_copy_of(copy, split_device) for _ in range(n_copies - 1)]
                else:
                    splits[-1][0].append(copy)
            new_src.append(copy)
        node.src = tuple(new_src)
        splits[-1][1].append(node)
    leafs = list(graph.leafs)
    if n_copies > 1:
        for leaf in graph.leafs:
            if leaf.is_input:
                leaf.is_output = True
                extra = [_copy_of(leaf, leaf.device) for _ in range(n_copies - 1)]
                for t in extra:
                    t.op, t.src, t.is_output = "NONE", (), True
                leafs += extra
        for t in kept:
            t.op, t.src, t.is_output = "NONE", (), True
        leafs += kept
    return [t for split_copies, split_nodes in splits for t in split_copies + split_nodes], leafs


def alignment(device: str) -> int:
    return TENSOR_ALIGNMENT["cpu" if device == CPU_NAME else "cuda"]


def compute_buffer_bytes(hp: HyperParams, shape: GraphShape, gpus: Sequence[str] = (),
                         device_of: Callable[[str], str] = lambda name: CPU_NAME,
                         layer_device: Callable[[int], str] = lambda il: CPU_NAME,
                         weight_bytes: Callable[[str], int | None] = lambda name: None,
                         pipeline_parallel: bool = False) -> dict[str, int]:
    """Bytes of each device's compute buffer as llama.cpp reserves it (devices with none: absent).
    `pipeline_parallel`: llama.cpp's mode for several GPUs holding every layer (-ngl all, layer
    split, no -ot), with GGML_SCHED_MAX_COPIES copies of the inputs."""
    graph = build_graph(hp, shape, device_of, layer_device, weight_bytes)
    assign_devices(graph, gpus, shape.n_tokens)
    if not gpus:
        return allocate(graph.nodes, graph.leafs, alignment)
    nodes, leafs = insert_copies(graph, SCHED_MAX_COPIES if pipeline_parallel else 1)
    return allocate(nodes, leafs, alignment)
