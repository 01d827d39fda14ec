"""Near-duplicate removal: datatrove's MinHash stages on character n-grams, keeping the first of each cluster.

Stage 1 (signatures) is datatrove's MinhashDedupSignature with characters as words and a vectorised
shingle/signature computation; stage 2 (LSH buckets -> duplicate pairs) and stage 4 (drop listed documents)
are datatrove's own. Stage 3 is ours: datatrove's clustering keeps an arbitrary member (the union-find root),
while we keep the member that comes first in input order (file, then position), so the result does not
depend on how files were split into tasks. Shingles are taken after datatrove's `simplify_text` normalisation
(lowercase, no punctuation or spaces, digits as 0), so exact duplicates after normalisation share every band
and are always found, together with near-duplicates.
"""
from __future__ import annotations

import struct
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import SENTINEL, MinhashConfig, MinhashDedupSignature
from datatrove.utils.binaryio import read_tuples_from_file
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WordTokenizer

from ezoforge import text as tx
from ezoforge.curate.settings import DedupConfig
from ezoforge.records import atomic_path

_SHIFT = np.uint64(32)


def minhash_config(cfg: DedupConfig) -> MinhashConfig:
    # 32-bit values: 20 per band make band collisions of unrelated documents vanishingly rare. hash_fc names
    # datatrove's word-shingle hash, which our numpy shingles replace; sha1 needs no extra package (xxhash would).
    return MinhashConfig(n_grams=cfg.n_grams, num_buckets=cfg.num_buckets, hashes_per_bucket=cfg.hashes_per_bucket,
                         seed=cfg.seed, hash_config=HashConfig(precision=32, hash_fc="sha1"))


class CharTokenizer(WordTokenizer):
    """Japanese has no spaces: its MinHash shingles are character n-grams, so every character is a 'word'."""

    def word_tokenize(self, text: str) -> list[str]:
        return list(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(i, i + 1) for i in range(len(text))]


class CharMinhashSignature(MinhashDedupSignature):
    """Datatrove's signature stage over character n-grams, with shingles and signatures computed in numpy.

    Shingles are 32-bit hashes of the n-grams (splitmix64-mixed, top half); each of the H min-hashes applies
    x -> a*x + b mod 2**32 (a odd, so a permutation) and keeps the minimum. On already-mixed inputs this behaves
    as min-wise hashing (tests check the LSH catch rate at Jaccard 0.9), at twice the speed of 64-bit values
    and without datatrove's modulo-prime step.
    """

    name = "🎯 MinHash signatures (character n-grams)"

    def __init__(self, output_folder: str, config: MinhashConfig):
        super().__init__(output_folder, config, language=CharTokenizer("ja"))
        rng = np.random.default_rng(config.seed)
        self._mul = (rng.integers(0, 2**31, self.num_hashes, dtype=np.uint32) * np.uint32(2) + np.uint32(1))
        self._add = rng.integers(0, 2**32, self.num_hashes, dtype=np.uint32)

    def get_shingles(self, text: str) -> np.ndarray:
        codes = tx.simplified_codes(text)
        n = min(self.config.n_grams, len(codes))
        if n == 0:
            return np.empty((0, 1), dtype=np.uint32)
        hashes = (tx.mix64(tx.ngram_hashes(codes, [n])[n]) >> _SHIFT).astype(np.uint32)
        return np.unique(hashes).reshape(-1, 1)

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        lowest = np.full(self.num_hashes, np.iinfo(np.uint32).max, dtype=np.uint32)
        for i in range(0, len(shingles), 256):  # blocks keep the (shingles x hashes) products in cache
            block = shingles[i:i + 256] * self._mul
            block += self._add
            np.minimum(lowest, block.min(axis=0), out=lowest)
        return [v.tolist() for v in np.split(lowest, self.config.num_buckets)]


class FirstInOrderCluster(PipelineStep):
    """Stage 3: join duplicate pairs into clusters and list every member but the first in input order.

    Reads the `.dups` pairs of stage 2 (task, index among that task's kept documents) and the kept documents'
    positions; writes `{task:06d}.remove` files (sorted uint32 indices) for datatrove's MinhashDedupFilter.
    """

    type = "🫂 - DEDUP"
    name = "🎯 MinHash clusters (first in input order)"

    def __init__(self, dups_folder: str, kept_folder: str, remove_folder: str, file_of_task: list[int]):
        super().__init__()
        self.dups_folder = dups_folder
        self.kept_folder = kept_folder
        self.remove_folder = remove_folder
        self.file_of_task = file_of_task

    def positions(self, task: int) -> np.ndarray:
        meta = pq.read_table(Path(self.kept_folder) / f"{task:05d}.parquet", columns=["meta"]).column("meta")
        return pc.struct_field(meta, "pos").to_numpy()

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        assert world_size == 1, "clustering runs as a single task"
        parent: dict[tuple[int, int], tuple[int, int]] = {}

        def root(x):
            parent.setdefault(x, x)
            while parent[x] != x:
                parent[x] = parent[parent[x]]  # path halving
                x = parent[x]
            return x

        for path in sorted(Path(self.dups_folder).glob("*.dups")):
            with open(path, "rb") as f:
                for t1, d1, t2, d2 in read_tuples_from_file(f, "4I", lines_to_buffer=1024):
                    if t1 != SENTINEL:  # no index is used, but never join through its sentinel
                        a, b = root((t1, d1)), root((t2, d2))
                        if a != b:
                            parent[b] = a
        clusters: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
        for node in list(parent):
            clusters[root(node)].append(node)
        positions = {task: self.positions(task) for task in sorted({t for t, _ in parent})}
        removals: dict[int, list[int]] = defaultdict(list)
        for members in clusters.values():
            order = sorted(members, key=lambda m: (self.file_of_task[m[0]], int(positions[m[0]][m[1]])))
            for task, index in order[1:]:
                removals[task].append(index)
            self.stat_update("clusters")
            self.stat_update("duplicates", value=len(order) - 1)
        for task, indices in removals.items():
            with atomic_path(Path(self.remove_folder) / f"{task:06d}.remove") as tmp:
                tmp.write_bytes(struct.pack(f"<{len(indices)}I", *sorted(indices)))
