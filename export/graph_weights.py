"""The weights inside an export's ONNX graphs, named after the modules they came from and read back as PyTorch
tensors: what the torch backend runs from, so that an export folder alone (never the source checkpoint) is
enough on a GPU without TensorRT.

Naming (format version 4): the exporter keeps a parameter's module path as its initializer name where the
graph holds it as it is (norms, biases, Gemm weights); a weight the graph holds transposed as a MatMul operand
(W^T, [in, out]) is renamed to its linear's module path, without ``.weight``. The quantizer then names a
quantized linear ``<path>_DQ_Q4`` (int4 QDQ, with ``<path>_DQ_scales``) or ``<path>_Q8`` (MatMulNBits). Paths
are relative to the module each graph was exported from (the trunk graph's start with ``trunk.``).

Parameters of equal value (a checkpoint fresh from its config: every bias zeros, every norm weight ones) are
held once: the ONNX exporter keeps one initializer for tensors of equal value. The exporter therefore records,
in the graph's ``weight_aliases`` metadata, which initializer holds each parameter that has none of its own name
(``record_weight_aliases``); the loaders look a name up there when the graph has no initializer of that name.
An all-zero bias may not be in the graph at all (the exporter drops a Gemm's zero bias): those are listed in
``weight_zeros``, and loaded as zeros.

Tensors are read one at a time (external data through a memory map), so loading holds at most one tensor on
the host beside what is already on the device.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from models.errors import CheckpointError

_SUFFIX = re.compile(r"(_DQ)?_Q[48]$")
ALIASES_KEY = "weight_aliases"  # graph metadata: {name a loader looks up: the initializer holding that weight}
ZEROS_KEY = "weight_zeros"  # graph metadata: names of all-zero weights the graph folded away (a Gemm's bias)
_FLOAT_TYPES = (1, 10, 11, 16)  # float32, float16, float64, bfloat16


def _fingerprint(a: np.ndarray) -> tuple:
    flat = a.reshape(-1)
    return (a.shape, flat[: 64].tobytes(), flat[-64:].tobytes())


def linears(module: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every linear of ``module`` by module path."""
    return {name: mod for name, mod in module.named_modules() if isinstance(mod, torch.nn.Linear)}


def name_graph_weights(path: Path, module: torch.nn.Module) -> None:
    """``name_matmul_weights`` on the graph file at ``path`` (external data is read, not rewritten)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    name_matmul_weights(proto, module, Path(path).parent)
    onnx.save(proto, str(path))


def name_matmul_weights(model_proto, module: torch.nn.Module, base_dir: Path | None = None) -> dict[str, str]:
    """Rename the MatMul weight initializers of a graph exported from ``module`` after the linears they hold
    (matched by value; the exporter's names are arbitrary), in place. Returns the MatMul node names keyed by
    linear path, for every linear held as a MatMul operand (one held under its own name is left as it is).
    ``base_dir``: where the graph's external data lies, when its initializers were loaded without it."""
    inits = {i.name: i for i in model_proto.graph.initializer}
    want: dict[tuple, list[tuple[str, np.ndarray]]] = {}
    for name, lin in linears(module).items():
        if f"{name}.weight" in inits:
            continue  # held as it is (a Gemm with transB, for instance)
        w = lin.weight.detach().float().cpu().t().contiguous().numpy()
        want.setdefault(_fingerprint(w), []).append((name, w))
    wanted = {n for group in want.values() for n, _ in group}
    nodes: dict[str, str] = {}
    for node in model_proto.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        init = inits[node.input[1]]  # keyed by the name it had before this pass
        node.input[1] = init.name
        if init.name in wanted:  # renamed here or on an earlier pass
            nodes.setdefault(init.name, node.name)
            continue
        arr = read_initializer(init, base_dir).float().numpy()
        for name, w in want.get(_fingerprint(arr), []):
            if name not in nodes and np.array_equal(arr, w):
                init.name = node.input[1] = name
                nodes[name] = node.name
                break
    missing = sorted(n for group in want.values() for n, _ in group if n not in nodes)
    if missing:
        raise CheckpointError(f"the exported graph holds no weight of {', '.join(missing[:3])}"
                              f"{' ...' if len(missing) > 3 else ''}; cannot name its weights")
    return nodes


def _metadata(proto, key: str, kind: type):
    for prop in proto.metadata_props:
        if prop.key == key:
            try:
                value = json.loads(prop.value)
            except json.JSONDecodeError:
                value = None
            items = value.items() if isinstance(value, dict) else ((v, "") for v in value or ())
            if not (isinstance(value, kind) and all(isinstance(k, str) and isinstance(v, str) for k, v in items)):
                raise CheckpointError(f"the graph's {key} metadata is not a {kind.__name__} of names; re-export")
            return value
    return kind()


def weight_aliases(proto) -> dict[str, str]:
    """The graph's recorded aliases (``{}`` for a graph that has none)."""
    return _metadata(proto, ALIASES_KEY, dict)


def weight_zeros(proto) -> list[str]:
    """The parameters the graph holds no initializer for because they are zeros it folded away."""
    return _metadata(proto, ZEROS_KEY, list)


def record_weight_aliases(path: Path, module: torch.nn.Module) -> dict[str, str]:
    """Record in the graph at ``path`` (exported from ``module``; named, and quantized where it is) which
    initializer holds each parameter the graph has no initializer of that name for, matched by value. The name
    is the one ``fill_from_graph`` looks up: the parameter's own, or a MatMul-held linear's module path (its
    weight transposed). A parameter matched by nothing that is all zeros was folded away by the exporter (a Gemm's
    zero bias) and is listed as such. Returns the aliases; a parameter matched by nothing else is left to the
    loader to report."""
    import onnx

    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    held = set(quantized_linears(proto))
    lins = linears(module)
    wanted: dict[str, np.ndarray] = {}  # lookup name -> the value, as the graph holds it
    for name, p in module.named_parameters():
        owner = name.rpartition(".")[0]
        if name in inits:
            continue
        if name.endswith(".weight") and owner in lins:
            if owner not in inits and owner not in held:  # a quantized one's codes are named after it
                wanted[owner] = p.detach().float().cpu().t().contiguous().numpy()
            continue
        wanted[name] = p.detach().float().cpu().numpy()
    aliases: dict[str, str] = {}
    if wanted:
        by_print: dict[tuple, list[str]] = {}
        for name, a in wanted.items():
            by_print.setdefault(_fingerprint(a), []).append(name)
        shapes = {a.shape for a in wanted.values()}
        maps: dict[str, np.memmap] = {}
        for init in proto.graph.initializer:
            if init.data_type not in _FLOAT_TYPES or tuple(init.dims) not in shapes:
                continue
            a = read_initializer(init, path.parent, maps).float().numpy()
            for name in by_print.get(_fingerprint(a), []):
                if name not in aliases and np.array_equal(a, wanted[name]):
                    aliases[name] = init.name
        del maps
    zeros = sorted(n for n, a in wanted.items() if n not in aliases and not a.any())
    kept = [p for p in proto.metadata_props if p.key not in (ALIASES_KEY, ZEROS_KEY)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    if aliases:
        proto.metadata_props.add(key=ALIASES_KEY, value=json.dumps(aliases, sort_keys=True))
    if zeros:
        proto.metadata_props.add(key=ZEROS_KEY, value=json.dumps(zeros))
    onnx.save(proto, str(path))
    return aliases


# -- reading ----------------------------------------------------------------------------------------------------

_NUMPY = {1: np.float32, 10: np.float16, 16: np.int16, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64,
          11: np.float64, 9: np.bool_, 22: np.uint8}  # 16: bfloat16's bits; 22: int4, two per byte


def _tensor(init, raw: bytes | np.ndarray | None) -> torch.Tensor:
    from onnx import numpy_helper

    dims = tuple(init.dims)
    if raw is None:  # stored in the typed fields (small tensors)
        a = np.ascontiguousarray(numpy_helper.to_array(init))
        if init.data_type == 16:
            return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(a.astype(np.int8) if init.data_type == 22 else a.copy())
    dt = _NUMPY.get(init.data_type)
    if dt is None:
        raise CheckpointError(f"initializer {init.name} has ONNX type {init.data_type}, which this loader does not "
                              "read; re-export")
    a = np.array(raw).view(dt) if isinstance(raw, np.ndarray) else np.frombuffer(raw, dtype=dt).copy()
    if init.data_type == 22:  # int4: low nibble first, sign-extended
        n = int(np.prod(dims))
        a = np.stack((a & 0xF, a >> 4), axis=-1).reshape(-1)[:n].astype(np.int8)
        a[a >= 8] -= 16
    t = torch.from_numpy(a.reshape(dims))
    return t.view(torch.bfloat16) if init.data_type == 16 else t


def read_initializer(init, base_dir: Path | None = None, maps: dict | None = None) -> torch.Tensor:
    """One initializer as a host tensor; external data is read from ``base_dir`` through a memory map (kept in
    ``maps`` for the next one)."""
    import onnx

    if init.data_location != onnx.TensorProto.EXTERNAL:
        return _tensor(init, init.raw_data if init.raw_data else None)
    info = {e.key: e.value for e in init.external_data}
    maps = {} if maps is None else maps
    name = info["location"]
    if name not in maps:
        maps[name] = np.memmap(Path(base_dir or ".") / name, dtype=np.uint8, mode="r")
    offset = int(info.get("offset", 0))
    length = int(info.get("length", maps[name].shape[0] - offset))
    return _tensor(init, maps[name][offset: offset + length])


def iter_initializers(path: Path, proto=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor on the host) for every initializer of the graph at ``path``, one at a time."""
    import onnx

    path = Path(path)
    proto = proto or onnx.load(str(path), load_external_data=False)
    maps: dict[str, np.memmap] = {}
    for init in proto.graph.initializer:
        yield init.name, read_initializer(init, path.parent, maps)


def quantized_linears(proto) -> dict[str, dict]:
    """Every quantized linear of a graph, by module path: its initializer names and MatMulNBits parameters
    (``bits``, ``block_size``, ``k``, ``n``, ``form``: ``qdq`` or ``matmulnbits``)."""
    import onnx

    out: dict[str, dict] = {}
    inits = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits":
            names = [n for n in node.input[1:4]] + [""] * 3
            out[_SUFFIX.sub("", node.input[1])] = {
                "form": "matmulnbits", "codes": names[0], "scales": names[1], "zero_points": names[2] or None,
                "bits": attrs["bits"], "block_size": attrs["block_size"], "k": attrs["K"], "n": attrs["N"]}
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits:
            k, n = inits[node.input[0]].dims
            zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
            out[_SUFFIX.sub("", node.input[0])] = {
                "form": "qdq", "codes": node.input[0], "scales": node.input[1], "zero_points": zp,
                "bits": 4 if inits[node.input[0]].data_type in (21, 22) else 8,
                "block_size": attrs.get("block_size", k), "k": k, "n": n}
    return out


def matmulnbits_tensors(entry: dict, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One quantized linear's tensors in MatMulNBits layout (codes [N, blocks, block * bits / 8], scales
    [N, blocks], zero points or none), from either form the graph holds it in."""
    if entry["form"] == "matmulnbits":
        return {k: parts[entry[k]] for k in ("codes", "scales", "zero_points") if entry[k]}
    if entry["zero_points"]:
        raise CheckpointError(f"{entry['codes']}: an asymmetric QDQ weight; this runtime reads symmetric ones only")
    q = parts[entry["codes"]].to(torch.int16)  # [K, N] signed codes
    mid = 1 << (entry["bits"] - 1)
    u = (q + mid).to(torch.uint8).t().contiguous()  # [N, K] stored (unsigned) codes
    n, b = u.shape[0], entry["block_size"]
    if entry["bits"] == 4:
        u = u[:, 0::2] | (u[:, 1::2] << 4)
    return {"codes": u.reshape(n, -1, b * entry["bits"] // 8).contiguous(),
            "scales": parts[entry["scales"]].t().contiguous()}


def fill_from_graph(module: torch.nn.Module, path: Path, dtype: torch.dtype, device,
                    quantized: bool = False) -> dict:
    """Fill ``module`` (built on the meta device, the module the graph was exported from) with the graph's
    weights on ``device``; a quantized graph's linears become ``QuantLinear`` (packed for the GPU kernels on
    CUDA). Returns what was loaded: ``{"float_bytes", "quantized_bytes", "quantized_linears", "kernels"}``."""
    import onnx

    from models.quantized import QuantLinear, backward_block

    proto = onnx.load(str(path), load_external_data=False)
    params = dict(module.named_parameters())
    lin_paths = set(linears(module))
    serves: dict[str, list[str]] = {}  # initializer -> the other names it holds the weight of
    for alias, init_name in weight_aliases(proto).items():
        serves.setdefault(init_name, []).append(alias)
    quant = quantized_linears(proto) if quantized else {}
    owner = {entry[k]: p for p, entry in quant.items() for k in ("codes", "scales", "zero_points") if entry[k]}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    state: dict[str, torch.Tensor] = {}
    report = {"float_bytes": 0, "quantized_bytes": 0, "quantized_linears": 0, "kernels": set()}
    on_cuda = torch.device(device).type == "cuda"
    for name, t in iter_initializers(path, proto):
        if name in owner:
            p = owner[name]
            parts = pending.setdefault(p, {})
            parts[name] = t
            entry = quant[p]
            if all(parts.get(entry[k]) is not None for k in ("codes", "scales", "zero_points") if entry[k]):
                lin = module.get_submodule(p)
                tensors = matmulnbits_tensors(entry, pending.pop(p))
                layer = QuantLinear(entry["k"], entry["n"], entry["bits"], entry["block_size"], tensors,
                                    backward_block(entry["n"], entry["block_size"]))
                if on_cuda:
                    layer.pack(device, dtype, p)
                    report["quantized_bytes"] += layer.packed_bytes()
                    report["kernels"] |= layer.kernels()
                else:
                    report["quantized_bytes"] += sum(v.numel() * v.element_size() for v in tensors.values())
                layer.bias = lin.bias  # still meta: filled from its own initializer
                module.set_submodule(p, layer)
                report["quantized_linears"] += 1
            continue
        for held in (name, *serves.get(name, ())):
            if held in params:
                key, value = held, t
            elif held in lin_paths:  # a MatMul operand: W^T
                key, value = f"{held}.weight", t.t()
            else:
                continue  # buffers (recomputed from the config) and graph constants
            if key in params and key not in state:
                if tuple(value.shape) != tuple(params[key].shape):
                    raise CheckpointError(f"{path.name}: initializer {name} holds {list(value.shape)} for {key}, "
                                          f"which is {list(params[key].shape)}; re-export")
                value = value if held == name else value.clone()  # each parameter its own storage
                state[key] = value.to(device=device, dtype=dtype).contiguous()
                report["float_bytes"] += state[key].numel() * state[key].element_size()
    for key in weight_zeros(proto):  # folded away by the exporter as no-ops
        name = f"{key}.weight" if key in lin_paths else key
        if name in params and name not in state:
            state[name] = torch.zeros(params[name].shape, device=device, dtype=dtype)
    expected = {k for k, v in module.named_parameters() if v.device.type == "meta"}
    missing = sorted(expected - set(state))
    if missing or pending:
        shown = ", ".join((missing or sorted(pending))[:4])
        raise CheckpointError(f"{path.name} lacks the weights of {shown} (an export written before weights of "
                              "equal value were recorded, or a graph not written by this exporter); re-export with "
                              "`python -m export --force`")
    module.load_state_dict(state, strict=False, assign=True)
    report["kernels"] = sorted(report["kernels"])
    return report
