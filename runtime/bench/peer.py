"""The CPU peer a user would pick instead: onnxruntime-genai's model builder (fp32 and int4 CPU models) on a
text-only Qwen2 (Qwen3 for a Qwen3-VL export) checkpoint of an export's decoder: with the export's own weights where
it keeps floats (``export_weights``; the builder quantizes them for int4), else random weights of its shape. An int4
peer is quantized in the compared int4 export's format (``weight_format``: block size, accuracy level, symmetric
blocks), so both read as many bytes per weight; the builder's default blocks of 32 read about 18% more than an
export's blocks of 128 (fp32 scales: 5 bits a weight against 4.25).

``python -m runtime.bench.peer --engine DIR --precision int4 --json`` builds (once, cached under --work) and times
one model: prefill of ``--prompt-tokens`` random ids, then ``--new-tokens`` greedy tokens; medians of
``--repeats``. Runs in its own process (``runtime.bench`` starts it) so that its peak memory is its own.
``--batch N`` also times N requests generated together (onnxruntime-genai's batching: equal prompts started
together), alternating with single requests, and reports the aggregate decode rate and its ratio to one
request's: the figure in-flight batching (issue 32) is measured against.

With ``--against EXPORT`` it then also loads that export on the ort backend in the same process and alternates
requests, one of each per round (which goes first alternates too), for ``--rounds`` rounds: this machine's
speed drifts by 10-15% over minutes, so two models measured one after the other can differ by more than they
differ; within one round they see the same machine. The report's ``side_by_side`` holds each side's median and
the median and range of the per-round ratios (the peer's memory and TTFT are measured before the export loads).
Needs the optional ``onnxruntime-genai`` package (``pip install -e .[peer]``) and its builder's ``onnx_ir``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from models import checks
from models.errors import UserError, run_cli


def peer_config(text: dict) -> dict:
    """A transformers text-model config with the export decoder's shape: Qwen2 for Qwen2.5-VL, Qwen3 (q/k norms,
    explicit head_dim, no attention bias) for Qwen3-VL."""
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": text["hidden_size"],
           "intermediate_size": text["intermediate_size"], "num_hidden_layers": text["num_hidden_layers"],
           "num_attention_heads": text["num_attention_heads"], "num_key_value_heads": text["num_key_value_heads"],
           "vocab_size": text["vocab_size"], "rms_norm_eps": text["rms_norm_eps"], "rope_theta": text["rope_theta"],
           "tie_word_embeddings": text["tie_word_embeddings"], "max_position_embeddings": 32768,
           "hidden_act": "silu", "torch_dtype": "float32", "bos_token_id": 0, "eos_token_id": 1}
    if text.get("qk_norm"):
        cfg.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=text["head_dim"],
                   attention_bias=bool(text.get("attention_bias", False)))
    return cfg


def float_weights(engine: Path) -> bool:
    """Whether the export keeps its decoder's weights as floats (then the peer takes them: ``export_weights``)."""
    from export.manifest import read_manifest

    return read_manifest(engine)["quantization"].get("scheme", "none") == "none"


def weight_format(engine: Path | None) -> dict[str, str]:
    """The builder's options (its ``--extra_options``) that give the peer an int4 export's weight format: its block
    size, accuracy level and symmetric blocks, so that both read as many bytes per weight (the builder's default
    blocks of 32 carry four times the scales of blocks of 128). Empty (the builder's defaults) where ``engine`` is
    None or not an int4 export."""
    from export.manifest import read_manifest

    q = read_manifest(engine)["quantization"] if engine is not None else {}
    if q.get("scheme") != "int4":
        return {}
    return {"block_size": str(q["block_size"]), "accuracy_level": str(q["accuracy_level"]),
            "is_symmetric": str(bool(q["symmetric"])).lower()}


def export_weights(engine: Path) -> dict:
    """A float export's decoder weights under the names of the transformers text model ``peer_config`` describes:
    the trunk's layers read back from its graph (``model_from_export``; their fused q/k/v and gate/up split again),
    the last layer, final norm, embedding and LM head from head.safetensors (the LM head left out where tied)."""
    import torch

    from export.manifest import read_manifest
    from models.registry import family
    from runtime.backends.torch_ref import model_from_export

    manifest = read_manifest(engine)
    fam = family(manifest["model_type"])
    cfg = fam.Config.from_stored(manifest["config"])
    model = model_from_export(engine, manifest, torch.float32, "cpu")
    head = fam.load_head(cfg, engine / "head.safetensors", torch.float32, "cpu", manifest["quantization"])
    layers = list(model.decoder.layers[:-1]) + [head.layer]
    out = {"model.embed_tokens.weight": head.embed_tokens.weight, "model.norm.weight": head.norm.weight}
    if not head.tied:
        out["lm_head.weight"] = head.lm_head.weight
    for i, layer in enumerate(layers):
        for name, t in layer.state_dict().items():
            part, _, kind = name.rpartition(".")
            if part.endswith("qkv_proj"):
                a = layer.self_attn
                q, k, v = t.split([a.heads * a.head_dim, a.kv_heads * a.head_dim, a.kv_heads * a.head_dim])
                for p, w in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                    out[f"model.layers.{i}.self_attn.{p}.{kind}"] = w
            elif part.endswith("gate_up_proj"):
                gate, up = t.chunk(2)
                out[f"model.layers.{i}.mlp.gate_proj.{kind}"] = gate
                out[f"model.layers.{i}.mlp.up_proj.{kind}"] = up
            else:
                out[f"model.layers.{i}.{name}"] = t
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def against(r, greedy, question: str, n: int) -> dict:
    """The peer's greedy tokens (``measure``'s ``greedy``) against the ``Reasoner`` ``r``'s on the text prompt of
    ``question`` (the peer takes no video), up to ``n`` and as far as both went: how many were compared, whether they
    are equal, and the largest difference between the entropies of the logits each was picked from."""
    s = r.stream(question=question, max_new_tokens=n, template="plain", events=True)
    ours = list(s)
    tokens, entropies = greedy(s.prompt.ids, n)
    m = min(len(ours), len(tokens))
    return {"compared": m, "equal": m > 0 and [e.id for e in ours[:m]] == tokens[:m],
            "entropy_max_abs_diff": max((abs(float(e.entropy) - h) for e, h in zip(ours, entropies)), default=None)}


def build(text: dict, precision: str, work: Path, engine: Path | None = None,
          options: dict[str, str] | None = None) -> Path:
    """The builder's model directory for this shape and precision (built once, then reused). ``engine``: a float
    export whose own weights the model takes (``export_weights``); else random weights of its shape. ``options``:
    the builder's extra options (``weight_format``)."""
    cfg = peer_config(text)
    ident = json.dumps(cfg, sort_keys=True)
    if engine is not None:  # (the export's manifest records its files' digests)
        ident += (Path(engine) / "manifest.json").read_text()
    key = hashlib.sha256(ident.encode()).hexdigest()[:12]
    kind = cfg["model_type"]
    extra = [f"{k}={v}" for k, v in sorted((options or {}).items())]
    tag = "-" + hashlib.sha256(" ".join(extra).encode()).hexdigest()[:8] if extra else ""
    src, out = work / f"{kind}-{key}", work / f"{kind}-{key}-{precision}{tag}"
    if (out / "genai_config.json").is_file():
        return out
    if not (src / "config.json").is_file():
        import torch
        import transformers

        from runtime.engine import apart

        def save() -> None:
            if engine is not None:
                from safetensors.torch import save_file

                src.mkdir(parents=True, exist_ok=True)
                save_file(export_weights(Path(engine)), str(src / "model.safetensors"), metadata={"format": "pt"})
                (src / "config.json").write_text(json.dumps(cfg, indent=1))
                return
            torch.manual_seed(0)
            names = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[kind]
            conf = getattr(transformers, names[0])(**{k: v for k, v in cfg.items() if k != "architectures"})
            getattr(transformers, names[1])(conf).save_pretrained(src)

        apart(save)  # (its PyTorch CPU threads end with it: runtime.engine.apart)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out), "-p", precision,
           "-e", "cpu", "-c", str(work / "cache")] + (["--extra_options", *extra] if extra else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not (out / "genai_config.json").is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"onnxruntime-genai's builder failed for {precision}: {tail[0]}")
    return out


def block_size(model_dir: Path) -> int | None:
    """The block size of a built model's low-bit matmuls (MatMulNBits), as its graph says; None where it has none
    (fp32)."""
    import onnx

    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    sizes = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
    return max(sizes) if sizes else None


def measure(model_dir: Path, prompt_tokens: int, new_tokens: int, repeats: int, vocab: int, batch: int = 1) -> dict:
    import numpy as np
    import onnxruntime_genai as og
    import torch

    from runtime.bench.measure import peak_rss, reset_peak_rss

    config = og.Config(str(model_dir))
    # the same CPU threads as this project's runtime uses; left to itself onnxruntime-genai sized its pool past
    # this container's cores (measured on the bench shape, 2 cores: int4 16 tokens/s by default, 37 with 2)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": torch.get_num_threads()}}}}))
    model = og.Model(config)
    ids = np.random.default_rng(0).integers(10, vocab - 10, prompt_tokens).tolist()

    def once(batch: int = 1) -> tuple[float, float]:
        """(prefill and first token's seconds, seconds per decode step) of one request, or of ``batch`` of them
        generated together (onnxruntime-genai's batching: prompts of one length, started together)."""
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt_tokens + new_tokens, do_sample=False, batch_size=batch)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.array([ids] * batch, dtype=np.int32) if batch > 1 else ids)  # prefill
        gen.generate_next_token()
        t1 = time.perf_counter()
        n = 1
        while n < new_tokens and not gen.is_done():
            gen.generate_next_token()
            n += 1
        return t1 - t0, (time.perf_counter() - t1) / max(n - 1, 1)

    def greedy(prompt: list[int], n: int) -> tuple[list[int], list[float]]:
        """The model's greedy tokens after ``prompt`` (at most ``n``; fewer where it reaches its end token) and the
        entropy (nats, float64) of the logits each was picked from."""
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + n, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens([int(i) for i in prompt])
        entropies = []
        while not gen.is_done():
            gen.generate_next_token()
            logits = np.asarray(gen.get_output("logits"), dtype=np.float64).reshape(-1, vocab)[-1]
            logp = logits - logits.max()
            logp -= np.log(np.exp(logp).sum())
            entropies.append(float(-(np.exp(logp) * logp).sum()))
        return [int(t) for t in gen.get_sequence(0)][len(prompt):], entropies

    once()  # warm-up
    reset_peak_rss()
    runs = [once() for _ in range(repeats)]
    files = sum(f.stat().st_size for f in model_dir.iterdir() if f.suffix in (".onnx", ".data"))
    rep = {"ttft_s": statistics.median(r[0] for r in runs),
           "decode_s_per_token": statistics.median(r[1] for r in runs), "prompt_tokens": prompt_tokens,
           "peak_memory_bytes": peak_rss(), "export_bytes": files, "block_size": block_size(model_dir),
           "once": once, "greedy": greedy}
    if batch > 1:  # measured after the single requests, alternating with them: ratios within one machine state
        pairs = []
        for _ in range(repeats):
            one, many = once()[1], once(batch)[1]
            pairs.append((one, many))
        rep["batch"] = {"size": batch, "decode_s_per_step": statistics.median(m for _, m in pairs),
                        "aggregate_decode_tokens_per_s": batch / statistics.median(m for _, m in pairs),
                        "one_request_decode_tokens_per_s": 1 / statistics.median(o for o, _ in pairs),
                        "aggregate_over_one": statistics.median(batch * o / m for o, m in pairs)}
    return rep


def side_by_side(once, engine: Path, new_tokens: int, rounds: int, seconds: float, work: Path,
                 ort_trunk: str = "auto", prompt_tokens: int | None = None, hugepages: bool = True) -> dict:
    """Decode of ``engine`` on the ort backend (the benchmark's request: its clip and question) and of the peer
    (``once``, from ``measure``), alternating one request each per round; see the module docstring."""
    from runtime.bench.exports import WORKLOAD, bench_clip, run_once
    from runtime.bench.measure import load

    r = load(engine, hugepages, backend="ort", reuse_mb=0, ort_trunk=ort_trunk)
    prompt = r.prepare(question=WORKLOAD, video=bench_clip(work, seconds), max_new_tokens=new_tokens)
    if prompt_tokens is not None and len(prompt.ids) != prompt_tokens:
        raise UserError(f"the benchmark request on {engine} is {len(prompt.ids)} prompt tokens with a {seconds:g} s "
                        f"clip and the peer's is {prompt_tokens}: pass --prompt-tokens {len(prompt.ids)}")

    def ours() -> float:
        return run_once(r, prompt, new_tokens)["decode_s_per_token"]

    ours()  # warm-up
    pairs = []
    for i in range(rounds):
        if i % 2:
            o = ours()
            p = once()[1]
        else:
            p = once()[1]
            o = ours()
        pairs.append((o, p))
    ratios = [p / o for o, p in pairs]
    return {"engine": str(engine), "rounds": rounds, "prompt_tokens": len(prompt.ids),
            "decode_tokens_per_s": 1 / statistics.median(o for o, _ in pairs),
            "peer_decode_tokens_per_s": 1 / statistics.median(p for _, p in pairs),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "trunk": r.backend.trunk_form}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.bench.peer", description=checks.description(__doc__),
                                 formatter_class=checks.HelpFormatter)
    ap.add_argument("--engine", required=True, help="export directory whose decoder shape is copied")
    ap.add_argument("--precision", choices=("fp32", "int4"), default="int4", help="the builder's precision")
    ap.add_argument("--prompt-tokens", type=int, default=285, help="prefill length")
    ap.add_argument("--new-tokens", type=int, default=32, help="generated tokens per measured request")
    ap.add_argument("--repeats", type=int, default=3, help="measured requests (the median is reported)")
    ap.add_argument("--work", default="work/peer", help="where the checkpoint and built models are kept")
    ap.add_argument("--against", metavar="EXPORT",
                    help="then alternate requests with this export on the ort backend in the same process")
    ap.add_argument("--rounds", type=int, default=8, help="with --against: rounds of one request each")
    ap.add_argument("--no-hugepages", dest="hugepages", action="store_false",
                    help="with --against: leave our loaded weights in 4 KB pages (runtime.hugepages)")
    ap.add_argument("--seconds", type=float, default=2.0, help="with --against: length of the benchmark clip")
    ap.add_argument("--ort-trunk", choices=("auto", "fused", "standard"), default="auto",
                    help="with --against: the ort backend's trunk form")
    ap.add_argument("--batch", type=int, default=1,
                    help="also time this many requests generated together (onnxruntime-genai's batching), "
                         "alternating with single ones: the aggregate rate in-flight batching is measured against")
    ap.add_argument("--json", action="store_true", help="print the measurement as JSON")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")

    def go(args) -> int:
        try:
            import onnxruntime_genai  # noqa: F401
        except ImportError:
            raise UserError("runtime.bench.peer needs onnxruntime-genai: pip install -e .[peer]") from None
        from export.manifest import read_manifest

        checks.check_number("--prompt-tokens", args.prompt_tokens, lo=1, integer=True)
        checks.check_number("--new-tokens", args.new_tokens, lo=2, integer=True)
        checks.check_number("--repeats", args.repeats, lo=1, integer=True)
        checks.check_number("--batch", args.batch, lo=1, hi=64, integer=True)
        text = read_manifest(checks.input_dir(args.engine, "--engine"))["config"]["text"]
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        against = checks.input_dir(args.against, "--against") if args.against else None
        checks.check_number("--rounds", args.rounds, lo=1, integer=True)
        engine = Path(args.engine)
        own = float_weights(engine)
        # int4: the format of the int4 export compared (--against, else --engine), where it is one
        options = weight_format(against or engine) if args.precision == "int4" else {}
        rep = measure(build(text, args.precision, work, engine if own else None, options), args.prompt_tokens,
                      args.new_tokens, args.repeats, text["vocab_size"], args.batch)
        once = rep.pop("once")
        rep.pop("greedy")
        rep["precision"] = args.precision
        rep["weights"] = "the export's" if own else "random"
        if against is not None:
            rep["side_by_side"] = side_by_side(once, against, args.new_tokens, args.rounds, args.seconds, work,
                                               args.ort_trunk, args.prompt_tokens, args.hugepages)
        blocks = f" (blocks of {rep['block_size']})" if rep["block_size"] else ""
        line = (f"onnxruntime-genai {args.precision}{blocks}: decode {1 / rep['decode_s_per_token']:.1f} tokens/s, "
                f"TTFT {rep['ttft_s']:.3f} s, peak memory {rep['peak_memory_bytes'] / 1e6:.0f} MB")
        if "batch" in rep:
            b = rep["batch"]
            line += (f"\n{b['size']} requests generated together: {b['aggregate_decode_tokens_per_s']:.1f} tokens/s "
                     f"in all, x{b['aggregate_over_one']:.2f} one request's {b['one_request_decode_tokens_per_s']:.1f}")
        if against is not None:
            sbs = rep["side_by_side"]
            line += (f"\nalternating with {against} (ort): {sbs['decode_tokens_per_s']:.1f} against "
                     f"{sbs['peer_decode_tokens_per_s']:.1f} tokens/s, x{sbs['ratio']:.2f} (rounds "
                     f"x{sbs['ratio_min']:.2f}-x{sbs['ratio_max']:.2f})")
        print(json.dumps(rep) if args.json else line)
        return 0

    return run_cli(go, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
