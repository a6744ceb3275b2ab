"""The device (CUDA) code paths of the index, tested on CPU: the no-sync exact top-k, GPU faiss through a stand-in
module, and embedding (tokenised once, batches independent of the world size, --precision)."""

import contextlib
import sys
import types

import numpy as np
import pytest
import torch

from src.config import IndexConfig
from src.distributed import World
from src.index import DistributedIndex, embed, embed_passages, faiss_index, flat
from src.options import build_settings, options_from_dict
from src.passages import passage_title
from tests.test_index import MeanPooled, assert_search_equals, brute_force, make_store, tiny_tokenizer

WORLD = World(0, 0, 1, torch.device("cpu"))


def device_topk(embeddings, queries, k, chunk_rows, row_offset=0):
    return flat.exact_topk_device(torch.as_tensor(embeddings), torch.as_tensor(queries), k, row_offset, chunk_rows)


@pytest.mark.parametrize("group", [1, 4, 64])
def test_device_topk_equals_brute_force_with_ties(monkeypatch, group):
    monkeypatch.setattr(flat, "GROUP_ROWS", group)  # group maxima path (few rows per group) and the direct path
    rng = np.random.default_rng(0)
    ties = rng.integers(-1, 2, size=(1000, 4)).astype(np.float32)  # exact, many equal scores across chunk edges
    tie_queries = rng.integers(-1, 2, size=(7, 4)).astype(np.float32)
    floats = rng.standard_normal((700, 16)).astype(np.float32)
    float_queries = rng.standard_normal((5, 16)).astype(np.float32)
    for embeddings, queries in ((ties, tie_queries), (floats, float_queries)):
        for k in (1, 3, 37, 100):
            for chunk_rows in (97, 256, 5000):  # chunk edges inside runs of tied rows; one chunk
                scores, rows = device_topk(embeddings, queries, k, chunk_rows, row_offset=10)
                ref_scores, ref_rows = brute_force(embeddings, queries, k)
                np.testing.assert_array_equal(rows.numpy(), ref_rows + 10, err_msg=f"k={k} chunk={chunk_rows}")
                np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-5, atol=1e-5)
                cpu = flat.exact_topk(torch.as_tensor(embeddings), torch.as_tensor(queries), k, 10, chunk_rows)
                assert torch.equal(cpu[1], rows)  # scores may differ in the last bit: q @ E.T vs (E @ q.T).T


def test_device_topk_pads_small_shards():
    embeddings = np.arange(6, dtype=np.float32).reshape(3, 2)
    scores, rows = device_topk(embeddings, np.ones((2, 2), np.float32), 5, None)
    assert rows[0].tolist() == [2, 1, 0, flat.PAD_ROW, flat.PAD_ROW] and scores[0, 3:].isinf().all()
    scores, rows = device_topk(np.zeros((0, 2), np.float32), np.ones((2, 2), np.float32), 2, None)
    assert rows.tolist() == [[flat.PAD_ROW] * 2] * 2


def test_order_key_orders_floats_then_smaller_column():
    values = torch.tensor([[-0.0, 0.0, float("-inf"), 1.5, -2.0, float("inf"), 1.5, -2.0]])
    columns = torch.arange(8).unsqueeze(0)
    order = flat.order_key(values, columns).argsort(dim=1, descending=True)[0].tolist()
    assert order == [5, 3, 6, 0, 1, 4, 7, 2]  # -0.0 ties with 0.0 and goes by column


class NoHostRead(Exception):
    pass


@contextlib.contextmanager
def forbid_host_reads(monkeypatch):
    """Every way a tensor value reaches Python raises (what would be a device synchronisation on CUDA)."""
    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "nonzero", "numpy", "__bool__", "__int__", "__float__", "__index__"):

            def refuse(*args, _name=name, **kwargs):
                raise NoHostRead(_name)

            patch.setattr(torch.Tensor, name, refuse)
        patch.setattr(torch, "nonzero", lambda *a, **k: (_ for _ in ()).throw(NoHostRead("torch.nonzero")))
        yield


def test_device_topk_reads_nothing_on_the_host(monkeypatch):
    monkeypatch.setattr(flat, "GROUP_ROWS", 4)
    rng = np.random.default_rng(1)
    embeddings = torch.as_tensor(rng.integers(-1, 2, size=(600, 4)).astype(np.float32))
    queries = torch.as_tensor(rng.integers(-1, 2, size=(3, 4)).astype(np.float32))
    with forbid_host_reads(monkeypatch):
        with pytest.raises(NoHostRead):  # the guard works: the CPU scan checks ties on the host
            flat._exact_topk_cpu(embeddings, queries, 10, 0, 128)
        flat.exact_topk_device(embeddings, queries, 10, 0, 128)  # several chunks and the merge
        flat.exact_topk_device(embeddings, queries, 10, 0, None)  # one chunk
    # On the meta device every value is unknown: any data-dependent host read would fail.
    scores, rows = flat.exact_topk_device(embeddings.to("meta"), queries.to("meta"), 10, 0, 128)
    assert scores.shape == rows.shape == (3, 10) and rows.dtype == torch.int64


@pytest.mark.cuda
def test_cuda_search_matches_cpu_without_sync():
    rng = np.random.default_rng(2)
    embeddings = torch.as_tensor(rng.integers(-2, 3, size=(200_000, 8)).astype(np.float16))
    queries = torch.as_tensor(rng.integers(-2, 3, size=(33, 8)).astype(np.float32))
    want = flat._exact_topk_cpu(embeddings.float(), queries, 100, 5)
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = flat.exact_topk_device(embeddings.cuda(), queries.cuda(), 100, 5)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[0].cpu(), want[0])


# --- faiss on the GPU, through a stand-in module that records the calls -------------------------------------------


class FakeIndex:
    """Exact inner-product search standing in for every faiss type; records the type of what it is given."""

    def __init__(self, kind, dim, calls, nlist=None):
        self.kind, self.d, self.calls, self.ntotal = kind, dim, calls, 0
        self.is_trained = nlist is None
        if nlist is not None:
            self.nlist, self.nprobe = nlist, 1
        self.data = torch.zeros((0, dim))

    def train(self, x):
        self.calls.append(("train", self.kind, type(x).__name__))
        self.is_trained = True

    def add(self, x):
        self.calls.append(("add", self.kind, type(x).__name__))
        self.data = torch.cat([self.data, torch.as_tensor(x)])
        self.ntotal = len(self.data)

    def search(self, x, k):
        self.calls.append(("search", self.kind, type(x).__name__))
        scores = torch.as_tensor(x).double() @ self.data.double().T  # (B, N)
        columns = torch.arange(self.ntotal).expand_as(scores)
        values, ids = flat.sort_topk(scores, columns, k)
        values = values.float()
        return (values, ids) if isinstance(x, torch.Tensor) else (values.numpy(), ids.numpy())


class FakeGpuIndex(FakeIndex):
    def getDevice(self):  # noqa: N802  (faiss's name)
        return 0


def fake_faiss(calls):
    faiss = types.ModuleType("faiss")
    faiss.METRIC_INNER_PRODUCT = 0
    faiss.ScalarQuantizer = types.SimpleNamespace(QT_4bit=0, QT_6bit=1, QT_8bit=2, QT_fp16=3)
    faiss.IndexFlatIP = lambda d: FakeIndex("flat", d, calls)
    faiss.IndexScalarQuantizer = lambda d, qt, m: FakeIndex("sq", d, calls)
    faiss.IndexPQ = lambda d, m, bits, metric: FakeIndex("pq", d, calls)
    faiss.IndexIVFFlat = lambda q, d, nlist, m: FakeIndex("ivfflat", d, calls, nlist)
    faiss.IndexIVFScalarQuantizer = lambda q, d, nlist, qt, m: FakeIndex("ivfsq", d, calls, nlist)
    faiss.IndexIVFPQ = lambda q, d, nlist, m, bits, metric: FakeIndex("ivfpq", d, calls, nlist)
    faiss.StandardGpuResources = lambda: calls.append(("StandardGpuResources",)) or "resources"
    faiss.get_num_gpus = lambda: 1

    def index_cpu_to_gpu(resources, device, index):
        calls.append(("index_cpu_to_gpu", device, index.kind))
        if index.kind in ("sq", "pq"):
            raise RuntimeError(f"no GPU version of {index.kind}")
        gpu = FakeGpuIndex(index.kind, index.d, calls, getattr(index, "nlist", None))
        gpu.is_trained, gpu.data, gpu.ntotal = index.is_trained, index.data, index.ntotal
        if hasattr(index, "nprobe"):
            gpu.nprobe = index.nprobe
        return gpu

    def index_gpu_to_cpu(index):
        calls.append(("index_gpu_to_cpu", index.kind))
        cpu = FakeIndex(index.kind, index.d, calls, getattr(index, "nlist", None))
        cpu.is_trained, cpu.data, cpu.ntotal = True, index.data, index.ntotal
        return cpu

    faiss.index_cpu_to_gpu, faiss.index_gpu_to_cpu = index_cpu_to_gpu, index_gpu_to_cpu
    faiss.contrib = types.ModuleType("faiss.contrib")
    faiss.contrib.torch_utils = types.ModuleType("faiss.contrib.torch_utils")
    return faiss


def test_faiss_builds_and_searches_on_the_gpu_with_torch_tensors(tmp_path, monkeypatch):
    calls = []
    faiss = fake_faiss(calls)
    for name, module in (("faiss", faiss), ("faiss.contrib", faiss.contrib), ("faiss.contrib.torch_utils", None)):
        monkeypatch.setitem(sys.modules, name, module or faiss.contrib.torch_utils)
    monkeypatch.setattr(faiss_index, "_GPU_RESOURCES", {})
    monkeypatch.setattr(faiss_index, "gpu_device_index", lambda device: 0)  # as for a CUDA shard
    rng = np.random.default_rng(3)
    embeddings = rng.standard_normal((300, 16)).astype(np.float32)
    queries = rng.standard_normal((4, 16)).astype(np.float32)
    store = make_store(tmp_path, 300)
    for index_type, code_size in (("flat", None), ("ivfflat", None), ("ivfsq", 8), ("ivfpq", 4)):
        calls.clear()
        index = DistributedIndex(store, 16, WORLD, IndexConfig("faiss", index_type, code_size))
        index.set_embeddings(torch.as_tensor(embeddings))
        assert_search_equals(index, embeddings, queries, 7)
        kind = index_type
        assert ("index_cpu_to_gpu", 0, kind) in calls
        assert {c for c in calls if c[0] in ("train", "add", "search")} <= {
            ("train", kind, "Tensor"),
            ("add", kind, "Tensor"),
            ("search", kind, "Tensor"),
        }  # torch tensors all the way: nothing went through numpy
        saved = index.local_faiss  # what a save serialises: a CPU copy
        assert not faiss_index.is_gpu_index(saved) and ("index_gpu_to_cpu", kind) in calls
        loaded = DistributedIndex(store, 16, WORLD, IndexConfig("faiss", index_type, code_size))
        loaded.set_faiss(saved)  # a loaded index goes to the GPU too
        assert faiss_index.is_gpu_index(loaded._faiss)
        assert_search_equals(loaded, embeddings, queries, 7)
    assert list(faiss_index._GPU_RESOURCES) == [0]  # one StandardGpuResources per device, made once
    for index_type, code_size in (("sq", 8), ("pq", 4)):  # no GPU version: stays on the CPU, searched with numpy
        calls.clear()
        index = DistributedIndex(store, 16, WORLD, IndexConfig("faiss", index_type, code_size))
        index.set_embeddings(torch.as_tensor(embeddings))
        assert_search_equals(index, embeddings, queries, 7)
        assert ("search", index_type, "ndarray") in calls and not faiss_index.is_gpu_index(index._faiss)


# --- embedding -------------------------------------------------------------------------------------------------


class CountingTokenizer:
    """Delegates to a tokenizer and counts the texts it tokenises."""

    def __init__(self, inner):
        self.inner, self.texts = inner, 0

    def __call__(self, texts, **kwargs):
        self.texts += len(texts)
        return self.inner(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def fmt(passage):
    return f"{passage_title(passage)} {passage['text']}"


def embedding_setup(tmp_path, n):
    torch.manual_seed(0)
    store = make_store(tmp_path, n)
    tokenizer = tiny_tokenizer([fmt(p) for p in store.get_many(range(n))])
    return store, tokenizer, MeanPooled(len(tokenizer))


def previous_embedding(store, encoder, tokenizer, batch_size, max_length):
    """The index build before this change: sort the whole shard by token count, tokenise again per batch."""
    texts = [fmt(p) for p in store.get_many(range(len(store)))]
    lengths = np.array([len(x) for x in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]])
    order = np.argsort(-lengths, kind="stable")
    out = torch.empty((len(texts), 32))
    encoder.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            tokens = tokenizer(
                [texts[i] for i in rows], padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
            )
            output = encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])  # (b, d)
            out[torch.from_numpy(rows)] = output
    return out


def test_embedding_is_bit_identical_to_the_previous_build_and_tokenises_once(tmp_path):
    store, tokenizer, encoder = embedding_setup(tmp_path, 45)
    counting = CountingTokenizer(tokenizer)
    index = DistributedIndex(store, 32, WORLD)
    embed_passages(index, encoder, counting, fmt, 4, max_length=64)
    assert counting.texts == 0  # the fast path encodes with a copy of the backend: each passage once (below)
    calls = []
    real = embed.token_id_fn
    counting_fn = lambda tok, n: lambda texts: calls.append(len(texts)) or real(tok, n)(texts)  # noqa: E731
    index = DistributedIndex(store, 32, WORLD)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(embed, "token_id_fn", counting_fn)
        embed_passages(index, encoder, tokenizer, fmt, 4, max_length=64)
    assert sum(calls) == 45  # each passage tokenised once
    assert torch.equal(index.local_embeddings, previous_embedding(store, encoder, tokenizer, 4, 20))


def test_fast_token_ids_equal_the_tokenizer_call(tmp_path):
    store, tokenizer, _ = embedding_setup(tmp_path, 30)
    texts = [fmt(p) for p in store.get_many(range(30))] + ["", "word " * 50]
    for max_length in (5, 20):
        want = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        state = (tokenizer.backend_tokenizer.truncation, tokenizer.backend_tokenizer.padding)
        assert embed.token_id_fn(tokenizer, 7)(texts) != want  # another length: the copy is configured, not reused
        assert embed.token_id_fn(tokenizer, max_length)(texts) == want
        assert (tokenizer.backend_tokenizer.truncation, tokenizer.backend_tokenizer.padding) == state  # untouched


def test_embedding_has_the_same_bits_for_any_world_size(tmp_path, monkeypatch):
    monkeypatch.setattr(embed, "BLOCK_ROWS", 8)  # rank boundaries fall inside blocks
    store, tokenizer, encoder = embedding_setup(tmp_path, 37)
    results = {}
    for world_size in (1, 2, 3, 5):
        parts = []
        for rank in range(world_size):  # each rank of a W-process run, one after another (no collective is used)
            index = DistributedIndex(store, 32, World(rank, rank, world_size, torch.device("cpu")))
            embed_passages(index, encoder, tokenizer, fmt, 3, max_length=64)
            parts.append(index.local_embeddings)
        results[world_size] = torch.cat(parts)
    for world_size in (2, 3, 5):
        assert torch.equal(results[world_size], results[1]), world_size


def test_embedding_errors_in_the_tokenising_thread_reach_the_caller(tmp_path):
    store, tokenizer, encoder = embedding_setup(tmp_path, 10)

    def broken(passage):
        raise KeyError("no such field")

    with pytest.raises(KeyError, match="no such field"):
        embed_passages(DistributedIndex(store, 32, WORLD), encoder, tokenizer, broken, 4, 64)


def test_precision_reaches_embedding(tmp_path, monkeypatch):
    assert build_settings(options_from_dict({"precision": "bf16"}, "train"), "train").index.precision == "bf16"
    assert isinstance(embed.inference_autocast("bf16", torch.device("cpu")), contextlib.nullcontext)  # fp32 on CPU
    assert isinstance(embed.inference_autocast("fp32", torch.device("cuda")), contextlib.nullcontext)
    with pytest.warns(UserWarning):  # "CUDA is not available": the object is still built as on a GPU machine
        assert embed.inference_autocast("bf16", torch.device("cuda")).fast_dtype == torch.bfloat16
        assert embed.inference_autocast("fp16", torch.device("cuda")).fast_dtype == torch.float16
    seen = []
    monkeypatch.setattr(embed, "inference_autocast", lambda p, d: seen.append((p, d.type)) or contextlib.nullcontext())
    store, tokenizer, encoder = embedding_setup(tmp_path, 5)
    embed_passages(DistributedIndex(store, 32, WORLD), encoder, tokenizer, fmt, 4, 64, precision="bf16")
    assert seen == [("bf16", "cpu")]
