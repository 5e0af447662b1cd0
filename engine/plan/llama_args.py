"""The llama.cpp / ik_llama.cpp command line as a placement language: parse it, emit it.

Parsing follows llama.cpp's own rules (common/arg.cpp and `llama_model_base::load_tensors` in
src/llama-model.cpp): `-ngl` counts the output layer as one more layer at the top, the GPU
layers are the last ones, `-ts` proportions become cumulative split points and each GPU layer
goes to the first GPU whose split point lies above its relative position (`std::upper_bound`,
in float32 as llama.cpp computes it); the input layer stays on the CPU. Without `-ts`,
llama.cpp splits by each GPU's free memory; the plan has no run-time free memory, so it uses
each device's `total_bytes`. `-ot`, `--cpu-moe`, `--n-cpu-moe` become one ordered list of
overrides in command-line order; the first pattern found in a tensor's name wins.

Emission finds the shortest `-ngl`/`-ts` that reproduces the plan's layer devices and covers
the tensors placed elsewhere with as few, as short `-ot` regexes as it can, then checks itself
by parsing what it wrote. The line is complete: `-m`, the run settings that differ from the
tool's defaults and any `--override-kv` are part of it, so parsing it back gives the same
placement and the same settings. A line is read from the tool's own defaults, never merged into
earlier settings.

Two dialects: "llama.cpp" and "ik_llama.cpp". ik_llama.cpp turns flash attention on unless told
otherwise and reads `--n-cpu-moe` with its own layer choice over several GPUs, so its lines
say `-fa off` where needed and never use `--n-cpu-moe`.

Settings llama.cpp refuses or changes at context creation (`llama_init_from_model` in
src/llama-context.cpp) are reported by `refused_combinations`: a quantized V cache with flash
attention off, different K and V cache types on an MLA model, an ubatch above the batch.
"""
from __future__ import annotations

import math
import re
import shlex
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from engine.arch.overrides import OverrideError, parse_override_kv_list
from engine.gguf import ggml_types
from engine.plan.inventory import Inventory
from engine.plan.placement import Placement, Rule, compile_rules
from engine.plan.rule_search import RuleMacro, synthesize_rules
from engine.run_config import KV_CACHE_TYPES, RunConfig

# llama.cpp's defaults where they differ from a RunConfig(): -c 0 is the training context
LLAMA_CPP_DEFAULTS = RunConfig(n_ctx=0)
# ik_llama.cpp (common/common.h): flash attention on by default; its "-fa auto" also means on
IK_LLAMA_CPP_DEFAULTS = LLAMA_CPP_DEFAULTS.replace(flash_attn="on")
LLAMA_CPP, IK_LLAMA_CPP = "llama.cpp", "ik_llama.cpp"
DIALECTS = {LLAMA_CPP: LLAMA_CPP_DEFAULTS, IK_LLAMA_CPP: IK_LLAMA_CPP_DEFAULTS}
# KV cache types stored in blocks (ggml_is_quantized): llama.cpp needs flash attention for such a V
QUANTIZED_KV_TYPES = frozenset(("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"))

# common.h: LLM_FFN_EXPS_REGEX / LLM_FFN_DENSE_REGEX, behind "blk\.<il>" for --n-cpu-moe
CPU_MOE_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
CPU_FFN_REGEX = r"\.ffn_(up|down|gate)\."

APPLIED, IGNORED, NOT_PLACEMENT, DEFAULT = "applied", "ignored", "not-placement", "default"
OPTIONAL = -1   # arity of a flag whose value may be left out (-fa, --fit)

# Flags this module applies, by every spelling llama.cpp and ik_llama.cpp accept.
HANDLED: dict[str, tuple[str, int]] = {}
for _key, _arity, _spellings in [
        ("ngl", 1, "-ngl --gpu-layers --n-gpu-layers"), ("ts", 1, "-ts --tensor-split"),
        ("sm", 1, "-sm --split-mode"), ("mg", 1, "-mg --main-gpu"), ("ot", 1, "-ot --override-tensor"),
        ("cmoe", 0, "-cmoe --cpu-moe"), ("ncmoe", 1, "-ncmoe --n-cpu-moe"), ("ncffn", 1, "-ncffn --n-cpu-ffn"),
        ("dev", 1, "-dev --device"), ("c", 1, "-c --ctx-size"), ("ctk", 1, "-ctk --cache-type-k"),
        ("ctv", 1, "-ctv --cache-type-v"), ("b", 1, "-b --batch-size"), ("ub", 1, "-ub --ubatch-size"),
        ("fa", OPTIONAL, "-fa --flash-attn"), ("nofa", 0, "-no-fa --no-flash-attn"), ("t", 1, "-t --threads"),
        ("np", 1, "-np --parallel"), ("m", 1, "-m --model"), ("okv", 1, "-okv --override-kv")]:
    HANDLED.update({s: (_key, _arity) for s in _spellings.split()})

# ik_llama.cpp-only flags (its common/common.cpp): recognised, reported, not modelled.
IK_ONLY: dict[str, int] = {s: 0 for s in (
    "-fmoe --fused-moe -no-fmoe --no-fused-moe -rtr --run-time-repack -gr --graph-reuse -no-gr --no-graph-reuse "
    "-smgs --split-mode-graph-scheduling -no-fug --no-fused-up-gate -khad --k-cache-hadamard -vhad "
    "--v-cache-hadamard -ger --grouped-expert-routing -no-mmad --no-fused-mul-multiadd -rcache --rope-cache "
    "-sas --scheduler-async -smf16 --split-mode-f16 -smf32 --split-mode-f32 -thp --transparent-huge-pages "
    "-vq --validate-quants -mqkv --merge-qkv -muge --merge-up-gate-experts -dsa --dsa -fidx "
    "--fused-indexer-topk --swa-compress --defer-experts --prefetch-experts -no-ooae "
    "--no-offload-only-active-experts -mtp --multi-token-prediction -no-mtp --no-multi-token-prediction").split()}
IK_ONLY.update({s: 1 for s in (
    "-mla --mla-use -amb --attention-max-batch -ser --smart-expert-reduction -dsatk --dsa-top-k -fdn "
    "--fused-delta-net -grt --graph-reduce-type -gap --graph-attn-precision -gfm --gpu-fit-margin --fit-margin "
    "-cuda --cuda-params -draft --draft-params --prefetch-experts-threads -wgt --worst-graph-tokens -mea "
    "--max-extra-alloc --max-gpu -op --offload-policy -ictk --indexer-cache-type-k -ctk-first "
    "--cache-type-k-first -ctk-last --cache-type-k-last -ctv-first --cache-type-v-first -ctv-last "
    "--cache-type-v-last -mtprot --mtp-requantize-output-tensor").split()})

# Other flags of either fork: they do not change where weights go or what the estimate reads.
OTHER_KNOWN: dict[str, int] = {s: 0 for s in (
    "--mlock --no-mmap --mmap --jinja --no-jinja -cnv --conversation -no-cnv --no-conversation -i "
    "--interactive -if --interactive-first -cb --cont-batching -nocb --no-cont-batching -nkvo --no-kv-offload "
    "-kvo --kv-offload --no-warmup --warmup -v --verbose --log-disable --metrics --slots --no-slots --props "
    "--embedding --embeddings --rerank -sp --special --no-context-shift --context-shift --swa-full -kvu "
    "--kv-unified --no-op-offload --no-repack --repack --no-host -e --escape --no-escape --ignore-eos "
    "--perplexity --kl-divergence --check-tensors --simple-io -mli --multiline-input -co --color "
    "--no-display-prompt --verbose-prompt --list-devices -cmoed --cpu-moe-draft").split()}
OTHER_KNOWN.update({s: 1 for s in (
    "-mu --model-url -hf -hfr --hf-repo -hff --hf-file -hft --hf-token -a --alias --host --port -p --prompt "
    "-f --file -n --predict --n-predict -s --seed --temp --top-k --top-p --min-p --repeat-penalty "
    "--repeat-last-n --presence-penalty --frequency-penalty -tb --threads-batch --numa -lm --load-mode "
    "--chat-template --chat-template-file --api-key --api-key-file -to --timeout --threads-http -dt "
    "--defrag-thold --rope-scaling --rope-scale --rope-freq-base --rope-freq-scale --yarn-orig-ctx -md "
    "--model-draft -ngld --gpu-layers-draft --n-gpu-layers-draft -otd --override-tensor-draft -ncmoed "
    "--n-cpu-moe-draft -devd --device-draft -ctkd --cache-type-k-draft -ctvd --cache-type-v-draft -cd "
    "--ctx-size-draft --draft --draft-max --draft-n --draft-min --draft-p-min --mmproj --lora "
    "--reasoning-format --reasoning-budget --spec-type -ns --sequences --keep --chunks --cache-reuse "
    "--slot-save-path --log-file --verbosity -cram --cache-ram -ctxcp --ctx-checkpoints -fitt --fit-target "
    "--grammar --grammar-file -j --json-schema -r --reverse-prompt --in-prefix --in-suffix -l --logit-bias "
    "--rpc --path -sys --system-prompt").split()})
OTHER_KNOWN.update({"-fit": OPTIONAL, "--fit": OPTIONAL})

FLAG_VALUES = {"fa": {"on", "off", "auto", "1", "0", "-1", "true", "false", "enabled", "disabled"},
               "-fit": {"on", "off", "true", "false", "1", "0", "enabled", "disabled"}}
FLAG_VALUES["--fit"] = FLAG_VALUES["-fit"]
SPLIT_MODES = ("none", "layer", "row", "tensor", "graph", "attn")
NUMBER_RE = re.compile(r"^-?\d+(\.\d*)?$")


@dataclass
class ParsedArgs:
    placement: Placement
    run_config: RunConfig
    report: list[tuple[str, str, str]]       # (flag, status, message)
    layer_devices: list[str]
    overrides: list[Rule]                     # -ot, --cpu-moe, --n-cpu-moe in command-line order
    n_gpu_layers: int                         # as given; negative: all ('auto', 'all')
    tensor_split: list[float] | None
    model_path: str | None = None             # -m
    override_kv: tuple[str, ...] = ()         # --override-kv, one KEY=TYPE:VALUE each, in order
    warnings: tuple[str, ...] = ()            # settings llama.cpp refuses or changes (refused_combinations)


@dataclass
class _State:
    cpu: str
    device_names: list[str]
    report: list[tuple[str, str, str]] = field(default_factory=list)
    n_gpu_layers: int | None = None
    tensor_split: list[float] | None = None
    split_mode: str = "layer"
    main_gpu: int = 0
    gpu_filter: list[str] | None = None
    overrides: list[Rule] = field(default_factory=list)
    run: dict = field(default_factory=dict)
    model_path: str | None = None
    override_kv: list[str] = field(default_factory=list)
    n_layer: int = 0            # the model's; --n-cpu-moe past it adds no rules

    def note(self, flag: str, status: str, message: str) -> None:
        self.report.append((flag, status, message))


MAX_INT_FLAG = (1 << 31) - 1       # llama.cpp reads these flags with std::stoi


def _int(flag: str, value: str, minimum: int | None = None) -> int:
    try:
        number = int(value) if len(value) < 20 else int("x")
    except ValueError:
        raise ValueError(f"{flag}: expected a whole number, got {value[:40]!r}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{flag}: must be at least {minimum}, got {number}")
    if abs(number) > MAX_INT_FLAG:
        raise ValueError(f"{flag}: {number} is out of range (llama.cpp reads a 32-bit integer)")
    return number


def _looks_like_flag(token: str) -> bool:
    return token.startswith("-") and not NUMBER_RE.match(token)


def parse_llama_args(args: str | Sequence[str], inventory: Inventory, devices: Sequence,
                     base: RunConfig | None = None, dialect: str = LLAMA_CPP) -> ParsedArgs:
    """A llama.cpp / ik_llama.cpp command line -> placement, run settings and a per-flag report.

    Settings the line does not give are the tool's defaults (`base`, normally left out), not
    whatever was set before: a pasted line means what it means to llama.cpp."""
    base = DIALECTS[dialect] if base is None else base
    tokens = shlex.split(args) if isinstance(args, str) else list(args)
    names = [d.name for d in devices]
    state = _State(cpu="CPU" if "CPU" in names else names[0], device_names=names, run={}, n_layer=inventory.n_layer)
    i = 0
    if tokens and not tokens[0].startswith("-"):
        state.note(tokens[0], IGNORED, "program name")
        i = 1
    while i < len(tokens):
        i = _parse_one(tokens, i, state)
    return _finish(state, inventory, devices, base)


def _parse_one(tokens: list[str], i: int, state: _State) -> int:
    flag = tokens[i]
    spelled = flag.replace("_", "-") if flag.startswith("--") else flag    # as common/arg.cpp does
    if not spelled.startswith("-"):
        state.note(flag, IGNORED, "not a flag; skipped")
        return i + 1
    key, arity = HANDLED.get(spelled, (None, None))
    table_arity = IK_ONLY.get(spelled, OTHER_KNOWN.get(spelled))
    if arity is None:
        arity = table_arity if table_arity is not None else (
            1 if i + 1 < len(tokens) and not _looks_like_flag(tokens[i + 1]) else 0)
    allowed = FLAG_VALUES.get(key or spelled)
    if arity == OPTIONAL:
        arity = 1 if i + 1 < len(tokens) and tokens[i + 1].lower() in allowed else 0
    if i + arity >= len(tokens):
        raise ValueError(f"{flag}: expects a value")
    value = tokens[i + 1] if arity else None
    if key is not None:
        _HANDLERS[key](state, flag, value)
    elif spelled in IK_ONLY:
        state.note(flag, IGNORED, "ik_llama.cpp option; it does not change the placement or the estimate here")
    elif spelled in OTHER_KNOWN:
        state.note(flag, NOT_PLACEMENT, "does not change where weights go")
    else:
        taken = f"; took {value!r} as its value" if value is not None else ""
        state.note(flag, IGNORED, f"unknown flag{taken}")
    return i + 1 + arity


def _n_gpu_layers(state: _State, flag: str, value: str) -> None:
    if value in ("auto", "all"):
        state.n_gpu_layers = -1 if value == "auto" else -2
        extra = " (llama.cpp's --fit may lower it to fit free memory)" if value == "auto" else ""
        state.note(flag, APPLIED, f"all layers on the GPUs{extra}")
        return
    state.n_gpu_layers = _int(flag, value)
    state.note(flag, APPLIED, f"{state.n_gpu_layers} layers (counting the output layer) on the GPUs")


def _tensor_split(state: _State, flag: str, value: str) -> None:
    try:
        split = [float(x) for x in re.split(r"[,/]+", value) if x != ""]
    except ValueError:
        raise ValueError(f"{flag}: expected proportions like 3,1 or 3/1, got {value!r}") from None
    if not split or any(not math.isfinite(x) or x < 0 for x in split):     # float() reads "nan" and "inf"
        raise ValueError(f"{flag}: proportions must be non-negative numbers, got {value!r}")
    state.tensor_split = split
    state.note(flag, APPLIED, "layer proportions " + ", ".join(f"{x:g}" for x in split))


def _split_mode(state: _State, flag: str, value: str) -> None:
    if value not in SPLIT_MODES:
        raise ValueError(f"{flag}: expected one of {', '.join(SPLIT_MODES)}, got {value!r}")
    state.split_mode = "layer" if value in ("graph", "attn", "tensor") else value
    if value == "none":
        state.note(flag, APPLIED, "one GPU only: the main GPU (-mg)")
    elif value == "layer":
        state.note(flag, APPLIED, "layers split across GPUs")
    else:
        state.note(flag, APPLIED, f"'{value}' splits each matrix across GPUs; planned here as a layer split")


def _main_gpu(state: _State, flag: str, value: str) -> None:
    state.main_gpu = _int(flag, value)
    state.run["main_gpu"] = state.main_gpu
    state.note(flag, APPLIED, f"main GPU {state.main_gpu} (places weights only with -sm none)")


def _override_tensor(state: _State, flag: str, value: str) -> None:
    for item in value.split(","):
        pattern, sep, buffer = item.partition("=")
        if not sep:
            raise ValueError(f"{flag}: expected <tensor pattern>=<buffer type>, got {item!r}")
        if buffer not in state.device_names:
            hint = "; a host buffer is not accepted here, use CPU" if "Host" in buffer else ""
            raise ValueError(f"{flag} {item}: unknown buffer type {buffer!r}; available: "
                             f"{', '.join(state.device_names)}{hint}")
        compile_rules([(pattern, buffer)])
        state.overrides.append((pattern, buffer))
    state.note(flag, APPLIED, f"{len(value.split(','))} override(s), first match wins")


def _cpu_moe(state: _State, flag: str, value: str | None) -> None:
    state.overrides.append((CPU_MOE_REGEX, state.cpu))
    state.note(flag, APPLIED, "routed-expert tensors of all layers on the CPU")


def _n_cpu_moe(state: _State, flag: str, value: str, regex: str = CPU_MOE_REGEX, what: str = "routed-expert") -> None:
    n = _int(flag, value, minimum=0)
    # llama.cpp adds one rule per layer; layers past the model's last would match nothing (and
    # --n-cpu-moe 10000000 would make ten million rules)
    state.overrides.extend((rf"blk\.{il}{regex}", state.cpu) for il in range(min(n, state.n_layer)))
    state.note(flag, APPLIED, f"{what} tensors of layers 0..{n - 1} on the CPU (as llama.cpp reads it; "
                              f"ik_llama.cpp picks the layers differently)" if n else f"{what}: no layers")


def _n_cpu_ffn(state: _State, flag: str, value: str) -> None:
    _n_cpu_moe(state, flag, value, CPU_FFN_REGEX, "dense FFN")


def _device(state: _State, flag: str, value: str) -> None:
    state.gpu_filter = [] if value == "none" else [d for d in value.split(",") if d]
    state.note(flag, APPLIED, "GPUs used: " + (", ".join(state.gpu_filter) or "none"))


def _run_int(field_name: str, minimum: int, what: str):
    def handler(state: _State, flag: str, value: str) -> None:
        state.run[field_name] = _int(flag, value, minimum)
        state.note(flag, APPLIED, f"{what} {state.run[field_name]}")
    return handler


def _threads(state: _State, flag: str, value: str) -> None:
    state.run["n_threads"] = max(_int(flag, value), 0)     # llama.cpp: 0 or less means all cores
    state.note(flag, APPLIED, f"threads {state.run['n_threads'] or 'all'}")


def _cache_type(field_name: str):
    def handler(state: _State, flag: str, value: str) -> None:
        if value in KV_CACHE_TYPES:
            state.run[field_name] = value
            state.note(flag, APPLIED, f"KV cache {field_name[-1].upper()} as {value}")
            return
        try:
            ggml_types.type_id_by_name(value)
        except ggml_types.UnknownTypeError:
            raise ValueError(f"{flag}: unknown cache type {value!r}; choose one of {', '.join(KV_CACHE_TYPES)}") from None
        state.note(flag, IGNORED, f"cache type {value} is not one llama.cpp's KV cache takes; kept f16 here")
    return handler


def _flash_attn(state: _State, flag: str, value: str | None) -> None:
    value = (value or "on").lower()
    mode = "on" if value in ("on", "1", "true", "enabled") else "off" if value in ("off", "0", "false", "disabled") \
        else "auto"
    state.run["flash_attn"] = mode
    state.note(flag, APPLIED, f"flash attention {mode}")


def _no_flash_attn(state: _State, flag: str, value: None) -> None:
    _flash_attn(state, flag, "off")


def _parallel(state: _State, flag: str, value: str) -> None:
    n = _int(flag, value)
    if n <= 0:
        state.note(flag, IGNORED, "automatic slot count; planned as 1 sequence")
        return
    state.run["n_seq"] = n
    state.note(flag, APPLIED, f"{n} parallel sequences")


def _model(state: _State, flag: str, value: str) -> None:
    state.model_path = value
    state.note(flag, NOT_PLACEMENT, f"model file {value}; kept in the line, the plan is for the open model")


def _override_kv(state: _State, flag: str, value: str) -> None:
    try:
        overrides = parse_override_kv_list(value)
    except (OverrideError, ValueError) as e:
        raise ValueError(f"{flag}: {e}") from None
    state.override_kv.extend(str(o) for o in overrides)
    state.note(flag, APPLIED, f"{len(overrides)} metadata override(s) kept in the line: "
                              + ", ".join(str(o) for o in overrides))


_HANDLERS = {
    "ngl": _n_gpu_layers, "ts": _tensor_split, "sm": _split_mode, "mg": _main_gpu, "ot": _override_tensor,
    "cmoe": _cpu_moe, "ncmoe": _n_cpu_moe, "ncffn": _n_cpu_ffn, "dev": _device,
    "c": _run_int("n_ctx", 0, "context"), "b": _run_int("n_batch", 1, "batch"),
    "ub": _run_int("n_ubatch", 1, "ubatch"), "t": _threads,
    "ctk": _cache_type("type_k"), "ctv": _cache_type("type_v"), "fa": _flash_attn, "nofa": _no_flash_attn,
    "np": _parallel, "m": _model, "okv": _override_kv,
}


def _gpus(state: _State, devices: Sequence) -> list:
    gpus = [d for d in devices if d.is_gpu]
    if state.gpu_filter is not None:
        by_name = {d.name: d for d in gpus}
        unknown = [n for n in state.gpu_filter if n not in by_name]
        if unknown:
            raise ValueError(f"-dev: unknown device {unknown[0]!r}; available: {', '.join(by_name) or 'none'}")
        gpus = [by_name[n] for n in state.gpu_filter]
    if state.split_mode == "none" and gpus:
        if state.main_gpu < 0:
            return []
        if state.main_gpu >= len(gpus):
            raise ValueError(f"-mg {state.main_gpu}: there are {len(gpus)} GPUs (0..{len(gpus) - 1})")
        gpus = [gpus[state.main_gpu]]
    return gpus


def _finish(state: _State, inventory: Inventory, devices: Sequence, base: RunConfig) -> ParsedArgs:
    gpus = _gpus(state, devices)
    n_gpu_layers = state.n_gpu_layers
    if n_gpu_layers is None:
        n_gpu_layers = -1
        if gpus:
            state.note("-ngl", DEFAULT, "not given: llama.cpp's default 'auto' puts all layers on the GPUs")
    if state.tensor_split and len(state.tensor_split) > len(gpus):
        state.note("-ts", IGNORED, f"only the first {len(gpus)} proportions are used ({len(gpus)} GPUs)")
    if state.split_mode != "layer":
        state.run["split_mode"] = state.split_mode
    layer_devices = llama_layer_devices(inventory.n_layer, n_gpu_layers, gpus, state.tensor_split, state.cpu)
    placement = Placement.from_rules(inventory, devices, layer_devices, state.overrides)
    run_config = base.replace(**state.run)
    return ParsedArgs(placement, run_config, state.report, layer_devices, list(state.overrides),
                      n_gpu_layers, state.tensor_split, state.model_path, tuple(state.override_kv),
                      tuple(refused_combinations(run_config, inventory.hparams)))


def refused_combinations(rc: RunConfig, hparams=None) -> list[str]:
    """Settings llama.cpp refuses, or silently changes, when it creates the context
    (llama_init_from_model and the llama_context constructor)."""
    problems = []
    if rc.type_v in QUANTIZED_KV_TYPES and rc.flash_attn == "off":
        problems.append(f"llama.cpp refuses a quantized V cache (-ctv {rc.type_v}) with flash attention off "
                        f"(-fa off): use -fa on or auto, or -ctv f16")
    if getattr(hparams, "is_mla", False) and rc.type_k != rc.type_v:
        problems.append(f"llama.cpp refuses different K and V cache types on an MLA model "
                        f"(-ctk {rc.type_k} -ctv {rc.type_v}): give both the same type")
    if rc.n_ubatch > rc.n_batch:
        problems.append(f"-ub {rc.n_ubatch} is above -b {rc.n_batch}: llama.cpp runs with -ub {rc.n_batch}")
    return problems


def split_points(gpus: Sequence, tensor_split: Sequence[float] | None) -> list[np.float32]:
    """llama.cpp's cumulative split fractions, in float32 as it computes them."""
    weights = [np.float32(x) for x in (list(tensor_split or []) + [0.0] * len(gpus))[:len(gpus)]]
    if all(w == 0 for w in weights):
        weights = [np.float32(d.total_bytes) for d in gpus]     # llama.cpp: free memory
    points, total = [], np.float32(0)
    for w in weights:
        total = np.float32(total + w)
        points.append(total)
    return [np.float32(p / total) for p in points]


def llama_layer_devices(n_layer: int, n_gpu_layers: int, gpus: Sequence, tensor_split: Sequence[float] | None,
                        cpu: str = "CPU") -> list[str]:
    """Device of each repeating layer and (last entry) of the output layer, as load_tensors assigns them."""
    if not gpus:
        return [cpu] * (n_layer + 1)
    n_gpu_layers = n_layer + 1 if n_gpu_layers < 0 else n_gpu_layers
    i_gpu_start = max(n_layer + 1 - n_gpu_layers, 0)
    act_gpu_layers = min(n_gpu_layers, n_layer + 1)
    points = split_points(gpus, tensor_split)
    devices = []
    for il in range(n_layer + 1):
        if il < i_gpu_start or il - i_gpu_start >= act_gpu_layers:
            devices.append(cpu)
            continue
        position = np.float32(il - i_gpu_start) / np.float32(act_gpu_layers)
        devices.append(gpus[min(bisect_right(points, position), len(gpus) - 1)].name)
    return devices


# --- emission ------------------------------------------------------------------------------

HOME_COST = 1000        # a layer whose attention (and KV cache) would sit elsewhere outweighs any -ot rule


@dataclass(frozen=True)
class EmittedArgs:
    args: list[str]
    text: str           # shell-quoted
    exact: bool         # parsing `args` gives every tensor the device the placement gives it
    notes: list[str]
    run_config: RunConfig | None = None     # the settings as written (what parsing `args` gives back)


def emit_llama_args(placement: Placement, run_config: RunConfig, devices: Sequence,
                    use_n_cpu_moe: bool = True, model_path: str | None = None,
                    override_kv: Sequence[str] = (), dialect: str = LLAMA_CPP) -> EmittedArgs:
    """The shortest command line we find that places every tensor as `placement` does, with
    `-m`, the run settings and the metadata overrides, for llama.cpp or ik_llama.cpp."""
    missing = set(placement.device_names) - {d.name for d in devices}
    if missing:
        raise ValueError(f"the placement uses {', '.join(sorted(missing))}, which is not among the devices")
    defaults = DIALECTS[dialect]
    notes: list[str] = []
    targets = _whole_tensor_devices(placement, notes)
    gpus = [d for d in devices if d.is_gpu]
    layer_args, layer_devices, run_config = _layer_args(placement, targets, gpus, run_config, notes)
    run_config = _as_written(run_config, dialect)
    base = _base_devices(placement, layer_devices)
    macros = _moe_macros(placement, use_n_cpu_moe and dialect == LLAMA_CPP)
    rules, macros = synthesize_rules(placement, targets, base, macros)
    moe_args = [arg for macro in macros for arg in macro.text.split()]
    head = (["-m", str(model_path)] if model_path else []) + layer_args
    tail = _run_args(run_config, defaults) + [a for kv in override_kv for a in ("--override-kv", kv)]
    args = _assemble(head, rules, moe_args, tail)
    mismatched = _mismatches(args, placement, devices, targets, dialect)
    if mismatched:      # a safety net: pin each one with an exact pattern ahead of the others
        notes.append(f"{len(mismatched)} tensors the rule search missed are pinned by name")
        rules = [(f"^{re.escape(name)}$", device) for name, device in mismatched] + rules
        args = _assemble(head, rules, moe_args, tail)
        if _mismatches(args, placement, devices, targets, dialect):
            notes.append("the command line does not reproduce every tensor's device")
            return EmittedArgs(args, shlex.join(args), False, notes, run_config)
    _note_kv_homes(placement, layer_devices, notes)
    notes += refused_combinations(run_config, placement.inventory.hparams)
    return EmittedArgs(args, shlex.join(args), not placement.split_tensors(), notes, run_config)


def _as_written(rc: RunConfig, dialect: str) -> RunConfig:
    """The settings a line can carry: ik_llama.cpp has no 'auto' flash attention (it means on)."""
    if dialect == IK_LLAMA_CPP and rc.flash_attn == "auto":
        return rc.replace(flash_attn="on")
    return rc


def _moe_macros(placement: Placement, use_n_cpu_moe: bool) -> list[RuleMacro]:
    cpu = placement.input_device
    macros = [RuleMacro("--cpu-moe", CPU_MOE_REGEX, None, cpu)]
    if use_n_cpu_moe:   # ik_llama.cpp reads --n-cpu-moe differently: leave it out for ik
        macros += [RuleMacro(f"--n-cpu-moe {n}", CPU_MOE_REGEX, range(n), cpu) for n in range(1, placement.n_layer + 1)]
    return macros


def _whole_tensor_devices(placement: Placement, notes: list[str]) -> list[str]:
    split = placement.split_tensors()
    if split:
        shown = ", ".join(f"{name} ({_mib_by_device(placement.device_bytes(name))})" for name in split[:4])
        more = f" and {len(split) - 4} more" if len(split) > 4 else ""
        notes.append(f"llama.cpp cannot split one tensor's experts across devices: {shown}{more}; "
                     f"each is placed whole on the device that holds most of its bytes")
    return [placement.device_of(name) for name in placement.names]


def _mib_by_device(sizes: dict[str, int]) -> str:
    return ", ".join(f"{device} {n_bytes / (1 << 20):.0f} MiB" for device, n_bytes in sizes.items())


def _base_devices(placement: Placement, layer_devices: list[str]) -> list[str]:
    return [placement.input_device if slot < 0 else layer_devices[slot] for slot in placement.slots]


def _layer_states(placement: Placement, targets: list[str], states: list[str]) -> list[int]:
    """Per layer slot (and the output), the state llama.cpp's -ngl/-ts can give that fits best.

    States: 0 is the CPU, 1.. the GPUs in order; the CPU layers come first and the GPU index
    never decreases (load_tensors' split), found by dynamic programming over the layers.
    """
    n_slot = placement.n_layer + 1
    counts = [dict() for _ in range(n_slot)]
    for slot, device in zip(placement.slots, targets):
        if slot >= 0:
            counts[slot][device] = counts[slot].get(device, 0) + 1
    homes = [placement.layer_home_device(il) for il in range(placement.n_layer)] + [placement.output_device()]
    costs = [[HOME_COST * (homes[p] != s) + sum(counts[p].values()) - counts[p].get(s, 0) for s in states]
             for p in range(n_slot)]
    best, back = costs[0], []
    for p in range(1, n_slot):
        prev = [0 if s == 0 else min(range(s + 1), key=best.__getitem__) for s in range(len(states))]
        best = [best[q] + costs[p][s] for s, q in enumerate(prev)]
        back.append(prev)
    state = min(range(len(states)), key=best.__getitem__)
    path = [state]
    for prev in reversed(back):
        state = prev[state]
        path.append(state)
    return path[::-1]


def _layer_args(placement: Placement, targets: list[str], gpus: list, rc: RunConfig,
                notes: list[str]) -> tuple[list[str], list[str], RunConfig]:
    """-ngl, -ts and -sm for the best layer split; the layer devices; the run config as written."""
    n_layer, cpu = placement.n_layer, placement.input_device
    if not gpus:        # -sm and -mg mean nothing without a GPU: llama.cpp's defaults
        return [], [cpu] * (n_layer + 1), rc.replace(split_mode="layer", main_gpu=0)
    path = _layer_states(placement, targets, [cpu] + [d.name for d in gpus])
    first_gpu = next((p for p, s in enumerate(path) if s), n_layer + 1)
    n_gpu_layers = n_layer + 1 - first_gpu
    want = [cpu if s == 0 else gpus[s - 1].name for s in path]
    args = ["-ngl", str(n_gpu_layers)]
    used = sorted({s - 1 for s in path if s})
    if rc.split_mode == "none" and len(used) <= 1:
        main_gpu = used[0] if used else min(max(rc.main_gpu, 0), len(gpus) - 1)
        return args + ["-sm", "none"], want, rc.replace(main_gpu=main_gpu)
    if rc.split_mode == "none":
        notes.append("split mode 'none' keeps one GPU; this plan uses several, so it is written as a layer split")
        rc = rc.replace(split_mode="layer")
    if rc.split_mode == "row":
        args += ["-sm", "row"]
        notes.append("-sm row splits each matrix across the GPUs; the plan models it as a layer split")
    split = _shortest_split(n_layer, n_gpu_layers, gpus, path, want)
    return args + (["-ts", ",".join(str(x) for x in split)] if split else []), want, rc


def _shortest_split(n_layer: int, n_gpu_layers: int, gpus: list, path: list[int], want: list[str]) -> list[int]:
    """The -ts with the smallest sum whose split points give each GPU its layers."""
    if len(gpus) < 2 or n_gpu_layers == 0:
        return []
    counts = [sum(1 for s in path if s == g + 1) for g in range(len(gpus))]
    cumulative = list(np.cumsum(counts))
    act = cumulative[-1]
    for total in range(1, act + 1):
        points = [c * total // act for c in cumulative]
        if any(c and s * act <= (c - 1) * total for s, c in zip(points, cumulative)):
            continue
        split = [b - a for a, b in zip([0] + points[:-1], points)]
        if llama_layer_devices(n_layer, n_gpu_layers, gpus, split) == want:
            while split and split[-1] == 0:
                split.pop()
            return split
    return counts


def _assemble(head: list[str], rules: list[Rule], moe_args: list[str], tail: list[str]) -> list[str]:
    args = list(head)
    if rules:
        args += ["-ot", ",".join(f"{pattern}={device}" for pattern, device in rules)]
    return args + moe_args + tail


def _run_args(rc: RunConfig, defaults: RunConfig = LLAMA_CPP_DEFAULTS) -> list[str]:
    args = []
    for flag, name in (("-mg", "main_gpu"), ("-c", "n_ctx"), ("-b", "n_batch"), ("-ub", "n_ubatch"),
                       ("-ctk", "type_k"), ("-ctv", "type_v"), ("-fa", "flash_attn"), ("-np", "n_seq"),
                       ("-t", "n_threads")):
        if getattr(rc, name) != getattr(defaults, name):
            args += [flag, str(getattr(rc, name))]
    return args


def _mismatches(args: list[str], placement: Placement, devices: Sequence, targets: list[str],
                dialect: str = LLAMA_CPP) -> list[tuple[str, str]]:
    parsed = parse_llama_args(args, placement.inventory, devices, dialect=dialect)
    got = parsed.placement
    return [(name, want) for name, want in zip(placement.names, targets) if got.device_of(name) != want]


def _note_kv_homes(placement: Placement, layer_devices: list[str], notes: list[str]) -> None:
    moved = [il for il in range(placement.n_layer) if placement.layer_home_device(il) != layer_devices[il]]
    if moved:
        shown = ", ".join(map(str, moved[:8])) + (" ..." if len(moved) > 8 else "")
        notes.append(f"layer{'s' if len(moved) > 1 else ''} {shown}: attention moved by -ot; llama.cpp keeps "
                     f"the KV cache on the layer's -ngl/-ts device")
