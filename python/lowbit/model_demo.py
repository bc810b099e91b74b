"""The main job of ``lowbit demo``: SmolLM2-135M-Instruct, dense and compressed by every registered
family, each saved with ``lowbit.save`` and read back with ``lowbit.load``, measured side by side
(``lowbit.evaluation``), then a plot of perplexity against size."""

from __future__ import annotations

import tempfile

import lowbit
from lowbit import evaluation

# A lossy family passes when its perplexity is within this much of the dense model's (int8 on
# SmolLM2 measured +2.1% at 4096 tokens); a lossless one must give the dense perplexity exactly.
MAX_PERPLEXITY_CHANGE = 0.05


def model_available() -> str | None:
    """None when SmolLM2 can be loaded here, else why not."""
    try:
        evaluation.smollm2_folder()
        import gguf  # noqa: F401  (transformers needs it to read the GGUF)
        import transformers  # noqa: F401
    except (lowbit.LowbitError, ModuleNotFoundError) as exc:
        return str(exc)
    return None


def run(*, quick: bool = False, plot_path: str = "lowbit-demo.png", progress: bool = True) -> bool:
    """Run and print the table; returns whether every family kept what it promises."""
    why = model_available()
    if why is not None:
        print(f"\nmodel: skipped, SmolLM2 cannot be loaded here ({why}); bash scripts/setup.sh installs it")
        return True
    tokens, new_tokens = (1024, 8) if quick else (evaluation.DEFAULT_TOKENS, 32)
    facts = evaluation.cpu_facts()
    print(f"\nmodel: SmolLM2-135M-Instruct (fp32; its weights were 4-bit Q4_1 before dequantization, so lossless "
          f"ratios and int8 error on it are not those of a bf16 checkpoint), perplexity over {tokens} tokens of "
          f"pydoc_data.topics; {facts['name']}, {facts['threads']} threads, ISA {' '.join(facts['isa']) or '?'}")
    methods = ["none"] + [f.name for f in lowbit.registry.families()]
    results, broken = [], []
    with tempfile.TemporaryDirectory(prefix="lowbit-demo-") as folder:
        for method in methods:
            doing = "loading, saving" if method == "none" else "quantizing, saving"
            print(f"  {method}: {doing}, reloading, measuring...", flush=True)
            save_to = f"{folder}/{method}"
            try:
                options = {} if method == "none" else lowbit.registry.get(method).model_demo
                results.append(evaluation.run_method(evaluation.MODEL, method, tokens=tokens,
                                                     new_tokens=new_tokens, save_to=save_to, progress=progress,
                                                     **options))
            except Exception as exc:  # one family's failure is reported; the others still run
                if method == "none":
                    raise
                print(f"  {method}: FAILED: {type(exc).__name__}: {exc}", flush=True)
                broken.append(method)
    print(evaluation.table(results))
    ok = not broken
    dense = results[0].perplexity
    baselines = {}
    for r in results[1:]:
        lossless = r.method == "dfloat"
        baseline = lowbit.registry.get(r.method).demo_baseline
        if lossless:
            kept, promise = r.perplexity == dense, "the dense perplexity exactly"
        elif baseline is not None:
            if baseline not in baselines:
                baselines[baseline] = evaluation.rtn_perplexity(evaluation.MODEL, *baseline, tokens=tokens,
                                                                progress=progress)
            kept = r.perplexity <= baselines[baseline]
            promise = (f"at most the perplexity of round-to-nearest {baseline[0]}-bit, group {baseline[1]}: "
                       f"{baselines[baseline]:.2f}")
        else:
            kept = abs(r.perplexity / dense - 1) <= MAX_PERPLEXITY_CHANGE
            promise = f"within {MAX_PERPLEXITY_CHANGE:.0%} of dense"
        ok &= kept
        print(f"  {r.method}: {'kept' if kept else 'BROKE'} its promise ({promise}); read back by lowbit.load in "
              f"{r.load_s:.1f} s (+{r.load_peak_mb:.0f} MB), by from_pretrained in {r.hf_load_s:.1f} s "
              f"(+{r.hf_load_peak_mb:.0f} MB); the dense model's from_pretrained: {results[0].hf_load_s:.1f} s "
              f"(+{results[0].hf_load_peak_mb:.0f} MB)")
    written = evaluation.plot(results, plot_path, f"SmolLM2-135M-Instruct: perplexity vs size ({tokens} tokens)")
    print(f"  plot: {written}")
    return ok
