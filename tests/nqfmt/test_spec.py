"""spec/FORMAT.md is the contract: its key table must equal nqfmt/keys.py, in order."""
import re
from pathlib import Path

from nqfmt import keys as K

SPEC = Path(__file__).parents[2] / "spec" / "FORMAT.md"


def _key_table() -> list[tuple[str, str, bool]]:
    rows = []
    for line in SPEC.read_text().splitlines():
        m = re.match(r"\| `([a-z0-9_.]+)` \| (array of )?([A-Z0-9]+) \| (yes|no) \|", line)
        if m:
            rows.append((m[1], (m[2] or "") + m[3], m[4] == "yes"))
    return rows


def test_spec_key_table_equals_code_constants():
    code = [(k, ("array of " if s.array else "") + s.vtype.name, s.required) for k, s in K.METADATA.items()]
    assert _key_table() == code


def test_spec_names_every_tensor_part_and_linear():
    text = SPEC.read_text()
    for name in (*K.LINEARS, *K.PATH_PARTS, K.TOKEN_EMBD, K.OUTPUT, K.OUTPUT_NORM, K.CHECKSUMS, K.ATTN_NORM,
                 K.FFN_NORM, K.ATTN_Q_NORM, K.ATTN_K_NORM, K.ATTN_POST_NORM, K.FFN_POST_NORM):
        assert f"{name}" in text, name
    assert f"version {K.FORMAT_VERSION}" in text and f"general.alignment = {K.ALIGNMENT}" in text


def test_spec_names_every_ggml_type_with_its_id_and_the_table_kinds():
    text = SPEC.read_text()
    for t in K.GGMLType:
        assert f"`{t.name}` ({int(t)})" in text, t
    for table in (K.EMBD_TABLE, K.OUTPUT_TABLE):
        assert f"`{K.dense_table_tensor(table)}`" in text and f"`{table}.pP.v_signs`" in text


def test_spec_states_the_rank_rule_the_code_uses():
    text = SPEC.read_text()
    assert "r = floor((b·m·n/(m+n) − 16) / 32) · 32" in text and "[32, min(m, n)]" in text
