"""What `nqinfo` reports: sizes, ranks and the two bits-per-weight counts of spec/FORMAT.md §4."""
from __future__ import annotations

from . import keys as K
from .bits import path_bits
from .layout import table_kind_name
from .reader import NQFile


def summarize(f: NQFile) -> dict:
    """A JSON-ready description of an open file."""
    cfg = f.config
    linear_bits = linear_weights = 0
    ranks = []
    for layer, block in enumerate(f.linears):
        ranks.append({lin: list(plan.ranks) for lin, plan in block.items()})
        for lin, plan in block.items():
            m, n = cfg.linear_shape(lin)
            linear_weights += m * n
            linear_bits += sum(path_bits(m, n, r, plan.has_mid) for r in plan.ranks)
    params = f.provenance.source_params
    fp16_bytes = 2 * params
    return {
        "file": str(f.path),
        "format_version": f.metadata[K.VERSION],
        "architecture": cfg.arch,
        "layers": cfg.n_layers, "hidden": cfg.hidden, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "ffn": cfg.ffn, "vocab": cfg.vocab, "context_length": cfg.context_length,
        "tied_embeddings": cfg.tie_embeddings, "embedding_type": table_kind_name(f.tables[K.EMBD_TABLE]),
        "source": f.provenance.source_name, "source_parameters": params, "preset": f.provenance.preset,
        "date": f.provenance.date, "converter_version": f.provenance.converter_version,
        "bits_target": f.provenance.bits_target,
        "bpw_decoder_linears": linear_bits / linear_weights,
        "bpw_whole_file": f.size * 8 / params,
        "file_bytes": f.size, "fp16_bytes": fp16_bytes, "compression_vs_fp16": fp16_bytes / f.size,
        "tensors": len(f.tensors),
        "ranks": ranks,
    }


def rank_lines(ranks: list[dict[str, list[int]]]) -> list[str]:
    """Per-layer ranks, runs of identical layers folded into one line."""
    lines, start = [], 0
    for i in range(1, len(ranks) + 1):
        if i == len(ranks) or ranks[i] != ranks[start]:
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            desc = " ".join(f"{lin}={'+'.join(map(str, r))}" for lin, r in ranks[start].items())
            lines.append(f"  blk {span}: {desc}")
            start = i
    return lines
