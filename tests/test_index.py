"""DistributedIndex in one process: exact search, ties, save/load, corruption, legacy import, faiss, refresh."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from src.config import IndexConfig
from src.distributed import World
from src.errors import UserError
from src.index import (
    DistributedIndex,
    block_ranges,
    embed_passages,
    files,
    flat,
    import_legacy_index,
    io,
    load_index,
    save_index,
)
from src.index.legacy import main as legacy_main
from src.passages import PassageStore, passage_title

WORLD = World(0, 0, 1, torch.device("cpu"))


def make_store(tmp_path, n, name="store"):
    path = tmp_path / f"{name}.jsonl"
    with open(path, "w") as handle:
        for i in range(n):
            handle.write(json.dumps({"id": f"p{i}", "title": f"T{i}", "text": f"passage {i} " + "word " * (i % 7)}))
            handle.write("\n")
    return PassageStore.build([str(path)], str(tmp_path / name))


def brute_force(embeddings, queries, k):
    """Reference: float64 scores, order by (score desc, row asc)."""
    scores = np.asarray(queries, np.float64) @ np.asarray(embeddings, np.float64).T  # (B, N)
    rows = np.stack([np.lexsort((np.arange(scores.shape[1]), -line))[:k] for line in scores])  # (B, k)
    return np.take_along_axis(scores, rows, 1), rows


def flat_index(tmp_path, embeddings, **kwargs):
    index = DistributedIndex(make_store(tmp_path, len(embeddings)), embeddings.shape[1], WORLD, IndexConfig(**kwargs))
    index.set_embeddings(torch.as_tensor(embeddings))
    return index


def assert_search_equals(index, embeddings, queries, k):
    scores, rows = index.search(torch.as_tensor(queries), k)
    ref_scores, ref_rows = brute_force(embeddings, queries, k)
    assert rows.dtype == torch.int64 and scores.dtype == torch.float32
    np.testing.assert_array_equal(rows.numpy(), ref_rows)
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-5, atol=1e-5)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(flat, "CHUNK_ROWS", 64)  # several chunks per shard, to test the chunk merge


def test_flat_search_equals_brute_force(tmp_path, small_chunks):
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((300, 16)).astype(np.float32)
    queries = rng.standard_normal((9, 16)).astype(np.float32)
    index = flat_index(tmp_path, embeddings)
    for k in (1, 10, 100):
        assert_search_equals(index, embeddings, queries, k)
    rows = index.search(torch.as_tensor(queries[:2]), 3)[1]
    assert [p["id"] for p in index.passages(rows)[0]] == [f"p{r}" for r in rows[0].tolist()]


def test_ties_go_to_the_smaller_row(tmp_path, small_chunks):
    # Small integer vectors: many exactly equal scores, computed exactly in fp32 whatever the summation order.
    rng = np.random.default_rng(1)
    embeddings = rng.integers(-1, 2, size=(500, 4)).astype(np.float32)
    queries = rng.integers(-1, 2, size=(12, 4)).astype(np.float32)
    index = flat_index(tmp_path, embeddings)
    for k in (1, 5, 37, 200):
        assert_search_equals(index, embeddings, queries, k)


def test_k_larger_than_n_is_clamped(tmp_path):
    rng = np.random.default_rng(2)
    embeddings = rng.standard_normal((7, 8)).astype(np.float32)
    index = flat_index(tmp_path, embeddings)
    scores, rows = index.search(torch.as_tensor(embeddings[:3]), 50)
    assert rows.shape == (3, 7)
    assert sorted(rows[0].tolist()) == list(range(7))
    assert index.search(torch.zeros((0, 8)), 5)[1].shape == (0, 5)


def test_save_load_round_trip_any_shard_count(tmp_path, small_chunks):
    rng = np.random.default_rng(3)
    embeddings = rng.standard_normal((50, 8)).astype(np.float32)
    queries = torch.as_tensor(rng.standard_normal((5, 8)).astype(np.float32))
    index = flat_index(tmp_path, embeddings)
    expected = index.search(queries, 10)
    for n_shards in (1, 7, 128):  # 7 divides nothing here; 128 > N gives one shard per passage
        path = str(tmp_path / f"saved{n_shards}")
        save_index(index, path, n_shards=n_shards)
        loaded = load_index(path, WORLD)
        assert len(files.read_manifest(path)["embeddings"]["shards"]) == min(n_shards, 50)
        for got, want in zip(loaded.search(queries, 10), expected):
            assert torch.equal(got, want)
        assert loaded.store.get(49) == index.store.get(49)
    save_index(index, str(tmp_path / "saved7"), n_shards=3)  # saving over an existing index replaces it
    assert len(files.read_manifest(str(tmp_path / "saved7"))["embeddings"]["shards"]) == 3
    half = load_index(str(tmp_path / "saved7"), World(1, 1, 2, torch.device("cpu")))
    assert half.local_rows == range(25, 50)  # a rank of another world size reads only its rows


def test_fp16_save_and_check_dim(tmp_path):
    embeddings = np.random.default_rng(4).standard_normal((20, 8)).astype(np.float32)
    index = flat_index(tmp_path, embeddings)
    save_index(index, str(tmp_path / "half"), n_shards=2, dtype="float16")
    loaded = load_index(str(tmp_path / "half"), WORLD)
    assert loaded.local_embeddings.dtype == torch.float32  # computed in fp32 on CPU whatever the file holds
    loaded.check_dim(8)
    with pytest.raises(UserError, match=r"index at .*half holds 8-dimensional .* produces 16"):
        loaded.check_dim(16)


def test_corrupted_or_missing_shard_is_named(tmp_path):
    embeddings = np.random.default_rng(5).standard_normal((30, 8)).astype(np.float32)
    path = str(tmp_path / "idx")
    save_index(flat_index(tmp_path, embeddings), path, n_shards=3)
    shard = os.path.join(path, "embeddings.00001.npy")
    with open(shard, "r+b") as handle:
        handle.seek(-3, os.SEEK_END)
        handle.write(b"\x00\x01\x02")
    with pytest.raises(UserError, match=r"embeddings\.00001\.npy is corrupted"):
        load_index(path, WORLD)
    with open(shard, "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(UserError, match=r"embeddings\.00001\.npy is truncated"):
        load_index(path, WORLD)
    os.remove(shard)
    with pytest.raises(UserError, match=r"embeddings\.00001\.npy is missing"):
        load_index(path, WORLD)


def test_path_without_index(tmp_path):
    with pytest.raises(UserError, match="no index at"):
        load_index(str(tmp_path), WORLD)
    with pytest.raises(UserError, match="no index at"):
        load_index(str(tmp_path / "does_not_exist"), WORLD)


def test_killed_save_is_not_loadable(tmp_path, monkeypatch):
    embeddings = np.random.default_rng(6).standard_normal((30, 8)).astype(np.float32)
    index = flat_index(tmp_path, embeddings)
    path = str(tmp_path / "idx")
    save_index(index, path, n_shards=4)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies after the shards, before the manifest

    monkeypatch.setattr(io, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        save_index(index, path, n_shards=2)
    leftovers = [name for name in os.listdir(tmp_path) if name.startswith("idx.tmp-")]
    assert leftovers and os.path.exists(os.path.join(tmp_path, leftovers[0], "embeddings.00000.npy"))
    with pytest.raises(UserError, match="no index at"):
        load_index(os.path.join(tmp_path, leftovers[0]), WORLD)
    assert len(load_index(path, WORLD).search(torch.zeros(1, 8), 3)[1][0]) == 3  # old index intact


def write_legacy_index(directory, shards, dim, rng):
    """Files as the original Atlas saved them: pickled passage lists and fp16 (d, n) tensors."""
    os.makedirs(directory)
    all_embeddings, all_passages = [], []
    for i, n in enumerate(shards):
        passages = [{"id": f"{i}-{j}", "title": "t", "section": "s" * (j % 2), "text": f"x{j}"} for j in range(n)]
        saved = [{**p, "title": passage_title(p)} for p in passages]  # the original rewrote titles before saving
        embeddings = torch.as_tensor(rng.standard_normal((dim, n)), dtype=torch.float16)
        with open(os.path.join(directory, f"passages.{i}.pt"), "wb") as handle:
            pickle.dump(saved, handle, protocol=pickle.HIGHEST_PROTOCOL)
        torch.save(embeddings, os.path.join(directory, f"embeddings.{i}.pt"))
        all_embeddings.append(embeddings.T.float().numpy())
        all_passages += passages
    return np.concatenate(all_embeddings), all_passages


def test_legacy_import_then_search(tmp_path):
    rng = np.random.default_rng(7)
    embeddings, passages = write_legacy_index(str(tmp_path / "orig"), [10, 0, 13, 9], 8, rng)
    import_legacy_index(str(tmp_path / "orig"), str(tmp_path / "new"))
    index = load_index(str(tmp_path / "new"), WORLD)
    assert index.store.get_many(range(len(passages))) == passages
    assert index.store.get(1)["title"] == "t" and passage_title(index.store.get(1)) == "t: s"
    assert files.read_manifest(str(tmp_path / "new"))["embeddings"]["dtype"] == "float16"
    assert_search_equals(index, embeddings, rng.standard_normal((4, 8)).astype(np.float32), 6)
    assert legacy_main([str(tmp_path / "orig"), str(tmp_path / "new")]) == 2  # refuses to overwrite


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_legacy_unpickler_refuses_globals(tmp_path):
    write_legacy_index(str(tmp_path / "orig"), [3], 4, np.random.default_rng(8))
    exploit = Exploit()
    exploit.marker = str(tmp_path / "pwned")
    with open(tmp_path / "orig" / "passages.0.pt", "wb") as handle:
        pickle.dump([{"id": "a", "text": "b"}, exploit], handle)
    with pytest.raises(UserError, match=r"passages\.0\.pt.*(posix|os)\.system"):
        import_legacy_index(str(tmp_path / "orig"), str(tmp_path / "new"))
    assert not os.path.exists(exploit.marker) and not os.path.exists(tmp_path / "new")
    os.remove(tmp_path / "orig" / "embeddings.0.pt")
    with pytest.raises(UserError, match=r"embeddings\.0\.pt is missing"):
        import_legacy_index(str(tmp_path / "orig"), str(tmp_path / "new"))


def test_faiss_flat_and_ivf_with_all_lists_equal_exact(tmp_path):
    pytest.importorskip("faiss")  # optional: only --index_mode faiss needs it
    rng = np.random.default_rng(9)
    embeddings = rng.standard_normal((400, 16)).astype(np.float32)
    queries = rng.standard_normal((6, 16)).astype(np.float32)
    assert_search_equals(flat_index(tmp_path, embeddings, mode="faiss"), embeddings, queries, 10)
    ivf = DistributedIndex(
        make_store(tmp_path, 400, "s2"), 16, WORLD, IndexConfig("faiss", "ivfflat", faiss_nprobe=1000)
    )
    ivf.set_embeddings(torch.as_tensor(embeddings))
    assert ivf.local_faiss.nprobe == ivf.local_faiss.nlist == 20 and ivf.local_embeddings is None
    assert_search_equals(ivf, embeddings, queries, 10)
    path = str(tmp_path / "ivf")
    save_index(ivf, path)
    assert_search_equals(load_index(path, WORLD, IndexConfig(mode="faiss", faiss_nprobe=20)), embeddings, queries, 10)
    with pytest.raises(UserError, match="saved in faiss mode"):
        load_index(path, WORLD)
    manifest_path = tmp_path / "ivf" / "index.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["faiss"]["world_size"] = 2
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="saved by 2 processes"):
        load_index(path, WORLD, IndexConfig(mode="faiss"))


def test_faiss_compressed_types_and_options(tmp_path):
    pytest.importorskip("faiss")  # optional: only --index_mode faiss needs it
    rng = np.random.default_rng(10)
    embeddings = rng.standard_normal((300, 16)).astype(np.float32)
    store = make_store(tmp_path, 300)
    for index_type, code_size in (("pq", 4), ("ivfpq", 8), ("sq", None), ("ivfsq", 4)):
        index = DistributedIndex(store, 16, WORLD, IndexConfig("faiss", index_type, code_size))
        index.set_embeddings(torch.as_tensor(embeddings))
        scores, rows = index.search(torch.as_tensor(embeddings[:20]), 5)
        assert rows.shape == (20, 5)
        assert (rows[:, 0] == torch.arange(20)).float().mean() > 0.5  # a vector mostly finds itself
    with pytest.raises(UserError, match="--faiss_code_size"):
        DistributedIndex(store, 16, WORLD, IndexConfig("faiss", "pq"))
    with pytest.raises(UserError, match="must divide"):
        DistributedIndex(store, 16, WORLD, IndexConfig("faiss", "ivfpq", 5))
    with pytest.raises(UserError, match="--faiss_index_type"):
        DistributedIndex(store, 16, WORLD, IndexConfig("faiss", "hnsw"))
    with pytest.raises(UserError, match="--index_mode"):
        DistributedIndex(store, 16, WORLD, IndexConfig("annoy"))


def tiny_tokenizer(texts):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=120, special_tokens=special))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        model_max_length=20,
    )  # fmt: skip


class MeanPooled(nn.Module):
    """A tiny Contriever: BERT + masked mean pooling."""

    def __init__(self, vocab_size):
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
        self.bert = BertModel(config)

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (n, L, d)
        mask = attention_mask.unsqueeze(-1).float()  # (n, L, 1)
        return (hidden * mask).sum(1) / mask.sum(1)  # (n, d)


def test_embed_passages_dynamic_padding_matches_one_at_a_time(tmp_path):
    torch.manual_seed(0)
    store = make_store(tmp_path, 23)
    texts = [f"{passage_title(p)} {p['text']}" for p in store.get_many(range(23))]
    tokenizer = tiny_tokenizer(texts)
    encoder = MeanPooled(len(tokenizer)).train()
    index = DistributedIndex(store, 32, WORLD)
    embed_passages(index, encoder, tokenizer, lambda p: f"{passage_title(p)} {p['text']}", 4, max_length=64)
    assert encoder.training  # the previous mode is restored
    encoder.eval()
    with torch.no_grad():
        for row, text in enumerate(texts):
            tokens = tokenizer([text], truncation=True, max_length=20, return_tensors="pt")  # 20 = model_max_length
            expected = encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])[0]
            torch.testing.assert_close(index.local_embeddings[row], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="produces 32"):
        embed_passages(DistributedIndex(store, 16, WORLD), encoder, tokenizer, passage_title, 4, 64)


def saved_flat(tmp_path, embeddings, n_shards, dtype, name="idx"):
    """Save ``embeddings`` as a flat index of ``n_shards`` ``dtype`` shards; return its path."""
    path = str(tmp_path / name)
    save_index(flat_index(tmp_path, embeddings), path, n_shards=n_shards, dtype=dtype)
    return path


def flip_byte(file_path, offset):
    with open(file_path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the reference fp16 casts overflow on purpose
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shard_dtype", ["float32", "float16"])
def test_streamed_load_is_bit_identical(tmp_path, monkeypatch, threads, shard_dtype):
    # Chunks of 100 bytes (1-2 rows) and a thread pool: every chunk edge and shard/rank boundary is crossed.
    monkeypatch.setattr(files, "CHUNK_BYTES", 100)
    monkeypatch.setattr(files, "LOAD_THREADS", threads)
    rng = np.random.default_rng(11)
    embeddings = (rng.standard_normal((31, 12)) * np.exp(rng.uniform(-20, 12, (31, 12)))).astype(np.float32)
    embeddings[0, :3] = [np.inf, 65520.0, 1e-8]  # fp16 overflow, rounding to inf and a subnormal
    path = saved_flat(tmp_path, embeddings, 3, shard_dtype)  # shards [0, 10) [10, 20) [20, 31); ranks split at 15
    saved = embeddings.astype(shard_dtype)
    for world_size in (1, 2):
        for rank in range(world_size):
            index = load_index(path, World(rank, rank, world_size, torch.device("cpu")))
            want = saved[index.local_rows.start : index.local_rows.stop].astype(np.float32)
            assert index.local_embeddings.dtype == torch.float32
            assert index.local_embeddings.numpy().tobytes() == want.tobytes()
    manifest = files.read_manifest(path)
    for dtype in (torch.float16, torch.float32):  # fp16 is what a CUDA index holds
        got = files.read_rows(path, manifest, 4, 27, dtype).numpy()
        assert got.tobytes() == saved[4:27].astype(got.dtype).tobytes()


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shard_dtype", ["float16", "float32"])  # read into memory / searched where mapped
def test_corruption_anywhere_in_a_shard_is_named(tmp_path, monkeypatch, threads, shard_dtype):
    monkeypatch.setattr(files, "CHUNK_BYTES", 64)
    monkeypatch.setattr(files, "LOAD_THREADS", threads)
    embeddings = np.random.default_rng(12).standard_normal((31, 8)).astype(np.float32)
    path = saved_flat(tmp_path, embeddings, 3, shard_dtype)
    middle = os.path.join(path, "embeddings.00001.npy")  # rows [10, 20): straddles the 2-rank split at 15
    row_bytes = 8 * np.dtype(shard_dtype).itemsize
    flip_byte(middle, os.path.getsize(middle) - 10 * row_bytes + 5 * row_bytes + 3)  # in row 15, held by rank 1
    for rank in (0, 1):  # rank 0 keeps none of the flipped row, but a shard is checked whole
        with pytest.raises(UserError, match=r"embeddings\.00001\.npy is corrupted \(checksum mismatch\)"):
            load_index(path, World(rank, rank, 2, torch.device("cpu")))
    first = os.path.join(path, "embeddings.00000.npy")
    flip_byte(first, os.path.getsize(first) - 1)
    with pytest.raises(UserError, match=r"embeddings\.00000\.npy is corrupted"):  # the first bad shard in row order
        load_index(path, WORLD)


def test_fp32_shards_are_searched_where_they_are_mapped(tmp_path):
    # A CPU index saved in fp32 keeps its shard files memory-mapped (one block per shard a rank overlaps, nothing
    # copied), searches them with the bits of the index it was saved from (one query or several: the product is
    # padded so that a score does not depend on the block holding its row), and never writes to the files.
    rng = np.random.default_rng(14)
    embeddings = rng.standard_normal((300, 16)).astype(np.float32)
    index = flat_index(tmp_path, embeddings)
    path = str(tmp_path / "mapped")
    save_index(index, path, n_shards=7)  # 42-43 rows per shard: fewer than one matmul tile row block
    queries = torch.as_tensor(rng.standard_normal((5, 16)).astype(np.float32))
    for world_size in (1, 2, 3):
        parts = []
        for rank in range(world_size):
            loaded = load_index(path, World(rank, rank, world_size, torch.device("cpu")))
            rows = loaded.local_rows
            overlapped = [s for s in block_ranges(300, 7) if max(s[0], rows.start) < min(s[1], rows.stop)]
            assert len(loaded.embedding_blocks) == len(overlapped)
            if world_size == 1:
                for b in (1, 5):
                    for got, want in zip(loaded.search(queries[:b], 10), index.search(queries[:b], 10)):
                        assert torch.equal(got, want)
            parts.append(loaded.local_embeddings)
        assert torch.cat(parts).numpy().tobytes() == embeddings.tobytes()
    loaded = load_index(path, WORLD)
    loaded.embedding_blocks[0][0] = 0.0  # copy-on-write: the process's own page, not the file's
    assert load_index(path, WORLD).local_embeddings.numpy().tobytes() == embeddings.tobytes()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_shards_of_another_dtype_or_device_are_copied_into_one_matrix(tmp_path, device):
    # fp16 shards for a CPU index, and any shards for a CUDA one (fp16 there): each mapped shard is converted
    # straight into its rows of one matrix, with the values a whole-matrix conversion gives.
    rng = np.random.default_rng(16)
    embeddings = rng.standard_normal((50, 8)).astype(np.float32)
    world = World(0, 0, 1, torch.device(device))
    for shard_dtype in ("float16", "float32"):
        (tmp_path / shard_dtype).mkdir()
        path = saved_flat(tmp_path / shard_dtype, embeddings, 4, shard_dtype)
        loaded = load_index(path, world)
        want = torch.as_tensor(embeddings.astype(shard_dtype)).to(loaded.dtype)
        if device == "cpu" and shard_dtype == "float32":
            assert len(loaded.embedding_blocks) == 4  # mapped, not copied
            continue
        assert len(loaded.embedding_blocks) == 1 and loaded.local_embeddings.device.type == device
        assert torch.equal(loaded.local_embeddings.cpu(), want)
        blocks = [torch.as_tensor(embeddings[a:b]).to(torch.float16) for a, b in ((0, 7), (7, 30), (30, 50))]
        loaded.set_embeddings(blocks)  # the same from tensors in memory
        assert torch.equal(loaded.local_embeddings.cpu(), torch.cat(blocks).to(loaded.dtype))


def test_blocks_search_equals_the_whole_matrix():
    # Any cut of a shard into row blocks gives the scores and rows of the whole matrix, bit for bit.
    generator = torch.Generator().manual_seed(15)
    embeddings = torch.randn(3000, 24, generator=generator)
    for n_queries in (1, 2, 7):
        queries = torch.randn(n_queries, 24, generator=generator)
        want = flat.exact_topk(embeddings, queries, 20, row_offset=100)
        for cuts in ([1500], [1, 2, 3, 70, 2999], list(range(37, 3000, 37))):  # 80 blocks: several merges
            blocks = [embeddings[a:b] for a, b in zip([0, *cuts], [*cuts, 3000])]
            got = flat.blocks_topk(blocks, queries, 20, row_offset=100)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bad_header_truncated_and_read_only_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "LOAD_THREADS", 2)
    embeddings = np.random.default_rng(13).standard_normal((20, 8)).astype(np.float32)
    path = saved_flat(tmp_path, embeddings, 2, "float32")
    for name in os.listdir(path):
        if name.endswith(".npy"):
            os.chmod(os.path.join(path, name), 0o444)  # a shared, read-only index still loads
    assert load_index(path, WORLD).local_embeddings.numpy().tobytes() == embeddings.tobytes()
    shard = os.path.join(path, "embeddings.00001.npy")
    os.chmod(shard, 0o644)
    np.save(shard, embeddings[10:].reshape(20, 4))  # same size, another shape
    with pytest.raises(UserError, match=r"embeddings\.00001\.npy holds float32\(20, 4\), expected \(10, 8\)"):
        load_index(path, WORLD)
    with open(shard, "wb") as handle:
        handle.write(b"\x93NUMPY garbage".ljust(os.path.getsize(os.path.join(path, "embeddings.00000.npy")), b"x"))
    with pytest.raises(UserError, match=r"embeddings\.00001\.npy is corrupted: "):
        load_index(path, WORLD)
    os.truncate(shard, 50)
    with pytest.raises(UserError, match=r"embeddings\.00001\.npy is truncated or corrupted \(50 bytes"):
        load_index(path, WORLD)
