"""GPU figures of issue 12: each beside its reference and the limit measured in the same run, MET or MISSED.

    python benchmarks/gpu.py [--bench_dir ../shared/bench] [--only limits search embed fid_step eval]
    python benchmarks/gpu.py --cpu-smoke      # tiny sizes on CPU: checks that the script runs (not a measurement)

Needs nothing from a hub: random-init models of the released shapes built from configs (BERT-base for the retriever),
the bench tokenizer and corpus from ``--bench_dir`` (``tokenizers/bert-base-uncased/``, ``corpus.jsonl``; copy
them next to the checkout on a machine without ``../shared``). Sections, in order:

- ``limits``: HBM copy bandwidth (a device-to-device copy, read + write counted) and fp16/bf16 matmul peak (8192^3
  after warm-up); every roofline below uses them.
- ``search``: exact top-100 over 10M x 768 fp16 for B = 1, 64, 1024: ours (`src.index.flat.exact_topk`, the CUDA path)
  against naive ``torch.topk(q @ E.T)``; goal >= 70% of the HBM read roofline at B <= 64, >= 50% of the fp16 matmul
  peak at B = 1024. Also checks that the scan ran with no host synchronisation (``torch.cuda.set_sync_debug_mode``)
  and that its top-k scores equal naive's.
- ``embed``: index build (`src.index.embed_passages`, tokenising included) with BERT-base under bf16 autocast on the
  bench passages (replicated), then with its layers compiled (``--compile``), against the fp32 build (what
  ``--precision`` did not reach before) and tokenising alone; limit = bf16 peak / FLOPs per passage; goal >= 15,000
  passages/s.

- ``fid_step``: one training step (B = 1, K = 40, L = 512, 16 target tokens, bf16 autocast, AdamW) of Atlas at the
  released reader shapes (t5-base and t5-large lm-adapt, random init) with a BERT-base retriever: reader only, + query-
  side pdist retriever training, + reader gradient checkpointing; for t5-large also with ``--reader_attention eager``
  (transformers 5 defaults to sdpa, which folds T5's position bias into a per-layer fp32 mask) and with ``--compile``
  (encoder blocks and retriever layers compiled; the first step's compile time is shown). Query-side retriever
  training reads the passages' vectors from the index as train.py does (random vectors here); one variant re-embeds
  them as the original did. Each with its time, MFU
  (the reader's forward and backward plus the teacher's forward, counted by torch's FlopCounterMode without
  recomputation, over step time x the bf16 peak), peak memory and the parts (tokenising, query embedding, the teacher
  alone, forward, backward, optimizer, the device synchronised between them). Goal: >= 30% MFU for t5-large with
  retriever training, which adds <= 35% to the reader-only step with the same kernels.
- ``eval``: evaluation questions/s (eval loss + greedy generation of 16 tokens, K = 40, bf16; retrieval is the
  ``search`` section) and what one GPU holds: evaluation peak memory beside an index shard of wiki-dec2018 / 8.

A new section is ``def section_x(ctx: Context) -> list[Figure]`` (``ctx.limits`` holds the measured peaks,
``ctx.sizes`` the sizes of this mode) registered in SECTIONS.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from src.distributed import World  # noqa: E402
from src.index import DistributedIndex, embed_passages, flat  # noqa: E402
from src.index.embed import token_id_fn  # noqa: E402
from src.passages import PassageStore, format_passage  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
FORMAT = "{title} {text}"


@dataclass(frozen=True)
class Sizes:
    """The sizes one mode runs at (the GPU goals, or the CPU smoke run)."""

    search_rows: int = 10_000_000
    dim: int = 768
    k: int = 100
    batches: tuple[int, ...] = (1, 64, 1024)
    matmul_n: int = 8192
    copy_bytes: int = 4 * 1024**3
    repeats: int = 5
    embed_passages: int = 50_000
    embed_reference_passages: int = 4096
    embed_batch: int = 512
    embed_maxlength: int = 512
    bert: dict = field(default_factory=dict)  # BertConfig overrides; {} = BERT-base
    readers: tuple[str, ...] = ("t5-base", "t5-large")  # FiD step: released reader shapes (T5_SHAPES)
    t5: dict = field(default_factory=dict)  # T5Config overrides on top of a shape ({} = the released shape)
    fid_k: int = 40  # passages per question (n_context = retriever_n_context)
    fid_length: int = 512  # text_maxlength
    fid_target: int = 16  # target tokens (target_maxlength of the NQ scripts)
    fid_steps: int = 3  # timed steps per variant (after one warm-up step)
    eval_questions: int = 64  # evaluation throughput: questions generated (batch eval_batch)
    eval_batch: int = 4
    index_rows_per_gpu: int = 32_100_000 // 8  # wiki-dec2018 over 8 GPUs: the shard a GPU holds


GPU_SIZES = Sizes()
SMOKE_SIZES = Sizes(
    search_rows=20_000,
    dim=32,
    k=10,
    batches=(1, 4, 16),
    matmul_n=256,
    copy_bytes=16 * 1024**2,
    repeats=2,
    embed_passages=48,
    embed_reference_passages=16,
    embed_batch=16,
    embed_maxlength=64,
    bert={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    readers=("t5-base",),
    t5={"d_model": 32, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 2, "d_kv": 16},
    fid_k=4,
    fid_length=64,
    fid_target=8,
    fid_steps=1,
    eval_questions=4,
    eval_batch=2,
    index_rows_per_gpu=10_000,
)
# The released readers (google/t5-*-lm-adapt: T5 v1.1, gated GELU, untied lm_head), built from configs.
T5_SHAPES = {
    "t5-base": {"d_model": 768, "d_ff": 2048, "num_layers": 12, "num_decoder_layers": 12, "num_heads": 12},
    "t5-large": {"d_model": 1024, "d_ff": 2816, "num_layers": 24, "num_decoder_layers": 24, "num_heads": 16},
}


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    bench_dir: Path
    smoke: bool
    limits: dict[str, float] = field(default_factory=dict)  # "copy_bw" B/s, "fp16_peak"/"bf16_peak" FLOP/s


@dataclass
class Figure:
    """One printed line: a measured value beside its reference, its limit and the goal."""

    name: str
    value: str
    reference: str = "-"
    limit: str = "-"
    goal: str = "-"
    met: bool | None = None  # None: no goal


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Best wall time of ``repeats`` calls after ``warmup`` calls, the device synchronised around each."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def section_limits(ctx: Context) -> list[Figure]:
    """Copy bandwidth and matmul peaks of this device, measured now."""
    device, sizes = ctx.device, ctx.sizes
    source = torch.empty(sizes.copy_bytes // 2, dtype=torch.float16, device=device).fill_(1.0)
    target = torch.empty_like(source)
    seconds = best_seconds(lambda s=source, t=target: t.copy_(s), device, sizes.repeats)
    ctx.limits["copy_bw"] = 2 * sizes.copy_bytes / seconds  # read + write
    del source, target
    figures = [Figure("copy bandwidth (read + write)", f"{ctx.limits['copy_bw'] / 1e12:.2f} TB/s")]
    n = sizes.matmul_n
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        if device.type == "cpu" and dtype != torch.float32:
            dtype = torch.float32  # CPU smoke: reduced-precision matmul is emulated there
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        seconds = best_seconds(lambda a=a, b=b: a @ b, device, sizes.repeats, warmup=3)
        ctx.limits[f"{name}_peak"] = 2 * n**3 / seconds
        figures.append(Figure(f"{name} matmul peak ({n}^3)", f"{ctx.limits[f'{name}_peak'] / 1e12:.1f} TFLOP/s"))
    return figures


def _search_checks(ctx: Context, embeddings: torch.Tensor, queries: torch.Tensor) -> list[Figure]:
    """No host synchronisation inside the device scan, and its top-k scores equal naive torch's."""
    k = ctx.sizes.k
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            flat.exact_topk_device(embeddings, queries, k, 0)
            no_sync, detail = True, "ran under set_sync_debug_mode('error')"
        except RuntimeError as error:
            no_sync, detail = False, str(error).splitlines()[0][:80]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        checks = [Figure("search: no host sync in the scan", str(no_sync), detail, goal="no sync", met=no_sync)]
    else:
        checks = []
    ours = flat.exact_topk_device(embeddings, queries, k, 0)[0]  # (B, k) float32
    naive = torch.topk(queries.to(embeddings.dtype) @ embeddings.T, k, dim=1).values.float()  # (B, k)
    same = bool(torch.equal(ours, naive))  # the top-k values are unique whatever the tie order
    checks.append(Figure("search: top-k scores equal naive's", str(same), goal="equal", met=same))
    return checks


def section_search(ctx: Context) -> list[Figure]:
    """Exact search over search_rows x dim at each batch size, ours vs naive, against the roofline."""
    device, sizes = ctx.device, ctx.sizes
    dtype = torch.float16 if device.type == "cuda" else torch.float32  # as DistributedIndex stores it
    generator = torch.Generator(device=device).manual_seed(0)
    embeddings = torch.randn(sizes.search_rows, sizes.dim, device=device, dtype=dtype, generator=generator)
    # The CPU smoke run exercises the device scan itself; on CUDA exact_topk takes it (plus its NaN check).
    ours_fn = flat.exact_topk if device.type == "cuda" else flat.exact_topk_device
    figures = _search_checks(ctx, embeddings, torch.randn(8, sizes.dim, device=device, generator=generator))
    bytes_read = embeddings.numel() * embeddings.element_size()
    peak = ctx.limits["fp16_peak"]
    for batch in sizes.batches:
        queries = torch.randn(batch, sizes.dim, device=device, dtype=dtype, generator=generator)
        t_ours = best_seconds(lambda q=queries: ours_fn(embeddings, q, sizes.k, 0), device, sizes.repeats)
        t_naive = best_seconds(lambda q=queries: torch.topk(q @ embeddings.T, sizes.k, dim=1), device, sizes.repeats)
        flops = 2 * sizes.search_rows * sizes.dim * batch
        t_read, t_math = bytes_read / ctx.limits["copy_bw"], flops / peak
        if batch <= 64:
            share, goal, target = t_read / t_ours, ">= 70% of HBM read roofline", 0.7
        else:
            share, goal, target = flops / t_ours / peak, ">= 50% of fp16 matmul peak", 0.5
        figures.append(
            Figure(
                f"search {sizes.search_rows:,} x {sizes.dim} k={sizes.k}, B={batch}",
                f"{t_ours * 1e3:.2f} ms ({100 * share:.0f}%)",
                f"naive topk(q @ E.T) {t_naive * 1e3:.2f} ms",
                f"{max(t_read, t_math) * 1e3:.2f} ms (read {bytes_read / 1e9:.1f} GB; {flops / 1e12:.2f} TFLOP)",
                goal,
                share >= target,
            )
        )
    return figures


def _replicated_store(ctx: Context, directory: str, n: int) -> PassageStore:
    """A store of the first ``n`` bench passages, the corpus repeated (ids made unique) when n exceeds it."""
    passages = [json.loads(line) for line in open(ctx.bench_dir / "corpus.jsonl")]
    path = Path(directory) / "corpus.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for i in range(n):
            passage = dict(passages[i % len(passages)], id=f"{i}")
            handle.write(json.dumps(passage) + "\n")
    return PassageStore.build([str(path)], f"{directory}/store", max_passages=n)


def _passage_flops(config, tokens: float) -> float:
    """Forward FLOPs of a BERT encoder over one passage of ``tokens`` tokens (matmuls only; pooling ignored)."""
    d, layers, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    return layers * (2 * tokens * (4 * d * d + 2 * d * ff) + 4 * tokens * tokens * d)


def section_embed(ctx: Context) -> list[Figure]:
    """Index build passages/s with BERT-base under bf16 autocast, tokenising included; references fp32 and the
    tokenizer alone."""
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from src.retriever import PassageEmbedder, Retriever, compile_layers

    device, sizes = ctx.device, ctx.sizes
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(ctx.bench_dir / "tokenizers" / "bert-base-uncased"))
    config = BertConfig(**sizes.bert)
    torch.manual_seed(0)
    embedder = PassageEmbedder(Retriever(BertModel(config, add_pooling_layer=False).to(device)))
    world = World(0, 0, 1, device)

    def build(store: PassageStore, precision: str) -> float:
        index = DistributedIndex(store, config.hidden_size, world)
        fmt = lambda p: format_passage(FORMAT, p)  # noqa: E731
        embed_passages(index, embedder, tokenizer, fmt, sizes.embed_batch, sizes.embed_maxlength, precision)
        synchronize(device)
        return len(store) / best_seconds(
            lambda: embed_passages(
                index, embedder, tokenizer, fmt, sizes.embed_batch, sizes.embed_maxlength, precision
            ),
            device,
            1,
            warmup=0,
        )

    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        store = _replicated_store(ctx, tmp, sizes.embed_passages)
        small = _replicated_store(ctx, f"{tmp}/small", sizes.embed_reference_passages)
        texts = [format_passage(FORMAT, p) for p in store.get_many(range(len(store)))]
        started = time.perf_counter()
        ids = token_id_fn(tokenizer, sizes.embed_maxlength)(texts)  # what the build's tokenising thread runs
        tokenise_rate = len(texts) / (time.perf_counter() - started)
        mean_tokens = sum(len(x) for x in ids) / len(ids)
        precision = "bf16" if device.type == "cuda" else "fp32"
        ours = build(store, precision)
        fp32 = build(small, "fp32")
        compile_layers(embedder.retriever.passage_encoder)  # --compile; the warm-up build compiles every length
        compiled = build(store, precision)
    limit = ctx.limits["bf16_peak"] / _passage_flops(config, mean_tokens)
    return [
        Figure(
            f"index build, BERT {config.hidden_size}x{config.num_hidden_layers}, {len(texts):,} passages "
            f"(mean {mean_tokens:.0f} tokens, max {sizes.embed_maxlength}), batch {sizes.embed_batch}, bf16",
            f"{ours:,.0f} passages/s; with --compile {compiled:,.0f} p/s",
            f"fp32 build {fp32:,.0f} p/s; tokenising alone (1 thread) {tokenise_rate:,.0f} p/s",
            f"{limit:,.0f} p/s ({_passage_flops(config, mean_tokens) / 1e9:.1f} GFLOP/passage at bf16 peak)",
            ">= 15,000 passages/s",
            max(ours, compiled) >= 15_000,
        )
    ]


def _fid_parts(ctx: Context, shape: str, train_retriever: bool, checkpointing: bool = False):
    """A random-init Atlas at a released reader shape (BERT-base retriever), its tokenizers and a question list whose
    every question comes with fid_k bench passages."""
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast, T5Config

    from src.atlas import Atlas
    from src.batching import Tokenizers
    from src.config import AtlasConfig
    from src.reader import reader_from_config
    from src.retriever import Retriever
    from src.tasks import Example

    sizes, device = ctx.sizes, ctx.device
    tokenizers = Tokenizers(
        PreTrainedTokenizerFast.from_pretrained(str(ctx.bench_dir / "tokenizers" / "t5-32k-bench")),
        PreTrainedTokenizerFast.from_pretrained(str(ctx.bench_dir / "tokenizers" / "bert-base-uncased")),
    )
    vocab = max(32128, len(tokenizers.reader))
    shape_args = {"d_kv": 64, **T5_SHAPES[shape], **sizes.t5}
    config = T5Config(vocab_size=vocab, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.1,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **shape_args)  # fmt: skip
    torch.manual_seed(0)
    with device:  # built (and randomly initialised) on the device: seconds instead of a minute for t5-large on CPU
        reader = reader_from_config(config)
        retriever = Retriever(BertModel(BertConfig(**sizes.bert), add_pooling_layer=False), query_side=True)
    if checkpointing:
        reader.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = AtlasConfig(n_context=sizes.fid_k, retriever_n_context=sizes.fid_k, text_maxlength=sizes.fid_length,
                      target_maxlength=sizes.fid_target, train_retriever=train_retriever, gold_score_mode="ppmean",
                      generation_max_length=sizes.fid_target, generation_min_length=sizes.fid_target)  # fmt: skip
    model = Atlas(reader, retriever, cfg).to(device)
    corpus = [json.loads(line) for _, line in zip(range(4096), open(ctx.bench_dir / "corpus.jsonl"))]
    examples, passages = [], []
    for i in range(max(sizes.eval_questions, 8)):
        title = corpus[i % len(corpus)]["title"]
        examples.append(Example(f"question: what is {title}? answer: <extra_id_0>", f"<extra_id_0> {title}", [title]))
        passages.append([corpus[(i * sizes.fid_k + j) % len(corpus)] for j in range(sizes.fid_k)])
    return model, tokenizers, examples, passages


def _fid_flops(model, batch) -> float:
    """The issue's model FLOPs of one step: reader forward + backward over the batch, plus the teacher's forward
    (ppmean: the reader over each passage alone) when the retriever trains; counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    from src import reader as fid
    from src.gold_scores import ppmean_scores

    with FlopCounterMode(display=False) as counter:
        fid.forward(model.reader, batch.reader_ids, batch.reader_mask, batch.labels).loss.backward()
        if model.config.train_retriever:
            with torch.no_grad():
                ppmean_scores(model.reader, batch.teacher_ids, batch.teacher_mask, batch.labels)
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _timed_step(model, optimizer, tokenizers, examples, passages, device, reembed=False) -> dict[str, float]:
    """One training step (B = 1) split into its parts, the device synchronised between them: seconds per part. With
    retriever training the passages' vectors come as train.py's query-side step reads them from the index (random
    here), unless ``reembed`` (the original's way: the frozen passage encoder embeds them again)."""
    from src.batching import collate
    from src.gold_scores import ppmean_scores
    from src.precision import autocast, inference_autocast

    times, train_retriever = {}, model.config.train_retriever
    precision = "bf16" if device.type == "cuda" else "fp32"

    def mark(name: str, started: float) -> float:
        synchronize(device)
        now = time.perf_counter()
        times[name] = times.get(name, 0.0) + now - started
        return now

    synchronize(device)
    t = time.perf_counter()
    vectors = None
    if train_retriever and not reembed:
        vectors = torch.randn(len(examples), len(passages[0]), model.retriever.dim, device=device)  # (B, K, D)
    batch = collate(examples, passages, tokenizers, model.config, retriever=train_retriever, passage_vectors=vectors)
    batch = batch.to(device)
    t = mark("tokenising (collate)", t)
    query = tokenizers.retriever([e.query for e in examples], return_tensors="pt", padding=True)
    with inference_autocast(precision, device):
        model.embed_queries(query["input_ids"], query["attention_mask"])
    t = mark("query embedding", t)
    if train_retriever:  # the teacher alone (the training forward below runs it again, inside the retriever loss)
        with torch.no_grad(), autocast(precision, device):
            ppmean_scores(model.reader, batch.teacher_ids, batch.teacher_mask, batch.labels)
        t = mark("(teacher pass alone)", t)
    model.train()
    with autocast(precision, device):
        losses = model(batch, train_retriever=train_retriever)
    t = mark("forward (reader + teacher + retriever)", t)
    losses["loss"].backward()
    t = mark("backward", t)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mark("optimizer", t)
    times["step"] = sum(v for k, v in times.items() if not k.startswith("("))
    return times


# FiD step variants: (name, retriever training, reader checkpointing, --reader_attention, --compile). The kernel
# variants (attention, compile) run at the last reader shape only (t5-large on a GPU); each retriever variant's
# overhead is against the reader-only variant with the same kernels.
FID_VARIANTS = (
    ("reader only", False, False, "auto", False),
    ("+ retriever (query-side pdist)", True, False, "auto", False),
    ("+ retriever, reader checkpointing", True, True, "auto", False),
)
FID_KERNEL_VARIANTS = (
    ("reader only, eager attention", False, False, "eager", False),
    ("+ retriever, eager attention", True, False, "eager", False),
    ("reader only, --compile, eager attention", False, False, "eager", True),
    ("+ retriever, --compile, eager attention", True, False, "eager", True),
    ("+ retriever, --compile, sdpa", True, False, "sdpa", True),
    ("+ retriever, passages re-embedded (the original)", True, False, "auto", False),
)


def section_fid_step(ctx: Context) -> list[Figure]:
    """FiD training step at the released shapes (B = 1, K = fid_k, L = fid_length, bf16): seconds, MFU against the
    bf16 matmul peak, and the parts; reader only, + query-side pdist retriever training, + reader checkpointing; at
    the last shape also eager attention and --compile (the model factory's own calls)."""
    from src.batching import collate
    from src.model_factory import compile_model
    from src.reader import set_attention

    device, sizes, figures = ctx.device, ctx.sizes, []
    peak = ctx.limits["bf16_peak"]
    counted: dict[tuple[str, bool], float] = {}  # (shape, retriever training) -> FLOPs: the kernels do not change them
    for shape in sizes.readers:
        reader_only: dict[tuple[str, bool], float] = {}  # (attention, compile) -> reader-only step seconds
        variants = FID_VARIANTS + (FID_KERNEL_VARIANTS if shape == sizes.readers[-1] else ())
        for name, train_retriever, checkpointing, attention, compiled in variants:
            model, tokenizers, examples, passages = _fid_parts(ctx, shape, train_retriever, checkpointing)
            set_attention(model.reader, attention)
            if (shape, train_retriever) not in counted:
                batch = collate(examples[:1], passages[:1], tokenizers, model.config, retriever=train_retriever)
                counted[(shape, train_retriever)] = _fid_flops(model, batch.to(device))
            flops = counted[(shape, train_retriever)]
            if compiled:  # after the FLOP count: the counter is a dispatch mode, not for compiled code
                compile_model(model.reader, model.retriever)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            reembed = "re-embedded" in name
            _timed_step(model, optimizer, tokenizers, examples[:1], passages[:1], device, reembed)  # warm-up, compiles
            warm_up = time.perf_counter() - started
            runs = [_timed_step(model, optimizer, tokenizers, examples[i : i + 1], passages[i : i + 1], device, reembed)
                    for i in range(1, 1 + sizes.fid_steps)]  # fmt: skip
            parts = {k: min(r[k] for r in runs) for k in runs[0]}
            step = parts.pop("step")
            memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            mfu = flops / step / peak
            if not train_retriever:
                reader_only[(attention, compiled)] = step
            base = reader_only.get((attention, compiled))
            overhead = "" if base is None else f" (+{100 * (step / base - 1):.0f}% vs reader only)"
            goal, met = "-", None
            if train_retriever and not checkpointing and shape == "t5-large" and base is not None:
                goal, met = ">= 30% MFU; retriever training <= +35%", mfu >= 0.30 and step / base - 1 <= 0.35
            if compiled:
                parts["(first step, compiling)"] = warm_up
            figures.append(
                Figure(
                    f"FiD step {shape}, B=1 K={sizes.fid_k} L={sizes.fid_length} bf16, {name}",
                    f"{step:.3f} s, MFU {100 * mfu:.1f}%{overhead}, peak {memory:.1f} GiB",
                    "; ".join(f"{k} {v * 1e3:.0f} ms" for k, v in parts.items()),
                    f"{flops / peak:.3f} s ({flops / 1e12:.1f} TFLOP at bf16 peak)",
                    goal,
                    met,
                )
            )
            del model, optimizer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return figures


def section_eval(ctx: Context) -> list[Figure]:
    """Evaluation throughput (retrieval excluded: see `search`) at the first reader shape, K = fid_k, generating
    fid_target tokens under bf16, and what one GPU holds: the model and an index shard of index_rows_per_gpu rows."""
    from src.batching import collate
    from src.precision import inference_autocast

    device, sizes = ctx.device, ctx.sizes
    model, tokenizers, examples, passages = _fid_parts(ctx, sizes.readers[0], train_retriever=False)
    model.eval()
    precision = "bf16" if device.type == "cuda" else "fp32"
    examples, passages = examples[: sizes.eval_questions], passages[: sizes.eval_questions]

    def run() -> None:
        for i in range(0, len(examples), sizes.eval_batch):
            batch = collate(examples[i : i + sizes.eval_batch], passages[i : i + sizes.eval_batch], tokenizers,
                            model.config).to(device)  # fmt: skip
            with inference_autocast(precision, device):
                model.eval_outputs(batch)
                model.generate(batch)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = best_seconds(run, device, 1)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    shard = sizes.index_rows_per_gpu * sizes.dim * 2 / 2**30  # fp16 on CUDA
    return [
        Figure(
            f"evaluation {sizes.readers[0]}, K={sizes.fid_k} L={sizes.fid_length}, {sizes.fid_target} tokens "
            f"generated, batch {sizes.eval_batch}, bf16",
            f"{len(examples) / seconds:.1f} questions/s",
            "eval loss + greedy generation, retrieval excluded",
        ),
        Figure(
            "per-GPU memory: model + index shard",
            f"evaluation peak {peak:.1f} GiB (fp32 weights {weights:.2f} GiB)",
            f"index shard {sizes.index_rows_per_gpu:,} x {sizes.dim} fp16 = {shard:.1f} GiB",
            "add the two; training: see the FiD step peaks",
        ),
    ]


SECTIONS: dict[str, Callable[[Context], list[Figure]]] = {
    "limits": section_limits,
    "search": section_search,
    "embed": section_embed,
    "fid_step": section_fid_step,
    "eval": section_eval,
}


def print_figures(figures: list[Figure], smoke: bool) -> None:
    headers = ["figure", "value", "reference (same run)", "limit (same run)", "goal", "result"]
    rows = [headers]
    for f in figures:
        result = "-" if f.met is None else ("MET" if f.met else "MISSED")
        rows.append(
            [
                f.name,
                f.value,
                f.reference,
                f.limit,
                f.goal,
                result + (" (smoke)" if smoke and f.met is not None else ""),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(headers))]
    for i, row in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def main(argv: list[str] | None = None) -> list[Figure]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench_dir", default=str(REPO_ROOT.parent / "shared" / "bench"))
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--cpu-smoke", dest="cpu_smoke", action="store_true", help="tiny sizes on CPU")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        device, sizes = torch.device("cpu"), SMOKE_SIZES
    elif torch.cuda.is_available():
        device, sizes = torch.device("cuda", torch.cuda.current_device()), GPU_SIZES
    else:
        raise SystemExit("no CUDA device: run on a GPU, or pass --cpu-smoke")
    ctx = Context(device, sizes, Path(args.bench_dir), args.cpu_smoke)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run: not a measurement)"
    print(f"{name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", flush=True)
    started = time.perf_counter()
    figures: list[Figure] = []
    sections = ["limits"] + [s for s in args.only if s != "limits"]  # every roofline needs the limits
    for section in sections:
        section_started = time.perf_counter()
        figures += SECTIONS[section](ctx)
        print(f"{section}: {time.perf_counter() - section_started:.1f} s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_figures(figures, args.cpu_smoke)
    print(f"total {time.perf_counter() - started:.0f} s")
    return figures


if __name__ == "__main__":
    main()
