"""Which documents synth reads: a seeded random draw over the curated sources, in shares, nested.

Every document gets a key from the seed and its id alone; each source is taken in key order, and the sources are
interleaved by a fixed rule (the next document comes from the source furthest below its share). Neither depends on
`limit`, so the first N documents of a larger limit are exactly those of a smaller one, and raising the limit
reuses every cached request. A source that runs out leaves its place to the others.
"""
from __future__ import annotations

import hashlib
import heapq
import logging
from collections.abc import Iterable

from ezoforge.errors import ConfigError
from ezoforge.synth.passages import Doc

log = logging.getLogger(__name__)


def _key(seed: int, doc_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{doc_id}".encode()).digest()[:16], "big")


def draw(docs: Iterable[Doc], limit: int | None, mix: dict[str, float] | None, seed: int, where: str) -> list[Doc]:
    """Up to `limit` documents in drawn order. `mix`: shares by source (validated to sum to 1; a named source
    absent from the input is an error); None: each source in proportion to its documents."""
    available: dict[str, int] = {}
    # Per source, the `limit` lowest keys (no source can give more), held as a max-heap so memory stays bounded.
    kept: dict[str, list[tuple[int, str, Doc]]] = {}
    for doc in docs:
        available[doc.source] = available.get(doc.source, 0) + 1
        heap = kept.setdefault(doc.source, [])
        item = (-_key(seed, doc.id), doc.id, doc)
        if limit is None or len(heap) < limit:
            heapq.heappush(heap, item)
        elif item[0] > heap[0][0]:
            heapq.heapreplace(heap, item)
    if mix is None:
        total = sum(available.values())
        shares = {s: n / total for s, n in sorted(available.items())}
    else:
        for name in mix:
            if name not in available:
                raise ConfigError(f"synth.mix.{name}: {where} has no documents with source {name!r} "
                                  f"(its sources: {', '.join(sorted(available)) or 'none'})")
        shares = dict(sorted(mix.items()))
        if left_out := sorted(set(available) - set(mix)):
            log.info("synth.mix leaves out %s: not drawn", ", ".join(left_out))
    queues = {s: [doc for _, _, doc in sorted(kept[s], key=lambda it: -it[0])] for s in shares}
    drawable = sum(map(len, queues.values()))
    want = drawable if limit is None else min(limit, drawable)
    taken = dict.fromkeys(shares, 0)
    active = list(shares)
    out: list[Doc] = []
    while len(out) < want:
        s = max(active, key=lambda s: shares[s] * (len(out) + 1) - taken[s])  # ties: the first name
        out.append(queues[s][taken[s]])
        taken[s] += 1
        if taken[s] == len(queues[s]):
            active.remove(s)
            if len(out) < want:
                log.warning("synth: source %s ran out after %d documents (share %.3g); filling from %s",
                            s, taken[s], shares[s], ", ".join(active))
    log.info("synth draws %d documents: %s", len(out),
             ", ".join(f"{s} {taken[s]} of {available[s]}" for s in shares))
    return out
